"""Subscriptions and the durable delivery queue, in PostgreSQL schema ``alarms``.

* Subscriptions: ``create_subscription`` / ``get_subscription`` / ``list_subscriptions`` /
  ``delete_subscription``; the returned ``Subscription`` never holds a secret.  Secrets are stored as
  given (we must sign with them), read only by the dispatcher, and registered with
  ``services.core.logging.register_secret`` whenever they pass through this module, so a log line that
  would quote one shows ``***``.  Rotation: ``add_secret`` (both old and new sign from then on),
  ``retire_secret`` once every receiver has the new one (the last secret cannot be retired).
* ``enqueue(conn, notification)``: inside the caller's transaction (the alarm change's), one delivery
  row per matching subscription, body rendered in the subscription's format.  A ``NOTIFY`` at commit
  wakes the dispatchers.  The same notification id enqueued twice is kept once.
* ``replay(conn, subscription_id, ...)``: dead-lettered deliveries become pending again, same
  ``webhook-id`` and body, retry clock restarted.

Filters (``Filters.matches``): severities and alarm ids are sets (empty = any); the entity prefix matches
whole ``.``-separated segments: ``host=controller-1`` matches ``host=controller-1`` and
``host=controller-1.port=x``, never ``host=controller-10``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

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
                                         max_age_seconds)
            VALUES ($1, $2, $3, ARRAY[$4::text], $5, $6, $7, $8, $9) RETURNING {_SUB_COLUMNS}""",
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
    status = await conn.execute(f"DELETE FROM {SUBSCRIPTIONS} WHERE id = $1", _uuid(subscription_id))
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


async def enqueue(conn: AnyConnection, notification: Notification, *, external_url: str = "") -> int:
    """Queue ``notification`` for every matching subscriber, in the caller's transaction.

    Returns how many deliveries were queued (0 when none matches or this id was queued before).
    """
    if not conn.is_in_transaction():
        raise RuntimeError("enqueue needs the caller's transaction: call it inside `async with "
                           "conn.transaction():` with the alarm change it announces")
    subs = await list_subscriptions(conn)
    matching = [s for s in subs if s.filters.matches(notification)]
    if not matching:
        return 0
    bodies = [render(notification, s.format, receiver=s.name, external_url=external_url) for s in matching]
    count: int = await conn.fetchval(
        f"""WITH ins AS (
                INSERT INTO {DELIVERIES} (subscription_id, webhook_id, ordering_key, event_type, body)
                SELECT s, $2, $3, $4, b FROM unnest($1::uuid[], $5::bytea[]) WITH ORDINALITY AS t(s, b, n)
                ORDER BY n
                ON CONFLICT (subscription_id, webhook_id) DO NOTHING
                RETURNING 1)
            SELECT count(*) FROM ins""",
        [uuid.UUID(s.id) for s in matching], notification.id, notification.instance_key, notification.type,
        bodies)
    if count:
        await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
    return count


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
    """Pending deliveries per subscription id (every subscription, 0 included)."""
    rows = await conn.fetch(
        f"""SELECT s.id, count(d.id) AS pending FROM {SUBSCRIPTIONS} s
            LEFT JOIN {DELIVERIES} d ON d.subscription_id = s.id AND d.state = 'pending'
            GROUP BY s.id""")
    return {str(r["id"]): int(r["pending"]) for r in rows}


async def purge_delivered(conn: Executor, older_than: float) -> int:
    """Delete delivered rows older than ``older_than`` seconds (dead letters stay until replayed or removed)."""
    status = await conn.execute(
        f"DELETE FROM {DELIVERIES} WHERE state = 'delivered' AND delivered_at < now() - make_interval(secs => $1)",
        float(older_than))
    return int(status.split()[-1])
