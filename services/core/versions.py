"""Never let an older state overwrite a newer one.

Events about one entity (``schemas.envelope.EntityEvent``) carry a ``version`` that only grows.  Brokers
redeliver and, across retries, reorder; a consumer that keeps state about an entity asks ``advance``
inside the transaction that applies the event: ``True`` means this version is newer than anything it
applied before (apply it), ``False`` that it is stale or a duplicate (skip it, ack it).  Concurrent
transactions on one entity serialise on the row, so the newest version wins whatever order they commit in.
"""

from __future__ import annotations

from services.core.db.pool import AnyConnection


def is_newer(applied: int | None, incoming: int) -> bool:
    """The pure rule: apply ``incoming`` only over nothing or an older version."""
    return applied is None or incoming > applied


async def advance(conn: AnyConnection, consumer: str, entity_type: str, entity_id: str, version: int) -> bool:
    """Record ``version`` for the entity if it is newer than the one this consumer applied; say whether it was.

    Call it inside the consumer's transaction, before applying the event.
    """
    if version < 1:
        raise ValueError(f"entity versions start at 1, got {version}")
    applied = await conn.fetchval(
        """INSERT INTO core.entity_versions AS v (consumer, entity_type, entity_id, version)
           VALUES ($1, $2, $3, $4)
           ON CONFLICT (consumer, entity_type, entity_id)
           DO UPDATE SET version = EXCLUDED.version, updated_at = now() WHERE v.version < EXCLUDED.version
           RETURNING true""", consumer, entity_type, entity_id, version)
    return bool(applied)


async def applied_version(conn: AnyConnection, consumer: str, entity_type: str, entity_id: str) -> int | None:
    value = await conn.fetchval(
        "SELECT version FROM core.entity_versions WHERE consumer = $1 AND entity_type = $2 AND entity_id = $3",
        consumer, entity_type, entity_id)
    return int(value) if value is not None else None
