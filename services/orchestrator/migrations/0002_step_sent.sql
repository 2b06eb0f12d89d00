-- The hosts a step has sent a command to that must not be sent twice (a swact): written BEFORE the command
-- goes out, so a restarted orchestrator waits for the world to show it instead of sending it again.

ALTER TABLE strategy_steps ADD COLUMN IF NOT EXISTS sent text[] NOT NULL DEFAULT '{}';
