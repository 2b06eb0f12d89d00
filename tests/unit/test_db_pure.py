"""The I/O-free parts of services.core.db: migration planning, relay batch rules, URL redaction,
failpoints, outbox rows and the in-memory idempotency store."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from schemas.envelope import Envelope
from services.core.bus.abc import PublishFailed
from services.core.bus.codec import decode, encode
from services.core.db.idempotency import CommandInProgress, IdempotencyKeyReused, MemoryIdempotencyStore
from services.core.db.migrations import (
    CORE_MIGRATIONS,
    Applied,
    ChecksumMismatch,
    MigrationError,
    check_schema,
    checksum,
    load_migrations,
    parse_migrations,
    plan,
)
from services.core.db.outbox import OutboxRow, ordering_key
from services.core.db.pool import DatabaseUnavailable, check_url, describe_error, redact_url
from services.core.db.relay import RelayLag, backoff, publishable, settle
from services.core.failpoints import armed


def row(id: int, key: str = "k", attempts: int = 0) -> OutboxRow:
    return OutboxRow(id=id, message_id=f"m{id}", subject="roost.test.x", ordering_key=key, headers={},
                     body=b"{}", attempts=attempts)


# -- migrations ------------------------------------------------------------------------------------


def test_migrations_are_ordered_by_version_not_by_listing() -> None:
    found = parse_migrations({"0002_b.sql": "B", "0010_c.sql": "C", "0001_a.sql": "A", "README.md": "x"})
    assert [(m.version, m.name, m.sql) for m in found] == [(1, "a", "A"), (2, "b", "B"), (10, "c", "C")]
    assert found[0].filename == "0001_a.sql"


@pytest.mark.parametrize("name", ["1_a.sql", "0001-a.sql", "0001_A.sql", "0001_.sql", "abcd_x.sql", "0000_zero.sql"])
def test_bad_migration_file_names_are_refused(name: str) -> None:
    with pytest.raises(MigrationError):
        parse_migrations({name: ""})


def test_two_files_with_one_version_are_refused() -> None:
    with pytest.raises(MigrationError, match="0003"):
        parse_migrations({"0003_a.sql": "", "0003_b.sql": ""})


def test_checksum_ignores_crlf_but_not_content() -> None:
    assert checksum("a;\nb;\n") == checksum("a;\r\nb;\r\n")
    assert checksum("a;") != checksum("a; ")


def test_plan_applies_only_pending_and_refuses_changed_files() -> None:
    files = parse_migrations({"0001_a.sql": "A", "0002_b.sql": "B", "0003_c.sql": "C"})
    done = [Applied(1, "a", checksum("A"))]
    assert [m.version for m in plan(files, done).pending] == [2, 3]
    with pytest.raises(ChecksumMismatch, match=r"0001_a\.sql"):
        plan(files, [Applied(1, "a", checksum("A changed"))], schema="svc")


def test_plan_reports_late_files_and_unknown_applied_versions() -> None:
    files = parse_migrations({"0001_a.sql": "A", "0002_b.sql": "B", "0003_c.sql": "C"})
    p = plan(files, [Applied(1, "a", checksum("A")), Applied(3, "c", checksum("C")), Applied(4, "d", "x")])
    assert [m.version for m in p.pending] == [2]
    assert [m.version for m in p.out_of_order] == [2]
    assert [a.version for a in p.unknown] == [4]


def test_core_migrations_load_and_start_with_the_outbox() -> None:
    found = load_migrations(CORE_MIGRATIONS)
    assert found[0].filename == "0001_outbox_inbox.sql"


@pytest.mark.parametrize("schema", ["Core", "1x", "a-b", "x" * 64, "a;drop", ""])
def test_schema_names_that_would_need_quoting_are_refused(schema: str) -> None:
    with pytest.raises(ValueError):
        check_schema(schema)


# -- relay rules -----------------------------------------------------------------------------------


def test_publishable_keeps_rows_behind_an_earlier_row_held_elsewhere() -> None:
    locked = [row(5, "a"), row(2, "b"), row(7, "b"), row(9, "c")]
    # b has a pending row 4 another relay holds: 7 must wait, 2 may go; c has 12 elsewhere (later).
    got = publishable(locked, {"b": 4, "c": 12})
    assert [r.id for r in got] == [2, 5, 9]


def test_settle_marks_confirmed_and_holds_back_what_follows_a_failure_of_its_key() -> None:
    rows = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "b"), row(5, "a")]
    results: list[BaseException | None] = [None, PublishFailed("nack"), None, None, PublishFailed("x")]
    s = settle(rows, results)
    assert s.sent == [1, 3]
    assert [(r.id, e) for r, e in s.failed] == [(2, "PublishFailed: nack"), (5, "PublishFailed: x")]
    assert s.held_back == [4]


def test_settle_refuses_mismatched_results() -> None:
    with pytest.raises(ValueError):
        settle([row(1)], [])


def test_backoff_grows_exponentially_to_a_cap() -> None:
    assert [backoff(n, base=0.5, cap=5) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0]
    assert backoff(10_000, base=0.5, cap=5) == 5


def test_lag_age_is_computed_at_read_time() -> None:
    lag = RelayLag(pending=3, oldest_created_at=100.0, measured_at=110.0)
    assert lag.oldest_pending_age(now=130.0) == 30.0
    assert RelayLag(pending=0, oldest_created_at=None, measured_at=1.0).oldest_pending_age(now=5.0) == 0.0


# -- outbox rows -----------------------------------------------------------------------------------


def test_outbox_row_gives_back_exactly_the_encoded_message() -> None:
    env = Envelope(type="roost.test.thing_changed", source="roost/test", subject="thing/1", data={"n": 1, "é": "ü"})
    message = encode(env, headers={"x-extra": "1"})
    record: dict[str, Any] = {"id": 1, "message_id": message.message_id, "subject": message.subject,
                              "ordering_key": ordering_key(env, message.subject), "attempts": 0,
                              "headers": json.dumps(dict(message.headers)),
                              "body": message.body}
    again = OutboxRow.from_record(record).to_message()
    assert again == message
    assert decode(again.body) == env


def test_ordering_key_is_the_entity_else_the_subject() -> None:
    with_entity = Envelope(type="roost.test.a", source="s", subject="host/1")
    without = Envelope(type="roost.test.a", source="s")
    assert ordering_key(with_entity, "roost.test.a") == "entity:host/1"
    assert ordering_key(without, "roost.test.a") == "subject:roost.test.a"


# -- pool errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://roost:s3cr%40t@db:5432/roost", "postgresql://roost:***@db:5432/roost"),
    ("postgresql://roost@/roost?host=/run/pg", "postgresql://roost@/roost?host=/run/pg"),
    ("postgresql:///roost?host=/run/pg&password=hunter2&sslmode=require",
     "postgresql:///roost?host=/run/pg&password=***&sslmode=require"),
])
def test_redact_url_hides_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_error_text_is_one_line_and_never_holds_the_password() -> None:
    url = "postgresql://roost:hunter2@db:5432/roost"
    text = describe_error(OSError("could not\nconnect with hunter2"), url)
    assert "hunter2" not in text and "\n" not in text
    assert text.startswith("database unavailable at postgresql://roost:***@db:5432/roost: ")
    assert "no answer" in describe_error(TimeoutError(), url)


def test_a_url_of_another_kind_is_refused_clearly() -> None:
    with pytest.raises(DatabaseUnavailable, match="expected postgresql://"):
        check_url("mysql://root:pw@db/x")


# -- failpoints ------------------------------------------------------------------------------------


def test_failpoint_armed_by_name_in_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROOST_FAILPOINT", "a.b, relay.after_confirm")
    assert armed("relay.after_confirm") and armed("a.b") and not armed("relay")
    monkeypatch.delenv("ROOST_FAILPOINT")
    assert not armed("relay.after_confirm")


def test_an_armed_failpoint_kills_the_process_with_sigkill() -> None:
    code = "from services.core.failpoints import failpoint; failpoint('x.y'); print('survived')"
    env = {**os.environ, "ROOST_FAILPOINT": "x.y"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -9 and b"survived" not in killed.stdout
    env["ROOST_FAILPOINT"] = "other"
    alive = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert alive.returncode == 0 and b"survived" in alive.stdout


# -- in-memory idempotency -------------------------------------------------------------------------


async def test_memory_store_runs_once_and_repeats_the_first_reply() -> None:
    store = MemoryIdempotencyStore()
    calls = 0

    async def fn() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"status": "completed", "n": calls}

    first = await store.run_once("k1", "roost.cmd.x", fn)
    assert await store.run_once("k1", "roost.cmd.x", fn) == first == {"status": "completed", "n": 1}
    assert calls == 1
    with pytest.raises(IdempotencyKeyReused):
        await store.run_once("k1", "roost.cmd.other", fn)


async def test_memory_store_concurrent_repeats_wait_for_the_one_execution() -> None:
    store = MemoryIdempotencyStore()
    gate = asyncio.Event()
    started = asyncio.Event()

    async def slow() -> dict[str, Any]:
        started.set()
        await gate.wait()
        return {"ok": True}

    first = asyncio.create_task(store.run_once("k", "roost.cmd.x", slow))
    await started.wait()
    repeats = [asyncio.create_task(store.run_once("k", "roost.cmd.x", slow)) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(first, *repeats) == [{"ok": True}] * 6
    assert store.executions == 1


async def test_memory_store_failure_stores_nothing_and_a_waiter_times_out_as_in_progress() -> None:
    store = MemoryIdempotencyStore(wait=0.05)

    async def boom() -> dict[str, Any]:
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        await store.run_once("k", "roost.cmd.x", boom)

    async def ok() -> dict[str, Any]:
        return {"ok": 1}

    assert await store.run_once("k", "roost.cmd.x", ok) == {"ok": 1}

    never = asyncio.Event()

    async def hangs() -> dict[str, Any]:
        await never.wait()
        return {}

    running = asyncio.create_task(store.run_once("h", "roost.cmd.x", hangs))
    await asyncio.sleep(0)
    with pytest.raises(CommandInProgress):
        await store.run_once("h", "roost.cmd.x", hangs)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
