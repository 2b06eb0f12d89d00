-- Lazy, durable fan-out of webhook notifications (services/alarms/webhooks/store.py, dispatcher.py).
--
-- webhook_notifications: ONE row per raise, change or clear announced to webhook subscribers, written in
-- the alarm change's own transaction (instead of one delivery row per subscriber).  `seq` orders them;
-- `webhook_id` is the notification's id, the `webhook-id` of every delivery of it (unique: the same
-- notification queued twice is kept once); alarm_id / severity / entity_instance_id are what the
-- subscribers' filters look at; `body` is the roost-format body (an Alertmanager subscriber's body is
-- rendered from it when it is sent).  Writers hold pg_advisory_xact_lock_shared(<fan-out key>) from before
-- they take a seq until they commit: the fan-out waits for them (exclusive, briefly) so that it never
-- moves a cursor past a seq whose row may still commit.
--
-- webhook_subscriptions.fanned_out_seq: the subscription's cursor.  Every notification with seq <= it has
-- been turned into delivery rows for this subscription (when its filters match), in the same transaction
-- that moved the cursor.  A new subscription starts at the last seq handed out: it gets what follows.
--
-- webhook_deliveries: rows made by the fan-out reference their notification (notification_seq) and carry
-- no body; rows queued before this migration keep their body and no notification (both kinds are sent).
-- The unique (subscription_id, webhook_id) and the foreign key go: a delivery row is only ever made by
-- the fan-out, once per (cursor step, subscription), and delete_subscription deletes a subscription's
-- deliveries itself; both cost more per row than anything else in the table.  The queue index
-- (subscription_id, id) lets the dispatcher read the oldest pending rows of each subscription only.

CREATE TABLE IF NOT EXISTS webhook_notifications (
    seq                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id         text        NOT NULL UNIQUE,
    ordering_key       text        NOT NULL,
    event_type         text        NOT NULL,
    alarm_id           text        NOT NULL,
    severity           text        NOT NULL,
    entity_instance_id text        NOT NULL,
    body               bytea       NOT NULL,
    created_at         timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE webhook_subscriptions ADD COLUMN IF NOT EXISTS fanned_out_seq bigint NOT NULL DEFAULT 0;

ALTER TABLE webhook_deliveries ADD COLUMN IF NOT EXISTS notification_seq bigint;
ALTER TABLE webhook_deliveries ALTER COLUMN body DROP NOT NULL;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_body_or_notification
    CHECK (body IS NOT NULL OR notification_seq IS NOT NULL);
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_subscription_id_webhook_id_key;
ALTER TABLE webhook_deliveries DROP CONSTRAINT IF EXISTS webhook_deliveries_subscription_id_fkey;

CREATE INDEX IF NOT EXISTS webhook_deliveries_queue
    ON webhook_deliveries (subscription_id, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_dead_notification
    ON webhook_deliveries (notification_seq) WHERE state = 'dead';
