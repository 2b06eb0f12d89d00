"""Structured logs: one format for ours and third-party records, message context that never leaks,
secrets masked wherever they appear."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from schemas.envelope import Envelope
from services.core.logging import (
    configure_logging,
    current_message_fields,
    is_sensitive_key,
    message_context,
    redact_text,
    register_secret,
    reset_logging,
)

TOKEN = "roost_Q2hhbmdlTWUtUGxhbnRlZC1Ub2tlbi0xMjM0NTY3ODkw"
PASSWORD = "Pl4nted-Passw0rd"
KEY_BYTES = bytes(range(200, 232))


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    configure_logging("json", "DEBUG", stream=buf)
    structlog.contextvars.clear_contextvars()
    yield buf
    structlog.contextvars.clear_contextvars()
    reset_logging()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def envelope(n: int, causation: str | None = None) -> Envelope:
    return Envelope(source="roost/test", type="roost.test.happened", data={"n": n}, causationid=causation)


def test_json_lines_with_the_same_keys_for_structlog_and_stdlib(output: io.StringIO) -> None:
    structlog.get_logger("roost.test").info("ours", n=1)
    logging.getLogger("aio_pika").warning("theirs %s", "formatted")
    ours, theirs = lines(output)
    for line in (ours, theirs):
        assert {"timestamp", "level", "logger", "event"} <= line.keys()
        assert line["timestamp"].endswith("Z")
    assert ours["logger"] == "roost.test" and ours["n"] == 1 and ours["level"] == "info"
    assert theirs == {**theirs, "logger": "aio_pika", "event": "theirs formatted", "level": "warning"}


def test_level_filters(output: io.StringIO) -> None:
    configure_logging("json", "WARNING", stream=output)
    structlog.get_logger("roost.test").info("hidden")
    logging.getLogger("asyncpg").info("hidden too")
    structlog.get_logger("roost.test").warning("shown")
    assert [line["event"] for line in lines(output)] == ["shown"]


def test_console_format_is_readable() -> None:
    buf = io.StringIO()
    configure_logging("console", "INFO", stream=buf)
    try:
        structlog.get_logger("roost.test").info("hello", password=PASSWORD, n=2)
    finally:
        reset_logging()
    text = buf.getvalue()
    assert "hello" in text and "n=2" in text and "password=***" in text and PASSWORD not in text
    assert not text.lstrip().startswith("{")


def test_auto_is_json_when_not_a_terminal(output: io.StringIO) -> None:
    configure_logging("auto", "INFO", stream=output)
    structlog.get_logger("t").info("x")
    assert lines(output)[0]["event"] == "x"


def test_message_context_binds_and_resets_between_two_messages_in_one_task(output: io.StringIO) -> None:
    log = structlog.get_logger("roost.test")
    first, second = envelope(1), envelope(2, causation="cause-2")
    with message_context(first, group="g1"):
        log.info("handling")
    log.info("between")
    with message_context(second):
        log.info("handling")
    log.info("after")
    a, between, b, after = lines(output)
    assert (a["correlation_id"], a["message_id"], a["message_type"], a["causation_id"], a["group"]) == (
        first.correlationid, first.id, "roost.test.happened", None, "g1")
    assert b["correlation_id"] == second.correlationid and b["message_id"] == second.id
    assert b["causation_id"] == "cause-2" and "group" not in b
    for line in (between, after):
        assert not {"correlation_id", "causation_id", "message_id", "message_type", "group"} & line.keys()


def test_message_context_resets_on_error_and_restores_an_outer_message(output: io.StringIO) -> None:
    log = structlog.get_logger("roost.test")
    outer, inner = envelope(1, causation="c-outer"), envelope(2)
    with message_context(outer):
        with pytest.raises(RuntimeError), message_context(inner):
            log.info("inner")
            raise RuntimeError("handler failed")
        log.info("outer again")
    log.info("none")
    inner_line, outer_line, none = lines(output)
    assert inner_line["message_id"] == inner.id and inner_line["causation_id"] is None
    assert outer_line["message_id"] == outer.id and outer_line["causation_id"] == "c-outer"
    assert "message_id" not in none


def test_message_context_accepts_fields() -> None:
    before = current_message_fields()
    with message_context({"id": "m-1", "type": "roost.a.b", "correlationid": "c-1"}, attempt=2):
        assert current_message_fields() == {
            "message_id": "m-1", "message_type": "roost.a.b", "correlation_id": "c-1", "causation_id": None,
            "attempt": 2, **before}
    assert current_message_fields() == before


async def test_concurrent_tasks_never_see_each_others_ids(output: io.StringIO) -> None:
    log = structlog.get_logger("roost.test")
    messages = [envelope(i) for i in range(20)]
    entered = 0
    all_inside = asyncio.Event()

    async def handle(env: Envelope) -> None:
        nonlocal entered
        with message_context(env):
            entered += 1
            if entered == len(messages):
                all_inside.set()
            await all_inside.wait()       # every handler is inside its context at the same time
            log.info("handled", n=env.data["n"])

    async def sequential_consumer() -> None:   # how nats-py runs callbacks: one task, one after another
        for env in messages[:5]:
            with message_context(env):
                log.info("sequential", n=env.data["n"])

    await asyncio.gather(*(handle(m) for m in messages), sequential_consumer())
    log.info("done")
    by_id = {m.id: m for m in messages}
    records = lines(output)
    assert len(records) == 26
    for line in records[:-1]:
        env = by_id[line["message_id"]]
        assert line["n"] == env.data["n"] and line["correlation_id"] == env.correlationid
    assert "message_id" not in records[-1]


def test_secret_keys_and_values_are_masked(output: io.StringIO) -> None:
    register_secret(KEY_BYTES)
    log = structlog.get_logger("roost.test")
    log.info("connecting to amqp://roost:%s@broker:5672/", PASSWORD,
             password=PASSWORD, token=TOKEN, hmac_key=KEY_BYTES.hex(), apiKey="abc",
             headers={"Authorization": f"Bearer {TOKEN}", "x-roost-type": "roost.a.b"},
             note=f"sent Bearer {TOKEN} with key {KEY_BYTES.hex()}",
             dsn=f"postgresql://roost:{PASSWORD}@db/roost",
             items=[f"token={PASSWORD}", {"secret": PASSWORD}],
             idempotency_key="visible-key", key_file="/etc/roost/tls.key")
    logging.getLogger("asyncpg").error("cannot connect to postgresql://u:%s@h/db", PASSWORD)
    try:
        raise ConnectionError(f"AUTH failed for nats://{TOKEN}@nats:4222 password={PASSWORD}")
    except ConnectionError:
        log.exception("broker down")
    text = output.getvalue()
    for secret in (PASSWORD, TOKEN, KEY_BYTES.hex(), TOKEN.removeprefix("roost_")):
        assert secret not in text
    first = lines(output)[0]
    assert first["idempotency_key"] == "visible-key" and first["key_file"] == "/etc/roost/tls.key"
    assert first["headers"]["x-roost-type"] == "roost.a.b"
    assert "amqp://roost:***@broker:5672/" in first["event"]


@pytest.mark.parametrize(("key", "sensitive"), [
    ("password", True), ("db_password", True), ("clientSecret", True), ("Authorization", True),
    ("api_key", True), ("hmac_key", True), ("master_key", True), ("access_token", True), ("key", True),
    ("idempotency_key", False), ("routing_key", False), ("key_file", False), ("event", False),
    ("message_id", False), ("correlation_id", False), ("keyboard", False),
])
def test_sensitive_key_names(key: str, sensitive: bool) -> None:
    assert is_sensitive_key(key) is sensitive


def test_redact_text_leaves_ordinary_text() -> None:
    text = "roost.host.state_changed roost_outbox_oldest_pending_age_seconds_for_schema_inventory ok"
    assert redact_text(text) == text
    assert redact_text("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer ***"
    assert "BEGIN" in redact_text("-----BEGIN PRIVATE KEY-----\nMIIabc\n-----END PRIVATE KEY-----")
    assert "MIIabc" not in redact_text("-----BEGIN PRIVATE KEY-----\nMIIabc\n-----END PRIVATE KEY-----")
