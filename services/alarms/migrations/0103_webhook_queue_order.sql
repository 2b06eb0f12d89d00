-- The pending queue read in an order only its own index gives (services/alarms/webhooks: the claim's window,
-- the fan-out's room, the delivered statement's look for more).
--
-- Those statements read the oldest pending rows of one subscription: `WHERE subscription_id = $s AND state =
-- 'pending' ORDER BY id LIMIT n`.  The primary key gives id order too, and when the statistics say most rows are
-- pending (an ANALYZE taken while a backlog was queued: they stay until the next one, a TRUNCATE and an ANALYZE
-- of the empty table included, and with autovacuum off nothing refreshes them) the planner walks the primary key
-- from the oldest row, through every delivered row kept for the retention (7 days), to find the few pending
-- ones (or scans the table for the fan-out's count).  Ordered by `id + 0`, which no index but this one gives, the
-- partial index is the only plan that needs no sort of every matching row, whatever the statistics say; it
-- replaces the queue index of 0101 (same columns, same cost per row).

CREATE INDEX IF NOT EXISTS webhook_deliveries_pending_order
    ON webhook_deliveries (subscription_id, (id + 0)) WHERE state = 'pending';

DROP INDEX IF EXISTS webhook_deliveries_queue;
