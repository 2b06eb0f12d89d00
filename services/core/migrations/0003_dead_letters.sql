-- Dead letters drained from the broker's roost.dlq.> subjects, kept for operators to inspect,
-- replay or purge.  One row per dead-lettering: the same message dead-lettered again after a replay
-- is a new row; a dead letter the broker delivers twice is one row.
CREATE TABLE IF NOT EXISTS core.dead_letters (
    id               bigserial PRIMARY KEY,
    message_id       text        NOT NULL,
    consumer_group   text        NOT NULL,
    subject          text        NOT NULL,
    type             text,
    reason           text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    headers          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    body             bytea       NOT NULL,
    dead_lettered_at timestamptz NOT NULL,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    replayed_at      timestamptz,
    replay_count     integer     NOT NULL DEFAULT 0,
    UNIQUE (consumer_group, message_id, dead_lettered_at)
);
CREATE INDEX IF NOT EXISTS dead_letters_waiting ON core.dead_letters (consumer_group, id) WHERE replayed_at IS NULL;
