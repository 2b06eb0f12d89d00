-- apply-stage: the apply phase pauses before this stage (null: it applies every stage).

ALTER TABLE strategies ADD COLUMN IF NOT EXISTS stop_at_stage integer;
