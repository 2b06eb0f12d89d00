"""Subscriptions and the durable delivery queue, in PostgreSQL schema ``alarms``.

* Subscriptions: ``create_subscription`` / ``get_subscription`` / ``list_subscriptions`` /
  ``delete_subscription``; the returned ``Subscription`` never holds a secret.  Secrets are stored as
  given (we must sign with them), read only by the dispatcher, and registered with
  ``services.core.logging.register_secret`` whenever they pass through this module, so a log line that
  would quote one shows ``***``.  Rotation: ``add_secret`` (both old and new sign from then on),
  ``retire_secret`` once every receiver has the new one (the last secret cannot be retired).
* ``enqueue(conn, notification)`` (and ``insert_notifications`` for many): inside the caller's
  transaction (the alarm change's), ONE ``webhook_notifications`` row, its body rendered once in roost's
  format.  A ``NOTIFY`` at commit wakes the dispatchers.  The same notification id enqueued twice is kept
  once.  Nothing is written while no subscription exists (a new subscription gets what follows it).
* ``fan_out(pool)`` (the dispatcher runs it): turns committed notifications into delivery rows, for each
  subscription whose filters match, inside PostgreSQL (``INSERT ... SELECT``), and moves each
  subscription's cursor (``fanned_out_seq``) in the same transaction.  Rows are made in notification
  order, so the order per (subscription, alarm instance) is the order of the alarm changes.  One
  replica fans out a subscription at a time (its row ``FOR NO KEY UPDATE SKIP LOCKED``).
* ``replay(conn, subscription_id, ...)``: dead-lettered deliveries become pending again, same
  ``webhook-id`` and body, retry clock restarted.

Why the fan-out never skips a notification: seqs are handed out in the order writers insert, not in
the order they commit, so a cursor moved past the highest committed seq could pass a lower one still to
commit.  Writers therefore take ``pg_advisory_xact_lock_shared(FANOUT_LOCK)`` before they take a seq
(writers never wait for each other), and the fan-out, having read the last seq handed out, takes the
same key exclusively for an instant (``pg_try_advisory_xact_lock`` in the same autocommit statement, or
failing that, waiting for it at most half a second): once it has it, every transaction that took a seq
up to that one has committed or rolled back.

Filters (``Filters.matches``, and the same rule in SQL in the fan-out): severities and alarm ids are sets
(empty = any); the entity prefix matches whole ``.``-separated segments: ``host=controller-1`` matches
``host=controller-1`` and ``host=controller-1.port=x``, never ``host=controller-10``.  The fan-out applies
a subscription's filters as they are when it runs (milliseconds after the change, normally).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import asyncpg

from services.alarms.webhooks.formats import SEVERITIES, Format, Notification, render
from services.alarms.webhooks.signing import WebhookSecretError, check_secret, generate_secret
from services.core.db.pool import AnyConnection, redact_url
from services.core.logging import register_secret

# Where a function needs no transaction of its own: a connection of the caller's or the pool.
Executor = AnyConnection | asyncpg.Pool

SCHEMA = "alarms"
NOTIFY_CHANNEL = "roost_webhooks_alarms"
DEFAULT_MAX_AGE = 24 * 3600.0
SUBSCRIPTIONS = f"{SCHEMA}.webhook_subscriptions"
DELIVERIES = f"{SCHEMA}.webhook_deliveries"
NOTIFICATIONS = f"{SCHEMA}.webhook_notifications"
# pg_advisory_xact_lock key: writers of notifications hold it shared, the fan-out takes it exclusively
FANOUT_LOCK = 0x726F6F73745F6E66    # "roost_nf"
FANOUT_CHUNK = 20_000               # notifications per subscription per fan-out statement
_LAST_SEQ = f"SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('{NOTIFICATIONS}', 'seq')), 0)"

# Whether notification ``n`` passes subscription ``s``'s filters (the rule of ``Filters.matches``).
MATCHES = """(cardinality(s.severities) = 0 OR n.severity = ANY(s.severities))
             AND (cardinality(s.alarm_ids) = 0 OR n.alarm_id = ANY(s.alarm_ids))
             AND (s.entity_prefix IS NULL OR n.entity_instance_id = s.entity_prefix
                  OR starts_with(n.entity_instance_id, s.entity_prefix || '.'))"""


class SubscriptionError(ValueError):
    """A subscription request is invalid or names an unknown subscription."""


class UnknownSubscription(SubscriptionError):
    pass


def entity_matches(prefix: str | None, entity_instance_id: str) -> bool:
    """Segment-wise prefix match of entity instance ids; pure."""
    if not prefix:
        return True
    return entity_instance_id == prefix or entity_instance_id.startswith(prefix + ".")


@dataclass(frozen=True, slots=True)
class Filters:
    severities: frozenset[str] = frozenset()
    alarm_ids: frozenset[str] = frozenset()
    entity_prefix: str | None = None

    def matches(self, notification: Notification) -> bool:
        alarm = notification.alarm
        return ((not self.severities or alarm.severity in self.severities)
                and (not self.alarm_ids or alarm.alarm_id in self.alarm_ids)
                and entity_matches(self.entity_prefix, alarm.entity_instance_id))


@dataclass(frozen=True, slots=True)
class Subscription:
    """A subscription as list APIs show it: no secrets (``secret_count`` says how many sign), and a
    password in the URL (``https://user:password@host/``) shown as ``***``."""

    id: str
    name: str
    url: str
    format: Format
    filters: Filters
    max_age: float
    secret_count: int
    failing: bool
    failing_reason: str | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    subscription_id: str
    webhook_id: str
    event_type: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    dead_at: datetime | None


_SUB_COLUMNS = ("id, name, url, format, severities, alarm_ids, entity_prefix, max_age_seconds, "
                "cardinality(secrets) AS secret_count, failing, failing_reason, created_at")


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=str(row["id"]), name=row["name"], url=redact_url(row["url"]), format=Format(row["format"]),
        filters=Filters(frozenset(row["severities"]), frozenset(row["alarm_ids"]), row["entity_prefix"]),
        max_age=float(row["max_age_seconds"]), secret_count=row["secret_count"], failing=row["failing"],
        failing_reason=row["failing_reason"], created_at=row["created_at"])


def _check_url(url: str) -> str:
    if not (url.startswith("http://") or url.startswith("https://")) or len(url) > 2048:
        raise SubscriptionError("a webhook URL must be http:// or https:// (at most 2048 characters)")
    return url


def _check_filters(severities: Iterable[str], alarm_ids: Iterable[str], entity_prefix: str | None) -> Filters:
    sev = frozenset(severities)
    unknown = sorted(sev - set(SEVERITIES))
    if unknown:
        raise SubscriptionError(f"unknown severities {unknown}: expected some of {list(SEVERITIES)}")
    if entity_prefix is not None and (not entity_prefix or entity_prefix.endswith(".")):
        raise SubscriptionError("an entity prefix is whole key=value segments, e.g. host=controller-1")
    return Filters(sev, frozenset(alarm_ids), entity_prefix)


def _checked_secret(secret: str | None) -> str:
    """``secret`` (or a new one) if usable, registered for masking; else ``SubscriptionError`` (no secret in it)."""
    if secret is None:
        secret = generate_secret()
    else:
        register_secret(secret)
        try:
            check_secret(secret)
        except WebhookSecretError as exc:
            raise SubscriptionError(str(exc)) from None
    register_secret(secret)
    return secret


def _uuid(subscription_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(subscription_id))
    except ValueError:
        raise UnknownSubscription(f"no webhook subscription {subscription_id!r}") from None


async def create_subscription(conn: Executor, url: str, *, secret: str | None = None, name: str | None = None,
                              severities: Iterable[str] = (), alarm_ids: Iterable[str] = (),
                              entity_prefix: str | None = None, format: Format | str = Format.ROOST,
                              max_age: float = DEFAULT_MAX_AGE) -> tuple[Subscription, str]:
    """Register a subscriber.  Returns it and its secret (generated when none is given: show it once)."""
    filters = _check_filters(severities, alarm_ids, entity_prefix)
    try:
        kind = Format(format)
    except ValueError:
        raise SubscriptionError(f"unknown format {format!r}: expected roost or alertmanager") from None
    if not max_age > 0:
        raise SubscriptionError("max_age must be positive")
    secret = _checked_secret(secret)
    sub_id = uuid.uuid4()
    row = await conn.fetchrow(
        f"""INSERT INTO {SUBSCRIPTIONS} (id, name, url, secrets, severities, alarm_ids, entity_prefix, format,
                                         max_age_seconds, fanned_out_seq)
            VALUES ($1, $2, $3, ARRAY[$4::text], $5, $6, $7, $8, $9, ({_LAST_SEQ})) RETURNING {_SUB_COLUMNS}""",
        sub_id, name or str(sub_id), _check_url(url), secret, sorted(filters.severities),
        sorted(filters.alarm_ids), filters.entity_prefix, kind.value, float(max_age))
    assert row is not None
    return _subscription(row), secret


async def get_subscription(conn: Executor, subscription_id: str) -> Subscription:
    row = await conn.fetchrow(f"SELECT {_SUB_COLUMNS} FROM {SUBSCRIPTIONS} WHERE id = $1", _uuid(subscription_id))
    if row is None:
        raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")
    return _subscription(row)


async def list_subscriptions(conn: Executor) -> list[Subscription]:
    rows = await conn.fetch(f"SELECT {_SUB_COLUMNS} FROM {SUBSCRIPTIONS} ORDER BY created_at, id")
    return [_subscription(r) for r in rows]


async def delete_subscription(conn: Executor, subscription_id: str) -> bool:
    """Remove a subscriber and its queued deliveries.  False when it did not exist."""
    sub = _uuid(subscription_id)
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own, own.transaction():
            return await _delete_subscription(own, sub)
    if not conn.is_in_transaction():
        async with conn.transaction():
            return await _delete_subscription(conn, sub)
    return await _delete_subscription(conn, sub)


async def _delete_subscription(conn: AnyConnection, sub: uuid.UUID) -> bool:
    # The subscription first (a fan-out holding its row finishes first), then its deliveries, in a
    # statement of its own so that it sees the rows that fan-out made.
    status = await conn.execute(f"DELETE FROM {SUBSCRIPTIONS} WHERE id = $1", sub)
    await conn.execute(f"DELETE FROM {DELIVERIES} WHERE subscription_id = $1", sub)
    return bool(status == "DELETE 1")


async def add_secret(conn: Executor, subscription_id: str, secret: str | None = None) -> str:
    """Start a rotation: ``secret`` (or a new one, returned) signs alongside the current ones."""
    secret = _checked_secret(secret)
    status = await conn.execute(
        f"""UPDATE {SUBSCRIPTIONS} SET secrets = array_append(array_remove(secrets, $2), $2), updated_at = now()
            WHERE id = $1""", _uuid(subscription_id), secret)
    if status != "UPDATE 1":
        raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")
    return secret


async def retire_secret(conn: Executor, subscription_id: str, secret: str) -> None:
    """End a rotation: ``secret`` no longer signs.  The last secret of a subscription cannot be retired."""
    register_secret(secret)
    row = await conn.fetchrow(
        f"""UPDATE {SUBSCRIPTIONS} SET secrets = array_remove(secrets, $2), updated_at = now()
            WHERE id = $1 AND $2 = ANY(secrets) AND cardinality(secrets) > 1 RETURNING id""",
        _uuid(subscription_id), secret)
    if row is None:
        current = await get_subscription(conn, subscription_id)
        if current.secret_count <= 1:
            raise SubscriptionError("cannot retire the only secret: add the new one first")
        raise SubscriptionError("that secret is not one of this subscription's")


async def update_filters(conn: Executor, subscription_id: str, *, severities: Iterable[str] = (),
                         alarm_ids: Iterable[str] = (), entity_prefix: str | None = None) -> Subscription:
    filters = _check_filters(severities, alarm_ids, entity_prefix)
    row = await conn.fetchrow(
        f"""UPDATE {SUBSCRIPTIONS} SET severities = $2, alarm_ids = $3, entity_prefix = $4, updated_at = now()
            WHERE id = $1 RETURNING {_SUB_COLUMNS}""",
        _uuid(subscription_id), sorted(filters.severities), sorted(filters.alarm_ids), filters.entity_prefix)
    if row is None:
        raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")
    return _subscription(row)


def notification_values(notification: Notification, body: bytes | None = None) -> tuple[object, ...]:
    """One ``webhook_notifications`` row (``insert_notifications``); ``body``: its roost rendering, if done."""
    alarm = notification.alarm
    return (notification.id, notification.instance_key, notification.type, alarm.alarm_id, alarm.severity,
            alarm.entity_instance_id, body if body is not None else render(notification, Format.ROOST))


# The rows in the order given (seqs follow it), and a NOTIFY (sent at commit) when any was new.
_INSERT_NOTIFICATIONS = f"""
    WITH ins AS (
        INSERT INTO {NOTIFICATIONS} (webhook_id, ordering_key, event_type, alarm_id, severity, entity_instance_id,
                                     body)
        SELECT w, k, e, a, s, i, b
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bytea[])
             WITH ORDINALITY AS t(w, k, e, a, s, i, b, n)
        ORDER BY n
        ON CONFLICT (webhook_id) DO NOTHING
        RETURNING 1)
    SELECT c.n, CASE WHEN c.n > 0 THEN pg_notify($8, '') END
    FROM (SELECT count(*) AS n FROM ins) c"""


LOCK_FOR_NOTIFICATIONS = f"pg_advisory_xact_lock_shared({FANOUT_LOCK})"


async def lock_for_notifications(conn: AnyConnection) -> None:
    """Take the writers' (shared) fan-out lock for the rest of the caller's transaction: call it before
    inserting notifications (``insert_notifications`` does unless told it is done: a caller may take it
    in a statement of its own, selecting ``LOCK_FOR_NOTIFICATIONS``)."""
    await conn.execute(f"SELECT {LOCK_FOR_NOTIFICATIONS}")


async def insert_notifications(conn: AnyConnection, rows: Sequence[tuple[object, ...]], *,
                               locked: bool = False) -> int:
    """Insert ``rows`` (``notification_values``) in order, in the caller's transaction, under the writers'
    fan-out lock (taken here unless ``locked``), and wake the dispatchers at commit.  Returns how many
    were new (a notification id already queued is kept once)."""
    if not conn.is_in_transaction():
        raise RuntimeError("notifications need the caller's transaction: call it inside `async with "
                           "conn.transaction():` with the alarm change they announce")
    if not rows:
        return 0
    if not locked:
        await lock_for_notifications(conn)
    count: int = await conn.fetchval(_INSERT_NOTIFICATIONS, *[[row[i] for row in rows] for i in range(7)],
                                     NOTIFY_CHANNEL)
    return count


async def enqueue(conn: AnyConnection, notification: Notification) -> int:
    """Queue ``notification`` for every matching subscriber, in the caller's transaction.

    Writes one notification row (the fan-out makes the deliveries).  Returns how many subscribers it is
    for as the subscriptions stand now (0 when none matches or this id was queued before).
    """
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue needs the caller's transaction: call it inside `async with "
                           "conn.transaction():` with the alarm change it announces")
    alarm = notification.alarm
    matching: int = await conn.fetchval(
        f"""SELECT count(*) FROM {SUBSCRIPTIONS} s,
                   (SELECT $1::text AS severity, $2::text AS alarm_id, $3::text AS entity_instance_id) n
            WHERE {MATCHES}""", alarm.severity, alarm.alarm_id, alarm.entity_instance_id)
    if not matching:
        return 0
    if not await insert_notifications(conn, [notification_values(notification)]):
        return 0
    return matching


def _pending_in_window(subscription: str, ahead: str) -> str:
    """SQL: how many of subscription ``subscription``'s pending delivery rows there are, counted up to ``ahead``
    (the window), by the queue index (``id + 0``: the order only that index gives)."""
    return (f"(SELECT count(*) FROM (SELECT 1 FROM {DELIVERIES} d WHERE d.subscription_id = {subscription}.id "
            f"AND d.state = 'pending' ORDER BY d.id + 0 LIMIT {ahead}::bigint) p)")


# The fan-out of (cursor, hw] for every subscription behind (and not being fanned out by another
# replica), in chunks of FANOUT_CHUNK seqs: delivery rows in notification order, cursors moved, one statement.
# With $3 (ahead) not NULL, a subscription's cursor moves at most as many seqs as it has room for below
# $3 pending delivery rows (its filters may skip some of those seqs: never more rows than room); `more`
# says a chunk ended before hw (call again), not that a subscription's window is full: `full` says that (its
# cursor stays below hw for want of room: deliveries that end make room, and only then is a fan-out needed again
# without a new notification).
_FAN_OUT = f"""
    WITH b AS (
        SELECT id, fanned_out_seq AS lo, severities, alarm_ids, entity_prefix,
               CASE WHEN $3::bigint IS NULL THEN $2::bigint
                    ELSE least($2::bigint, greatest(0, $3::bigint - {_pending_in_window("u", "$3")})) END AS room
        FROM {SUBSCRIPTIONS} u WHERE fanned_out_seq < $1 ORDER BY id FOR NO KEY UPDATE SKIP LOCKED),
    s AS (
        SELECT id, lo, least($1::bigint, lo + room) AS hi, room, severities, alarm_ids, entity_prefix
        FROM b WHERE room > 0),
    ins AS (
        INSERT INTO {DELIVERIES} (subscription_id, notification_seq, webhook_id, ordering_key, event_type,
                                  created_at)
        SELECT s.id, n.seq, n.webhook_id, n.ordering_key, n.event_type, n.created_at
        FROM s JOIN {NOTIFICATIONS} n ON n.seq > s.lo AND n.seq <= s.hi
        WHERE {MATCHES}
        ORDER BY n.seq, s.id
        RETURNING 1),
    upd AS (
        UPDATE {SUBSCRIPTIONS} AS u SET fanned_out_seq = s.hi FROM s WHERE u.id = s.id RETURNING s.hi, s.lo, s.room)
    SELECT (SELECT count(*) FROM ins) AS made, (SELECT count(*) FROM upd) AS subscriptions,
           coalesce((SELECT bool_or(hi < $1 AND room = $2) FROM upd), false) AS more,
           coalesce((SELECT bool_or(lo + room < $1) FROM b), false) AS full,
           (SELECT count(*) FROM {SUBSCRIPTIONS} WHERE fanned_out_seq < $1) > (SELECT count(*) FROM b) AS skipped"""


# The last seq handed out, when some subscription's cursor is behind it; whether one of those has room in its
# window ($2 pending delivery rows; NULL: no window); and (only then, so after that seq was read) whether the
# writers' lock was free at that instant: one round trip in the usual case.  When every subscription behind
# has its window full, the fan-out can make nothing, so it takes no lock: the writers' lock taken exclusively
# holds up every alarm transaction for an instant, and a subscriber that is down (its window full) would
# otherwise have that happen at every commit, for nothing (the end of a delivery calls the fan-out again).
_FAN_OUT_CHECK = f"""
    SELECT h.hw, CASE WHEN h.room THEN pg_try_advisory_xact_lock($1) END AS clear, h.room
    FROM (SELECT x.hw, EXISTS (
                 SELECT 1 FROM {SUBSCRIPTIONS} s
                 WHERE s.fanned_out_seq < x.hw
                   AND ($2::bigint IS NULL OR {_pending_in_window("s", "$2")} < $2)
             ) AS room
          FROM (SELECT ({_LAST_SEQ}) AS hw) x) h
    WHERE EXISTS (SELECT 1 FROM {SUBSCRIPTIONS} WHERE fanned_out_seq < h.hw)"""
# Waiting for the writers' lock (then releasing it), bounded: a writer's transaction left open must not
# hold up the other writers, which queue behind this request while it waits.
_BARRIER_WAIT = f"""BEGIN; SET LOCAL lock_timeout = '500ms'; SELECT pg_advisory_xact_lock({FANOUT_LOCK}); COMMIT"""


async def fan_out(conn: asyncpg.Pool | AnyConnection, *, chunk: int = FANOUT_CHUNK, ahead: int | None = None) -> int:
    """Make the delivery rows of every committed notification not yet fanned out; returns how many.

    On a connection outside any transaction (the barrier must not keep the lock), or the pool's.
    Subscriptions another replica is fanning out at this moment are left to it.  When writers still
    hold seqs up to the last one handed out, waits for them at most half a second (then makes nothing:
    call again).  With ``ahead``, only as far as each subscription has fewer than ``ahead`` pending
    delivery rows (the dispatcher's way: the rows are made as the sending needs them; the notifications
    beyond stay queued, durably, behind the subscription's cursor).
    """
    return (await fan_out_once(conn, chunk=chunk, ahead=ahead)).made


class FanOut(NamedTuple):
    made: int           # delivery rows made
    again: bool         # call again soon: a writer kept its seq past the wait, or a subscription was busy
    full: bool          # a subscription's window is full with notifications behind its cursor (or not known)


async def fan_out_once(conn: asyncpg.Pool | AnyConnection, *, chunk: int = FANOUT_CHUNK,
                       ahead: int | None = None) -> FanOut:
    """``fan_out``; also whether to call again soon: a writer kept its seq past the wait, or a subscription
    was locked (by another replica's fan-out, or an update of its row) and left for later; and whether a
    window (``ahead``) kept a cursor back, so that deliveries ending (making room) call for a fan-out."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as own:
            return await fan_out_once(own, chunk=chunk, ahead=ahead)
    check = await conn.fetchrow(_FAN_OUT_CHECK, FANOUT_LOCK, ahead)
    if check is None:
        return FanOut(0, False, False)
    if not check["room"]:
        return FanOut(0, False, True)
    hw = int(check["hw"])
    if not check["clear"]:
        try:
            await conn.execute(_BARRIER_WAIT)
        except asyncpg.LockNotAvailableError:
            return FanOut(0, True, True)
        finally:
            # An error inside the barrier's BEGIN ... COMMIT leaves its transaction open and aborted, and the
            # connection refusing every later statement: end it (a held connection is used again).
            if conn.is_in_transaction():
                await conn.execute("ROLLBACK")
    made = 0
    while True:
        row = await conn.fetchrow(_FAN_OUT, hw, chunk, ahead)
        assert row is not None
        made += int(row["made"])
        if not row["more"]:
            return FanOut(made, bool(row["skipped"]), bool(row["full"]))


async def replay(conn: Executor, subscription_id: str, *, webhook_ids: Sequence[str] | None = None,
                 since: datetime | None = None) -> int:
    """Queue dead-lettered deliveries of a subscription again (all, or those ids, or dead since ``since``).

    Same ``webhook-id`` and body; their retry clock (max age) starts again now.  Returns how many.
    """
    sub = _uuid(subscription_id)
    await get_subscription(conn, subscription_id)
    status = await conn.execute(
        f"""UPDATE {DELIVERIES}
            SET state = 'pending', available_at = now(), created_at = now(), claim_token = NULL,
                claimed_until = NULL, dead_at = NULL, replays = replays + 1
            WHERE subscription_id = $1 AND state = 'dead'
              AND ($2::text[] IS NULL OR webhook_id = ANY($2::text[]))
              AND ($3::timestamptz IS NULL OR dead_at >= $3)""",
        sub, list(webhook_ids) if webhook_ids is not None else None, since)
    count = int(status.split()[-1])
    if count:
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return count


async def dead_letters(conn: Executor, subscription_id: str, *, limit: int = 100) -> list[DeadLetter]:
    rows = await conn.fetch(
        f"""SELECT id, subscription_id, webhook_id, event_type, attempts, last_status, last_error, created_at,
                   dead_at
            FROM {DELIVERIES} WHERE subscription_id = $1 AND state = 'dead' ORDER BY id LIMIT $2""",
        _uuid(subscription_id), limit)
    return [DeadLetter(id=r["id"], subscription_id=str(r["subscription_id"]), webhook_id=r["webhook_id"],
                       event_type=r["event_type"], attempts=r["attempts"], last_status=r["last_status"],
                       last_error=r["last_error"], created_at=r["created_at"], dead_at=r["dead_at"])
            for r in rows]


async def queue_depth(conn: Executor) -> dict[str, int]:
    """Deliveries waiting per subscription id (every subscription, 0 included): its pending delivery rows
    plus the notifications after its cursor that its filters match (not fanned out yet)."""
    rows = await conn.fetch(
        f"""SELECT s.id,
                   (SELECT count(*) FROM {DELIVERIES} d WHERE d.subscription_id = s.id AND d.state = 'pending')
                   + (SELECT count(*) FROM {NOTIFICATIONS} n WHERE n.seq > s.fanned_out_seq AND {MATCHES})
                   AS pending
            FROM {SUBSCRIPTIONS} s""")
    return {str(r["id"]): int(r["pending"]) for r in rows}


async def purge_delivered(conn: Executor, older_than: float) -> int:
    """Delete delivered rows older than ``older_than`` seconds (dead letters stay until replayed or removed)."""
    status = await conn.execute(
        f"DELETE FROM {DELIVERIES} WHERE state = 'delivered' AND delivered_at < now() - make_interval(secs => $1)",
        float(older_than))
    return int(status.split()[-1])


async def purge_notifications(conn: Executor) -> int:
    """Delete the notifications no subscription needs any more: fanned out to every subscription (at or
    below every cursor), referenced by no pending delivery and no dead letter.  Returns how many."""
    status = await conn.execute(
        f"""DELETE FROM {NOTIFICATIONS} n
            WHERE n.seq <= (SELECT coalesce(min(fanned_out_seq), ({_LAST_SEQ})) FROM {SUBSCRIPTIONS})
              AND n.seq < coalesce((SELECT min(notification_seq) FROM {DELIVERIES} WHERE state = 'pending'),
                                   9223372036854775807)
              AND NOT EXISTS (SELECT 1 FROM {DELIVERIES} d WHERE d.notification_seq = n.seq AND d.state = 'dead')""")
    return int(status.split()[-1])
