"""Prometheus metrics of the bus, the outbox and the broker connections.

Names follow the Prometheus conventions: the ``roost_`` prefix, base units (seconds), ``_total`` on
counters, and only bounded labels: a message ``type`` the registry knows (anything else is counted as
``unknown``, so a publisher cannot grow the series by inventing types), a consumer ``group`` (fixed in
code), an ``outcome`` from a fixed set, a ``schema`` (one per service), a ``broker`` kind.  Never ids,
subjects with ids or error texts.

Registry: the process-wide default ``prometheus_client.REGISTRY``.  ``roost up`` runs several services
in one process; they share one set of series, which is what one scrape of one process should show
(Prometheus adds ``instance``/``job``).  Where a series would be ambiguous between services it carries
a ``service`` label (broker connections); the others are already told apart by ``group`` (consumers)
or ``schema`` (outboxes), or describe the message whoever sent it (published).  Every service's
``/metrics`` therefore shows the process's metrics.  The default registry also brings the
``process_*`` and ``python_*`` collectors.  Tests read values with ``REGISTRY.get_sample_value``.

The bus layer never touches the prometheus objects: it calls ``record_published`` /
``record_consumed`` (or passes ``BusMetrics()`` as the ``Bus``'s observer), the outbox relay calls
``register_outbox_lag``, transports call ``set_broker_connected``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol, TypeVar, cast

import structlog
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from schemas.envelope import REPLY_TYPE
from schemas.registry import REGISTRY as MESSAGES
from schemas.registry import Registry

log = structlog.get_logger("roost.metrics")

# No ``*_created`` series: they double what is exported and no dashboard or alert of ours reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

PUBLISH_OUTCOMES: Final = frozenset({"confirmed", "failed", "unroutable", "timeout"})
CONSUME_OUTCOMES: Final = frozenset({"ack", "retry", "dead_letter", "duplicate", "rejected"})
UNKNOWN: Final = "unknown"
OTHER: Final = "other"

# Handler latency: from a millisecond to a minute (a handler that calls a BMC can take seconds).
HANDLER_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Publish confirm latency: sub-millisecond on a local broker, seconds when it is struggling.
PUBLISH_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MESSAGES_PUBLISHED = Counter(
    "roost_bus_messages_published", "Messages published on the bus, by outcome of the broker confirmation",
    ["type", "outcome"])
MESSAGES_CONSUMED = Counter(
    "roost_bus_messages_consumed", "Deliveries handled by a consumer group, by what became of them",
    ["type", "group", "outcome"])
MESSAGES_DEAD_LETTERED = Counter(
    "roost_bus_messages_dead_lettered", "Messages a consumer group gave up on and dead-lettered",
    ["type", "group"])
HANDLER_DURATION = Histogram(
    "roost_bus_handler_duration_seconds", "Time from delivery to settlement, handler included",
    ["type", "group"], buckets=HANDLER_BUCKETS)
PUBLISH_DURATION = Histogram(
    "roost_bus_publish_duration_seconds", "Time from publish to the broker's confirmation",
    buckets=PUBLISH_BUCKETS)
BROKER_CONNECTED = Gauge(
    "roost_broker_connected", "1 while the service's connection to its broker is up, else 0",
    ["broker", "service"])
BROKER_RECONNECTS = Counter(
    "roost_broker_reconnects", "Times a service's broker connection was re-established", ["broker", "service"])
DEAD_LETTERS_WAITING = Gauge(
    "roost_dead_letters_waiting_messages", "Dead letters kept for operators and not replayed yet", ["group"])
BUILD_INFO = Info("roost_build", "roost version and build")


# -- bounded labels -----------------------------------------------------------------------------

class _TypeLabels:
    """Maps a message type to a label value: itself when a registry knows it, else ``unknown``."""

    def __init__(self) -> None:
        self._known: set[str] = {REPLY_TYPE}
        self._lock = threading.Lock()

    def __call__(self, type_: str, registry: Registry | None = None) -> str:
        if type_ in self._known:
            return type_
        if type_ in (registry if registry is not None else MESSAGES):
            with self._lock:
                self._known.add(type_)
            return type_
        return UNKNOWN


type_label = _TypeLabels()


def _outcome(outcome: str, allowed: frozenset[str]) -> str:
    return outcome if outcome in allowed else OTHER


_Metric = TypeVar("_Metric", Counter, Histogram)
_SERIES: dict[tuple[object, tuple[str, ...]], Counter | Histogram] = {}


def _series(metric: _Metric, *labels: str) -> _Metric:
    """``metric.labels(*labels)``, looked up once per label set: ``labels()`` checks and locks at every call, and
    the bus records every message every service publishes and consumes.  Bounded as the labels are (known
    types, the groups, the outcomes)."""
    key = (metric, labels)
    child = _SERIES.get(key)
    if child is None:
        child = _SERIES[key] = metric.labels(*labels)
    return cast(_Metric, child)


# -- what the bus layer calls -------------------------------------------------------------------

def record_published(type: str, outcome: str, seconds: float, *, registry: Registry | None = None) -> None:
    """One publish: ``outcome`` confirmed | failed | unroutable | timeout; ``seconds`` until confirmed."""
    out = _outcome(outcome, PUBLISH_OUTCOMES)
    _series(MESSAGES_PUBLISHED, type_label(type, registry), out).inc()
    if out == "confirmed":
        PUBLISH_DURATION.observe(seconds)




def record_consumed(type: str, group: str, outcome: str, seconds: float, *,
                    registry: Registry | None = None) -> None:
    """One delivery settled: ``outcome`` ack | retry | dead_letter | duplicate | rejected.

    A ``dead_letter`` outcome also counts in ``roost_bus_messages_dead_lettered_total``.
    """
    label = type_label(type, registry)
    out = _outcome(outcome, CONSUME_OUTCOMES)
    _series(MESSAGES_CONSUMED, label, group, out).inc()
    _series(HANDLER_DURATION, label, group).observe(seconds)
    if out == "dead_letter":
        MESSAGES_DEAD_LETTERED.labels(label, group).inc()


def prime_consumer(types: Iterable[str], group: str, *, registry: Registry | None = None) -> None:
    """Create the series of a consumer group at zero, so rates and alerts see it before traffic."""
    for t in types:
        label = type_label(t, registry)
        for out in CONSUME_OUTCOMES:
            MESSAGES_CONSUMED.labels(label, group, out)
        MESSAGES_DEAD_LETTERED.labels(label, group)
        HANDLER_DURATION.labels(label, group)


class BusMetrics:
    """The ``BusObserver`` the ``Bus`` reports to: ``Bus(..., observer=BusMetrics())``."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry

    def published(self, type: str, outcome: str, seconds: float) -> None:
        record_published(type, outcome, seconds, registry=self.registry)

    def consumed(self, type: str, group: str, outcome: str, seconds: float) -> None:
        record_consumed(type, group, outcome, seconds, registry=self.registry)


def set_broker_connected(broker: str, service: str, connected: bool) -> None:
    """A transport reports its connection state (``broker``: rabbitmq | nats | memory)."""
    BROKER_CONNECTED.labels(broker, service).set(1 if connected else 0)
    BROKER_RECONNECTS.labels(broker, service)  # at zero until the first reconnect, so rates see it


def watch_broker_connection(broker: str, service: str, connected: Callable[[], bool]) -> None:
    """``roost_broker_connected`` read from the transport at every scrape, so it is never stale."""
    BROKER_CONNECTED.labels(broker, service).set_function(lambda: 1.0 if connected() else 0.0)
    BROKER_RECONNECTS.labels(broker, service)  # at zero until the first reconnect, so rates see it


def record_reconnect(broker: str, service: str) -> None:
    BROKER_RECONNECTS.labels(broker, service).inc()


def set_dead_letters_waiting(group: str, count: int) -> None:
    DEAD_LETTERS_WAITING.labels(group).set(count)


def set_build_info(version: str, commit: str = UNKNOWN) -> None:
    """Called once at start: ``roost_build_info{version,commit} 1``."""
    BUILD_INFO.info({"version": version, "commit": commit})


# -- outbox lag ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class OutboxLag:
    """What the relay knows about its outbox: rows waiting, and when the oldest one was written
    (a UNIX timestamp, ``None`` when nothing waits).  The age is computed at scrape time, so it
    keeps growing while the relay is stuck and its snapshot stale."""

    pending: int
    oldest_created_at: float | None = None


class OutboxLagLike(Protocol):
    """Anything with the two numbers (``OutboxLag``, the relay's own ``RelayLag``)."""

    @property
    def pending(self) -> int: ...

    @property
    def oldest_created_at(self) -> float | None: ...


OutboxLagSource = Callable[[], OutboxLagLike | None]


class _OutboxLagCollector(Collector):
    """Reads each registered outbox's lag when Prometheus scrapes.

    The callbacks run in the scrape (in the event loop or the exposition thread): they must return a
    snapshot the relay keeps up to date, never query the database.  A callback that raises or
    returns ``None`` contributes no sample for its schema.
    """

    def __init__(self) -> None:
        self._sources: dict[str, OutboxLagSource] = {}
        self._lock = threading.Lock()

    def register(self, schema: str, source: OutboxLagSource) -> Callable[[], None]:
        with self._lock:
            self._sources[schema] = source

        def unregister() -> None:
            with self._lock:
                if self._sources.get(schema) is source:
                    del self._sources[schema]

        return unregister

    def describe(self) -> Iterable[Metric]:
        return [self._families()[0], self._families()[1]]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily("roost_outbox_pending_messages", "Outbox rows written but not yet confirmed by the "
                                                               "broker", labels=["schema"]),
            GaugeMetricFamily("roost_outbox_oldest_pending_age_seconds", "Age of the oldest outbox row not yet "
                                                                         "confirmed by the broker; 0 when none",
                              labels=["schema"]),
        )

    def collect(self) -> Iterator[Metric]:
        pending, age = self._families()
        now = time.time()
        with self._lock:
            sources = list(self._sources.items())
        for schema, source in sources:
            try:
                lag = source()
            except Exception as exc:  # a broken callback must not break the whole scrape
                log.warning("outbox lag callback failed", schema=schema, error=f"{type(exc).__name__}: {exc}")
                continue
            if lag is None:
                continue
            pending.add_metric([schema], float(lag.pending))
            oldest = lag.oldest_created_at
            age.add_metric([schema], max(0.0, now - oldest) if oldest is not None and lag.pending else 0.0)
        yield pending
        yield age


_outbox_lag = _OutboxLagCollector()
REGISTRY.register(_outbox_lag)


def register_outbox_lag(schema: str, source: OutboxLagSource) -> Callable[[], None]:
    """Export the lag of ``schema``'s outbox; returns the function that stops exporting it.

    ``source`` is called at every scrape and must be cheap: return the relay's last snapshot, e.g.
    ``register_outbox_lag("inventory", lambda: relay.last_lag)``.  A second registration for the same
    schema replaces the first (a restarted relay).
    """
    return _outbox_lag.register(schema, source)
