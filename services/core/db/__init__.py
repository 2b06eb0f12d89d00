"""PostgreSQL access shared by every roost service.

* ``pool``: ``create_pool(url)`` (bounded connect, ``DatabaseUnavailable`` without the password),
  ``ping(pool)`` for readiness;
* ``migrations``: ``migrate(pool, schema, directory)``, versioned per service schema;
* ``outbox`` / ``relay``: the transactional outbox and the relay that publishes it with confirms;
* ``inbox``: drop duplicate deliveries per consumer, inside the consumer's transaction;
* ``idempotency``: a command's idempotency key executes once;
* ``retention``: purge sent outbox rows, old inbox entries and idempotency records.
"""

from services.core.db.idempotency import (
    CommandInProgress,
    IdempotencyKeyReused,
    IdempotencyStore,
    MemoryIdempotencyStore,
    PgIdempotencyStore,
)
from services.core.db.inbox import Inbox
from services.core.db.migrations import CORE_MIGRATIONS, ChecksumMismatch, MigrationError, migrate
from services.core.db.outbox import Outbox, OutboxError
from services.core.db.pool import DatabaseUnavailable, create_pool, ping
from services.core.db.relay import OutboxRelay, RelayLag, RelayStats
from services.core.db.retention import Retention, RetentionPolicy, purge

__all__ = [
    "CORE_MIGRATIONS",
    "ChecksumMismatch",
    "CommandInProgress",
    "DatabaseUnavailable",
    "IdempotencyKeyReused",
    "IdempotencyStore",
    "Inbox",
    "MemoryIdempotencyStore",
    "MigrationError",
    "Outbox",
    "OutboxError",
    "OutboxRelay",
    "PgIdempotencyStore",
    "RelayLag",
    "RelayStats",
    "Retention",
    "RetentionPolicy",
    "create_pool",
    "migrate",
    "ping",
    "purge",
]
