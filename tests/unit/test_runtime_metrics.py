"""Metrics: names, bounded labels, the outbox lag collector, the observer the bus reports to."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY, generate_latest
from pydantic import BaseModel

from schemas.registry import Registry
from services.core import metrics
from services.core.metrics import OutboxLag


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Ping(BaseModel):
    n: int


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.event("roost.testmetrics.pinged", "core", Ping, "a test event")
    return reg


def test_record_consumed_counts_outcomes_and_dead_letters(registry: Registry) -> None:
    labels = {"type": "roost.testmetrics.pinged", "group": "tm-group"}
    before_ack = value("roost_bus_messages_consumed_total", **labels, outcome="ack")
    before_dl = value("roost_bus_messages_dead_lettered_total", **labels)
    before_count = value("roost_bus_handler_duration_seconds_count", **labels)
    observer = metrics.BusMetrics(registry)
    observer.consumed("roost.testmetrics.pinged", "tm-group", "ack", 0.01)
    observer.consumed("roost.testmetrics.pinged", "tm-group", "dead_letter", 0.02)
    assert value("roost_bus_messages_consumed_total", **labels, outcome="ack") == before_ack + 1
    assert value("roost_bus_messages_dead_lettered_total", **labels) == before_dl + 1
    assert value("roost_bus_handler_duration_seconds_count", **labels) == before_count + 2


def test_unknown_types_and_outcomes_are_bounded(registry: Registry) -> None:
    before = value("roost_bus_messages_consumed_total", type="unknown", group="tm-bounded", outcome="other")
    for i in range(50):
        metrics.record_consumed(f"roost.invented.t{i}", "tm-bounded", f"weird-{i}", 0.001, registry=registry)
    assert value("roost_bus_messages_consumed_total", type="unknown", group="tm-bounded",
                 outcome="other") == before + 50
    text = generate_latest(REGISTRY).decode()
    assert "roost.invented" not in text


def test_record_published_observes_confirm_latency(registry: Registry) -> None:
    before = value("roost_bus_publish_duration_seconds_count")
    before_failed = value("roost_bus_messages_published_total", type="roost.testmetrics.pinged", outcome="failed")
    metrics.record_published("roost.testmetrics.pinged", "confirmed", 0.003, registry=registry)
    metrics.record_published("roost.testmetrics.pinged", "failed", 10.0, registry=registry)
    assert value("roost_bus_publish_duration_seconds_count") == before + 1
    assert value("roost_bus_messages_published_total", type="roost.testmetrics.pinged",
                 outcome="failed") == before_failed + 1


def test_prime_consumer_exports_zeros(registry: Registry) -> None:
    metrics.prime_consumer(["roost.testmetrics.pinged"], "tm-primed", registry=registry)
    assert REGISTRY.get_sample_value("roost_bus_messages_consumed_total", {
        "type": "roost.testmetrics.pinged", "group": "tm-primed", "outcome": "retry"}) == 0.0


def test_outbox_lag_is_read_at_scrape_time() -> None:
    snapshot = OutboxLag(pending=0)
    unregister = metrics.register_outbox_lag("tm_schema", lambda: snapshot)
    try:
        assert value("roost_outbox_pending_messages", schema="tm_schema") == 0
        assert value("roost_outbox_oldest_pending_age_seconds", schema="tm_schema") == 0
        snapshot = OutboxLag(pending=3, oldest_created_at=time.time() - 42)
        assert value("roost_outbox_pending_messages", schema="tm_schema") == 3
        assert 42 <= value("roost_outbox_oldest_pending_age_seconds", schema="tm_schema") < 100
    finally:
        unregister()
    assert REGISTRY.get_sample_value("roost_outbox_pending_messages", {"schema": "tm_schema"}) is None


def test_a_broken_lag_callback_does_not_break_the_scrape() -> None:
    def broken() -> OutboxLag:
        raise RuntimeError("relay gone")

    unregister = metrics.register_outbox_lag("tm_broken", broken)
    try:
        assert b"roost_outbox_pending_messages" in generate_latest(REGISTRY)
        assert REGISTRY.get_sample_value("roost_outbox_pending_messages", {"schema": "tm_broken"}) is None
    finally:
        unregister()


def test_reregistering_replaces_and_stale_unregister_is_harmless() -> None:
    first = metrics.register_outbox_lag("tm_replaced", lambda: OutboxLag(1))
    second = metrics.register_outbox_lag("tm_replaced", lambda: OutboxLag(2))
    first()   # the old relay's unregister must not remove the new one
    assert value("roost_outbox_pending_messages", schema="tm_replaced") == 2
    second()


def test_broker_connected_and_build_info() -> None:
    metrics.set_broker_connected("nats", "tm-service", True)
    assert value("roost_broker_connected", broker="nats", service="tm-service") == 1
    metrics.set_broker_connected("nats", "tm-service", False)
    assert value("roost_broker_connected", broker="nats", service="tm-service") == 0
    metrics.set_build_info("0.1.0", "abc123")
    assert value("roost_build_info", version="0.1.0", commit="abc123") == 1


def test_names_follow_conventions() -> None:
    metrics.record_consumed("x", "tm-names", "ack", 0.1)
    metrics.set_build_info("0.1.0")
    text = generate_latest(REGISTRY).decode()
    kinds = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE roost_"))
    assert kinds == {**kinds,
                     "roost_bus_messages_published_total": "counter",
                     "roost_bus_messages_consumed_total": "counter",
                     "roost_bus_messages_dead_lettered_total": "counter",
                     "roost_bus_handler_duration_seconds": "histogram",
                     "roost_bus_publish_duration_seconds": "histogram",
                     "roost_outbox_pending_messages": "gauge",
                     "roost_outbox_oldest_pending_age_seconds": "gauge",
                     "roost_broker_connected": "gauge",
                     "roost_build_info": "gauge"}
    for name, kind in kinds.items():
        assert name.endswith("_total") == (kind == "counter"), name
        assert not name.endswith("_created"), "the _created series are disabled"


def test_any_snapshot_with_pending_and_oldest_created_at_will_do() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class RelayLag:        # the shape of the relay's own snapshot
        pending: int
        oldest_created_at: float | None
        measured_at: float

    last = RelayLag(5, time.time() - 10, time.time())
    unregister = metrics.register_outbox_lag("tm_relay", lambda: last)
    try:
        assert value("roost_outbox_pending_messages", schema="tm_relay") == 5
        assert value("roost_outbox_oldest_pending_age_seconds", schema="tm_relay") >= 10
    finally:
        unregister()
