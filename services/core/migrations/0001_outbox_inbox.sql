-- Messaging tables: the transactional outbox, the inbox, and command idempotency records.
--
-- core.ensure_outbox_inbox(schema) creates <schema>.outbox and <schema>.inbox (idempotent).  It is how
-- every service gets its own: the service's first migration is the one line
--     SELECT core.ensure_outbox_inbox('inventory');
-- (core is migrated first; `roost up` and the service runner do that).  The function runs with the
-- caller's rights, so the tables belong to the service's own role.
--
-- outbox: one row per message to publish.  The relay picks rows WHERE sent_at IS NULL with
-- FOR UPDATE SKIP LOCKED (never "id > last seen": ids are allocated before commit and commit out of
-- order), publishes them with broker confirmation, then sets sent_at.  `id` orders the rows of one
-- ordering_key (the entity the event is about, else the subject).  `body` is the exact bytes sent.
-- inbox: (consumer, message_id) of every message a consumer has handled, to drop redeliveries.

CREATE OR REPLACE FUNCTION core.ensure_outbox_inbox(target_schema text) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', target_schema);
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %1$I.outbox (
            id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            message_id   text        NOT NULL UNIQUE,
            subject      text        NOT NULL,
            ordering_key text        NOT NULL,
            headers      jsonb       NOT NULL DEFAULT '{}'::jsonb,
            body         bytea       NOT NULL,
            created_at   timestamptz NOT NULL DEFAULT now(),
            available_at timestamptz NOT NULL DEFAULT now(),
            attempts     integer     NOT NULL DEFAULT 0,
            last_error   text,
            sent_at      timestamptz
        )$ddl$, target_schema);
    EXECUTE format('CREATE INDEX IF NOT EXISTS outbox_pending ON %I.outbox (id) WHERE sent_at IS NULL',
                   target_schema);
    EXECUTE format('CREATE INDEX IF NOT EXISTS outbox_pending_key ON %I.outbox (ordering_key, id) '
                   'WHERE sent_at IS NULL', target_schema);
    EXECUTE format('CREATE INDEX IF NOT EXISTS outbox_sent ON %I.outbox (sent_at) WHERE sent_at IS NOT NULL',
                   target_schema);
    EXECUTE format($ddl$
        CREATE TABLE IF NOT EXISTS %1$I.inbox (
            consumer    text        NOT NULL,
            message_id  text        NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (consumer, message_id)
        )$ddl$, target_schema);
    EXECUTE format('CREATE INDEX IF NOT EXISTS inbox_received ON %I.inbox (received_at)', target_schema);
END
$fn$;

SELECT core.ensure_outbox_inbox('core');

-- Command idempotency: the first execution's reply per idempotency key.  A row is inserted (reply NULL)
-- in a transaction held open while the command runs, so a concurrent execution of the same key waits
-- on it; the reply is set before commit.  A crash rolls the claim back and a redelivery runs again.
CREATE TABLE IF NOT EXISTS core.idempotency (
    key          text        PRIMARY KEY,
    command_type text        NOT NULL,
    reply        jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    completed_at timestamptz
);
CREATE INDEX IF NOT EXISTS idempotency_created ON core.idempotency (created_at);
