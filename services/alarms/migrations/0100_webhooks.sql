-- Webhook subscriptions and the durable delivery queue (services/alarms/webhooks).
--
-- webhook_subscriptions: where to send, the signing secrets (whsec_ form; more than one during a
-- rotation; never returned by list APIs, never logged), the filters (empty array / NULL = any), the
-- rendering format and how long a delivery may keep retrying (max_age_seconds).  `failing` is set when a
-- delivery is dead-lettered and cleared by a later success once no dead letter is left.
-- consecutive_failures / paused_until: the endpoint's circuit breaker.  A retryable failure (network
-- error, timeout, 5xx, 429) pauses the whole subscription for the retry delay, growing with the count; a
-- 2xx resets both.  While paused no delivery of the subscription is claimed.
--
-- webhook_deliveries: one row per (notification, matching subscription), written in the alarm change's
-- own transaction.  `id` orders the rows of one (subscription_id, ordering_key = alarm instance); only
-- the lowest pending id of such a pair may be sent.  A dispatcher claims a row (claim_token,
-- claimed_until = lease) in a short transaction with FOR UPDATE SKIP LOCKED, sends without holding a
-- lock, then records the outcome if its claim still holds.  A dispatcher that dies leaves the claim to
-- expire; the row is sent again with the same webhook_id.

CREATE TABLE IF NOT EXISTS webhook_subscriptions (
    id              uuid PRIMARY KEY,
    name            text        NOT NULL,
    url             text        NOT NULL,
    secrets         text[]      NOT NULL CHECK (cardinality(secrets) >= 1),
    severities      text[]      NOT NULL DEFAULT '{}',
    alarm_ids       text[]      NOT NULL DEFAULT '{}',
    entity_prefix   text,
    format          text        NOT NULL DEFAULT 'roost' CHECK (format IN ('roost', 'alertmanager')),
    max_age_seconds float8      NOT NULL DEFAULT 86400 CHECK (max_age_seconds > 0),
    consecutive_failures integer NOT NULL DEFAULT 0,
    paused_until    timestamptz,
    failing         boolean     NOT NULL DEFAULT false,
    failing_reason  text,
    failing_since   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS webhook_deliveries (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id uuid        NOT NULL REFERENCES webhook_subscriptions (id) ON DELETE CASCADE,
    webhook_id      text        NOT NULL,
    ordering_key    text        NOT NULL,
    event_type      text        NOT NULL,
    body            bytea       NOT NULL,
    state           text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'dead')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    available_at    timestamptz NOT NULL DEFAULT now(),
    claim_token     uuid,
    claimed_until   timestamptz,
    attempts        integer     NOT NULL DEFAULT 0,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    dead_at         timestamptz,
    replays         integer     NOT NULL DEFAULT 0,
    UNIQUE (subscription_id, webhook_id)
);

CREATE INDEX IF NOT EXISTS webhook_deliveries_pending
    ON webhook_deliveries (subscription_id, ordering_key, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_dead
    ON webhook_deliveries (subscription_id, id) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS webhook_deliveries_done
    ON webhook_deliveries (delivered_at) WHERE state = 'delivered';
