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

* ``roost_orchestrator_strategy_state{state}``: 1 for the state of the update strategy (none: all 0);
* ``roost_orchestrator_strategy_step_seconds{step, result}``: how long each strategy step took (a step resumed
  after a restart counts from its durable start);
* ``roost_orchestrator_strategy_step_failures_total{step, result}``: steps that failed, timed out or were
  cut short by an abort;
* ``roost_orchestrator_strategies_total{state}``: strategies that reached a final state.

Labels are fixed sets; never host, node or pod names.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

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

STRATEGY_STATES: Final = ("building", "build-failed", "ready-to-apply", "applying", "applied", "apply-failed",
                          "aborting", "aborted", "abort-failed")
STEP_NAMES: Final = ("query-alarms", "swact-hosts", "lock-hosts", "apply-update", "system-stabilize", "unlock-hosts",
                     "reboot-hosts", "wait-alarms-clear", "wait-data-sync")
STEP_RESULTS: Final = ("success", "failed", "timed-out", "aborted")
STEP_BUCKETS: Final = (0.1, 0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

STRATEGY_STATE = Gauge("roost_orchestrator_strategy_state", "1 for the state of the update strategy", ["state"])
STEP_SECONDS = Histogram("roost_orchestrator_strategy_step_seconds", "Duration of update strategy steps",
                         ["step", "result"], buckets=STEP_BUCKETS)
STEP_FAILURES = Counter("roost_orchestrator_strategy_step_failures",
                        "Update strategy steps that failed, timed out or were aborted", ["step", "result"])
STRATEGIES = Counter("roost_orchestrator_strategies", "Update strategies that reached a final state", ["state"])

for _state in STRATEGY_STATES:
    STRATEGY_STATE.labels(_state).set(0)

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


def record_strategy_state(state: str | None) -> None:
    for known in STRATEGY_STATES:
        STRATEGY_STATE.labels(known).set(1 if known == state else 0)


def record_strategy_end(state: str) -> None:
    if state in STRATEGY_STATES:
        STRATEGIES.labels(state).inc()


def record_step(step: str, result: str, seconds: float) -> None:
    if step in STEP_NAMES and result in STEP_RESULTS:
        STEP_SECONDS.labels(step, result).observe(max(0.0, seconds))
        if result != "success":
            STEP_FAILURES.labels(step, result).inc()
