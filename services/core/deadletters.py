"""The dead-letter keeper: what no consumer could handle, kept where an operator can see it.

Every transport dead-letters to ``roost.dlq.<group>`` on the broker (a durable stream or queue, so
nothing is lost while the keeper is down).  The keeper drains those subjects into
``core.dead_letters`` in PostgreSQL, where ``roost dlq list|show|replay|purge`` reach them through the
``roost.cmd.dlq.*`` commands, whatever the broker.  When the number waiting passes a threshold it
announces ``roost.system.dead_letters_high`` once and raises alarm 950.301 (``..._normal`` and a clear
when it falls back to half the threshold).

A replay publishes the original message again on its original subject with a fresh broker message id
(the envelope and its id are unchanged).  Every group bound to that subject sees it again; groups that
had handled it drop it through their inbox, as they drop any redelivery.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import structlog

from schemas.core import (
    DeadLetter,
    DeadLettersHigh,
    DeadLettersNormal,
    DeadLetterSummary,
    DlqList,
    DlqListResult,
    DlqPurge,
    DlqPurgeResult,
    DlqReplay,
    DlqReplayResult,
    DlqShow,
)
from services.core import metrics
from services.core.bus.abc import (
    H_ATTEMPT,
    H_DLQ_ATTEMPTS,
    H_DLQ_GROUP,
    H_DLQ_REASON,
    H_DLQ_SUBJECT,
    H_DLQ_TIME,
    H_TYPE,
    ConsumerOptions,
    OutgoingMessage,
    RawDelivery,
)
from services.core.bus.bus import Bus, Message, Reject
from services.core.bus.subjects import backoff

log = structlog.get_logger("roost.deadletters")

KEEPER_GROUP = "dlq-keeper"
DEPTH_ALARM_ID = "950.301"                          # roost's catalogue: dead letters above threshold
DEPTH_ALARM_ENTITY = "system=roost.dead_letters=all"
COMMAND_GROUP = "core-dlq"
_DLQ_HEADERS = (H_DLQ_REASON, H_DLQ_SUBJECT, H_DLQ_GROUP, H_DLQ_ATTEMPTS, H_DLQ_TIME, H_ATTEMPT)


@dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A dead letter as it is stored: pure translation of what the broker delivered."""

    message_id: str
    consumer_group: str
    subject: str
    type: str | None
    reason: str
    attempts: int
    headers: dict[str, str]
    body: bytes
    dead_lettered_at: datetime


def record_from(subject: str, message_id: str, headers: Mapping[str, str], body: bytes) -> DeadLetterRecord:
    """What to store for a delivery on ``roost.dlq.<group>``; tolerant of missing headers."""
    group = headers.get(H_DLQ_GROUP) or subject.removeprefix("roost.dlq.")
    try:
        when = datetime.fromisoformat(headers[H_DLQ_TIME])
    except (KeyError, ValueError):
        when = datetime.now(UTC)
    try:
        attempts = int(headers.get(H_DLQ_ATTEMPTS, "0"))
    except ValueError:
        attempts = 0
    return DeadLetterRecord(
        message_id=message_id, consumer_group=group, subject=headers.get(H_DLQ_SUBJECT, subject),
        type=headers.get(H_TYPE), reason=headers.get(H_DLQ_REASON, "(no reason recorded)"),
        attempts=attempts, headers=dict(headers), body=body, dead_lettered_at=when)


def replay_message(row: Mapping[str, Any] | asyncpg.Record) -> OutgoingMessage:
    """The message a replay publishes: original subject, body and headers, a fresh broker message id."""
    headers = {k: v for k, v in json.loads(row["headers"]).items() if k not in _DLQ_HEADERS}
    return OutgoingMessage(subject=row["subject"], body=bytes(row["body"]),
                           message_id=f"{row['message_id']}:replay:{row['id']}:{row['replay_count'] + 1}",
                           headers=headers)


class DepthAlarm:
    """Announce once when the depth passes the threshold, and once when it falls back to half of it."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.high = False

    def observe(self, depth: int) -> str | None:
        if not self.high and depth > self.threshold:
            self.high = True
            return "high"
        if self.high and depth <= self.threshold // 2:
            self.high = False
            return "normal"
        return None


class DeadLetterKeeper:
    def __init__(self, pool: asyncpg.Pool, bus: Bus, *, threshold: int = 100) -> None:
        self.pool = pool
        self.bus = bus
        self.alarm = DepthAlarm(threshold)
        self._groups_seen: set[str] = set()

    async def start(self) -> None:
        await self.bus.transport.subscribe("roost.dlq.>", KEEPER_GROUP, self._keep,
                                           ConsumerOptions(prefetch=50, max_attempts=1_000_000))
        await self.bus.serve("roost.cmd.dlq.>", COMMAND_GROUP, self.handle_command)
        await self._check_depth()

    async def _keep(self, delivery: RawDelivery) -> None:
        record = record_from(delivery.subject, delivery.message_id, delivery.headers, delivery.body)
        try:
            await self.pool.execute(
                """INSERT INTO core.dead_letters (message_id, consumer_group, subject, type, reason, attempts,
                                                  headers, body, dead_lettered_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8, $9)
                   ON CONFLICT (consumer_group, message_id, dead_lettered_at) DO NOTHING""",
                record.message_id, record.consumer_group, record.subject, record.type, record.reason,
                record.attempts, json.dumps(record.headers), record.body, record.dead_lettered_at)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("cannot store a dead letter yet; the broker keeps it", error=str(exc))
            await delivery.retry(backoff(delivery.attempt, cap=30.0))
            return
        await delivery.ack()
        log.warning("dead letter stored", group=record.consumer_group, subject=record.subject,
                    reason=record.reason)
        await self._check_depth()

    async def depth(self) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT consumer_group, count(*) AS n FROM core.dead_letters WHERE replayed_at IS NULL "
            "GROUP BY consumer_group")
        return {r["consumer_group"]: r["n"] for r in rows}

    async def _check_depth(self) -> None:
        groups = await self.depth()
        for group in self._groups_seen | set(groups):
            metrics.set_dead_letters_waiting(group, groups.get(group, 0))
        self._groups_seen |= set(groups)
        total = sum(groups.values())
        change = self.alarm.observe(total)
        if change == "high":
            await self.bus.publish(self.bus.envelope(
                "roost.system.dead_letters_high",
                DeadLettersHigh(depth=total, threshold=self.alarm.threshold, groups=groups)))
            await self.bus.publish(self.bus.envelope("roost.fault.set", {
                "alarm_id": DEPTH_ALARM_ID, "entity_instance_id": DEPTH_ALARM_ENTITY, "severity": "major",
                "reason_text": f"{total} dead letters waiting (threshold {self.alarm.threshold}): "
                               + ", ".join(f"{g} {n}" for g, n in sorted(groups.items()))[:180]}))
        elif change == "normal":
            await self.bus.publish(self.bus.envelope(
                "roost.system.dead_letters_normal", DeadLettersNormal(depth=total, threshold=self.alarm.threshold)))
            await self.bus.publish(self.bus.envelope("roost.fault.clear", {
                "alarm_id": DEPTH_ALARM_ID, "entity_instance_id": DEPTH_ALARM_ENTITY}))

    # -- operator commands ----------------------------------------------------------------

    async def handle_command(self, message: Message) -> dict[str, Any]:
        data = message.data
        if isinstance(data, DlqList):
            return (await self.list(data)).model_dump(mode="json")
        if isinstance(data, DlqShow):
            return (await self.show(data.id)).model_dump(mode="json")
        if isinstance(data, DlqReplay):
            return (await self.replay(data)).model_dump(mode="json")
        if isinstance(data, DlqPurge):
            return (await self.purge(data)).model_dump(mode="json")
        raise Reject(f"{message.envelope.type} is not a dead-letter command")

    async def list(self, query: DlqList) -> DlqListResult:
        rows = await self.pool.fetch(
            """SELECT id, consumer_group, subject, type, reason, attempts, dead_lettered_at
               FROM core.dead_letters WHERE replayed_at IS NULL AND ($1::text IS NULL OR consumer_group = $1)
               ORDER BY id LIMIT $2""", query.group, query.limit)
        return DlqListResult(items=[DeadLetterSummary(
            id=str(r["id"]), group=r["consumer_group"], subject=r["subject"], type=r["type"], reason=r["reason"],
            attempts=r["attempts"], dead_lettered_at=r["dead_lettered_at"]) for r in rows])

    async def show(self, id: str) -> DeadLetter:
        row = await self.pool.fetchrow("SELECT * FROM core.dead_letters WHERE id = $1", _row_id(id))
        if row is None:
            raise Reject(f"no dead letter {id}")
        try:
            envelope: dict[str, Any] | None = json.loads(bytes(row["body"]))
        except ValueError:
            envelope = None
        return DeadLetter(
            id=str(row["id"]), group=row["consumer_group"], subject=row["subject"], type=row["type"],
            reason=row["reason"], attempts=row["attempts"], dead_lettered_at=row["dead_lettered_at"],
            headers=json.loads(row["headers"]), envelope=envelope,
            body=None if envelope is not None else bytes(row["body"]).decode("utf-8", "replace"),
            replayed_at=row["replayed_at"], replay_count=row["replay_count"])

    async def replay(self, selection: DlqReplay) -> DlqReplayResult:
        replayed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT * FROM core.dead_letters WHERE replayed_at IS NULL AND {_where(selection)} "
                "ORDER BY id FOR UPDATE SKIP LOCKED", *_args(selection))
            for row in rows:
                # Published (and confirmed) before it is marked: a crash in between replays it twice,
                # which consumers' inboxes absorb; marking first could lose it.
                await self.bus.transport.publish(replay_message(row))
                await conn.execute("UPDATE core.dead_letters SET replayed_at = now(), replay_count = replay_count + 1 "
                                   "WHERE id = $1", row["id"])
                replayed += 1
        log.info("dead letters replayed", count=replayed)
        return DlqReplayResult(replayed=replayed)

    async def purge(self, selection: DlqPurge) -> DlqPurgeResult:
        status = await self.pool.execute(
            f"DELETE FROM core.dead_letters WHERE replayed_at IS NULL AND {_where(selection)}", *_args(selection))
        purged = int(status.split()[-1])
        log.info("dead letters purged", count=purged)
        await self._check_depth()
        return DlqPurgeResult(purged=purged)


def _row_id(id: str) -> int:
    try:
        return int(id)
    except ValueError:
        raise Reject(f"{id!r} is not a dead-letter id (a number, as `roost dlq list` shows)") from None


def _where(selection: DlqReplay | DlqPurge) -> str:
    if selection.all:
        return "TRUE"
    if selection.ids:
        return "id = ANY($1::bigint[])"
    return "consumer_group = $1"


def _args(selection: DlqReplay | DlqPurge) -> list[Any]:
    if selection.all:
        return []
    if selection.ids:
        return [[_row_id(i) for i in selection.ids]]
    return [selection.group]
