"""Prometheus metrics of the orchestrator (conventions of ``services.core.metrics``).

* ``roost_orchestrator_drains_total{action, outcome}``: host-services commands carried out, by action
  (``lock``, ``force-lock``, ``unlock``) and outcome: ``done`` (the node is drained and tainted, or back in
  service), ``failed`` (the drain timed out or the API refused: the host stays as it was), ``superseded`` (a
  later force-lock or unlock for the same host took over), ``no-node`` (the cluster has no node of that
  name), ``skipped`` (no Kubernetes is configured);
* ``roost_orchestrator_drain_seconds{action, outcome}``: how long each took;
* ``roost_orchestrator_evictions_total{outcome}``: eviction requests by answer: ``evicted`` (201),
  ``refused`` (429), ``gone`` (404), ``error``;
* ``roost_orchestrator_evictions_refused_total``: the 429s alone (a PodDisruptionBudget said not now).

Labels are fixed sets; never host, node or pod names.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Histogram

ACTIONS: Final = ("lock", "force-lock", "unlock")
OUTCOMES: Final = ("done", "failed", "superseded", "no-node", "skipped")
EVICTION_OUTCOMES: Final = ("evicted", "refused", "gone", "error")
# A drain takes from a fraction of a second (an empty node) to its whole timeout (minutes).
DRAIN_BUCKETS: Final = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

DRAINS = Counter("roost_orchestrator_drains", "Host-services commands carried out, by action and outcome",
                 ["action", "outcome"])
DRAIN_SECONDS = Histogram("roost_orchestrator_drain_seconds",
                          "Duration of host-services commands (cordon, drain, taint / untaint, uncordon)",
                          ["action", "outcome"], buckets=DRAIN_BUCKETS)
EVICTIONS = Counter("roost_orchestrator_evictions", "Eviction requests, by the API server's answer", ["outcome"])
EVICTIONS_REFUSED = Counter("roost_orchestrator_evictions_refused",
                            "Evictions refused with 429 (a PodDisruptionBudget does not allow it now)")

for _action in ACTIONS:
    for _outcome in OUTCOMES:
        DRAINS.labels(_action, _outcome)
for _outcome in EVICTION_OUTCOMES:
    EVICTIONS.labels(_outcome)


def record_drain(action: str, outcome: str, seconds: float) -> None:
    if action in ACTIONS and outcome in OUTCOMES:
        DRAINS.labels(action, outcome).inc()
        DRAIN_SECONDS.labels(action, outcome).observe(seconds)


def record_eviction(outcome: str) -> None:
    if outcome in EVICTION_OUTCOMES:
        EVICTIONS.labels(outcome).inc()
        if outcome == "refused":
            EVICTIONS_REFUSED.inc()
