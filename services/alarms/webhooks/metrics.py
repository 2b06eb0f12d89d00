"""Prometheus metrics of webhook delivery (conventions of ``services.core.metrics``).

* ``roost_webhook_deliveries_total{outcome}``: HTTP attempts by what became of the delivery:
  ``delivered`` (2xx), ``retry`` (network error, timeout, 5xx, 429, 408: tried again later),
  ``dead_letter`` (other 4xx, or the max age passed); a fixed set.
* ``roost_webhook_delivery_duration_seconds``: one HTTP attempt, request to response (or error).
* ``roost_webhook_delivery_latency_seconds``: from enqueue (the alarm change's commit) to the 2xx.
* ``roost_webhook_queue_depth_messages{subscription}``: deliveries waiting per subscription id: its
  pending delivery rows plus the notifications after its fan-out cursor that its filters match (queued,
  not yet turned into delivery rows; see ``store.queue_depth``).  The
  label is a subscription id: subscriptions are registered by operators and are few (tens), and a
  deleted subscription's series is removed at the next refresh, so the cardinality stays bounded.
  Every dispatcher replica reports the same (database-wide) number: aggregate with ``max``.

A dispatcher in a process of its own (``services.alarms.webhooks.worker``) calls ``forward_to(sink)``: each
observation is then also handed to ``sink(kind, args)``; the worker sends them up to the alarms service's
process, which applies them to its own registry (``apply``), the one its ``/metrics`` serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES: Final = frozenset({"delivered", "retry", "dead_letter"})
ATTEMPT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                          1800.0, 3600.0, 21600.0, 86400.0)

DELIVERIES = Counter("roost_webhook_deliveries", "Webhook delivery attempts, by outcome", ["outcome"])
ATTEMPT_DURATION = Histogram("roost_webhook_delivery_duration_seconds",
                             "Duration of one webhook HTTP attempt", buckets=ATTEMPT_BUCKETS)
LATENCY = Histogram("roost_webhook_delivery_latency_seconds",
                    "Time from enqueue to the subscriber's 2xx", buckets=LATENCY_BUCKETS)
QUEUE_DEPTH = Gauge("roost_webhook_queue_depth_messages", "Webhook deliveries pending, per subscription",
                    ["subscription"])

for _outcome in OUTCOMES:
    DELIVERIES.labels(_outcome)

_reported: set[str] = set()
Sink = Callable[[str, tuple[Any, ...]], None]
_sink: Sink | None = None


def forward_to(sink: Sink | None) -> None:
    """Hand every observation to ``sink(kind, args)`` too (None: stop)."""
    global _sink
    _sink = sink


def apply(kind: str, args: Sequence[Any]) -> None:
    """Record an observation forwarded from a dispatcher's process (``forward_to``); unknown kinds are ignored."""
    if kind == "attempt" and len(args) == 2 and args[0] in OUTCOMES:
        record_attempt(str(args[0]), float(args[1]))
    elif kind == "latency" and len(args) == 1:
        record_latency(float(args[0]))
    elif kind == "depth" and len(args) == 1 and isinstance(args[0], dict):
        set_queue_depth({str(k): int(v) for k, v in args[0].items()})


def record_attempt(outcome: str, seconds: float) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown webhook outcome {outcome!r}")
    DELIVERIES.labels(outcome).inc()
    ATTEMPT_DURATION.observe(max(0.0, seconds))
    if _sink is not None:
        _sink("attempt", (outcome, seconds))


def record_latency(seconds: float) -> None:
    LATENCY.observe(max(0.0, seconds))
    if _sink is not None:
        _sink("latency", (seconds,))


def set_queue_depth(depth: Mapping[str, int]) -> None:
    """Set the gauge for every subscription in ``depth``; drop the series of the ones gone."""
    if _sink is not None:
        _sink("depth", (dict(depth),))
    for subscription, pending in depth.items():
        QUEUE_DEPTH.labels(subscription).set(pending)
    for gone in _reported - set(depth):
        QUEUE_DEPTH.remove(gone)
    _reported.clear()
    _reported.update(depth)
