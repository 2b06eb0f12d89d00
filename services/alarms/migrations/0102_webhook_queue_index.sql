-- The dispatcher reads the oldest pending rows of each subscription only (the queue index
-- webhook_deliveries_queue (subscription_id, id), 0101) and checks the order per alarm instance among
-- them: an earlier pending row of the same instance is always among them.  The index on
-- (subscription_id, ordering_key, id) is then used by nothing, and every delivery row the fan-out makes
-- paid for it (its widest key): it goes.

DROP INDEX IF EXISTS webhook_deliveries_pending;
