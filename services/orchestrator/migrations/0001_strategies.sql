-- The orchestrator's own tables: the update strategy (services/orchestrator/store.py).
--
-- strategies: at most one row (`singleton`: one strategy at a time, as the VIM).  `version` grows by one
-- per transition (the version of its roost.strategy.* events).  `abort_requested`: an operator's abort,
-- written by the command and taken up by the executor (which alone changes the state while it applies).
--
-- strategy_phases / strategy_stages / strategy_steps: the apply phase and, once aborting, the abort phase,
-- their stages and steps with their results.  A step's `started_at` is the durable "started" marker: it
-- is committed BEFORE the step acts, so an orchestrator restarted mid-apply resumes that step (it re-checks
-- the world: is the host locked already? which release does its agent run?) instead of starting it again.

CREATE TABLE IF NOT EXISTS strategies (
    uuid             uuid        PRIMARY KEY,
    singleton        boolean     NOT NULL DEFAULT true UNIQUE CHECK (singleton),
    state            text        NOT NULL CHECK (state IN ('building', 'build-failed', 'ready-to-apply', 'applying',
                                     'applied', 'apply-failed', 'aborting', 'aborted', 'abort-failed')),
    reason           text        NOT NULL DEFAULT '',
    release          jsonb       NOT NULL,
    options          jsonb       NOT NULL,
    current_phase    text        NOT NULL DEFAULT 'apply' CHECK (current_phase IN ('build', 'apply', 'abort')),
    skipped          jsonb       NOT NULL DEFAULT '{}',
    abort_requested  boolean     NOT NULL DEFAULT false,
    version          bigint      NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS strategy_phases (
    strategy       uuid    NOT NULL REFERENCES strategies (uuid) ON DELETE CASCADE,
    phase          text    NOT NULL CHECK (phase IN ('apply', 'abort')),
    current_stage  integer NOT NULL DEFAULT 0,
    result         text    NOT NULL,
    reason         text    NOT NULL DEFAULT '',
    PRIMARY KEY (strategy, phase)
);

CREATE TABLE IF NOT EXISTS strategy_stages (
    strategy       uuid    NOT NULL,
    phase          text    NOT NULL,
    stage_id       integer NOT NULL,
    name           text    NOT NULL,
    current_step   integer NOT NULL DEFAULT 0,
    result         text    NOT NULL,
    reason         text    NOT NULL DEFAULT '',
    PRIMARY KEY (strategy, phase, stage_id),
    FOREIGN KEY (strategy, phase) REFERENCES strategy_phases (strategy, phase) ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS strategy_steps (
    strategy       uuid        NOT NULL,
    phase          text        NOT NULL,
    stage_id       integer     NOT NULL,
    step_id        integer     NOT NULL,
    name           text        NOT NULL,
    entity_names   text[]      NOT NULL DEFAULT '{}',
    entity_uuids   text[]      NOT NULL DEFAULT '{}',
    timeout        integer     NOT NULL,
    max_retries    integer     NOT NULL DEFAULT 0,
    retry_delay    integer     NOT NULL DEFAULT 0,
    result         text        NOT NULL CHECK (result IN ('initial', 'inprogress', 'wait', 'success', 'degraded',
                                   'failed', 'timed-out', 'aborted')),
    reason         text        NOT NULL DEFAULT '',
    started_at     timestamptz,
    finished_at    timestamptz,
    PRIMARY KEY (strategy, phase, stage_id, step_id),
    FOREIGN KEY (strategy, phase, stage_id) REFERENCES strategy_stages (strategy, phase, stage_id) ON DELETE CASCADE
);

SELECT core.ensure_outbox_inbox('orchestrator');
