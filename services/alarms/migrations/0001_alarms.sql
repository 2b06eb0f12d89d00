-- Fault management's own tables (services/alarms/store.py).
--
-- active_alarms: one row per active alarm instance, UNIQUE (alarm_id, entity_instance_id): a re-set
-- updates the row (same uuid), a clear deletes it.  `owner` is the service that last set it (the
-- envelope's source), which a re-assertion by that owner may clear.  `version` grows by one per raise,
-- change and clear of the instance (the version of its roost.alarm.* events).  The other columns are
-- FM's fields.
--
-- event_log: the history, one row per set, change, clear and customer log, kept for the configured
-- retention.  `state` is FM's (set / clear / log); `change` says which (raised / changed / cleared /
-- logged) and `changes` what a change changed (old -> new).  `alarm_uuid` links the records of one
-- alarm instance.
--
-- suppression: operator suppression per alarm id (hidden from lists unless asked; still recorded).

CREATE TABLE IF NOT EXISTS active_alarms (
    uuid                   uuid        PRIMARY KEY,
    alarm_id               text        NOT NULL,
    entity_instance_id     text        NOT NULL,
    entity_type_id         text        NOT NULL,
    alarm_state            text        NOT NULL DEFAULT 'set' CHECK (alarm_state = 'set'),
    timestamp              timestamptz NOT NULL,
    severity               text        NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    reason_text            text        NOT NULL DEFAULT '' CHECK (length(reason_text) <= 255),
    alarm_type             text        NOT NULL,
    probable_cause         text        NOT NULL,
    proposed_repair_action text        NOT NULL DEFAULT '' CHECK (length(proposed_repair_action) <= 255),
    service_affecting      boolean     NOT NULL DEFAULT false,
    suppression            boolean     NOT NULL DEFAULT false,
    inhibit_alarms         boolean     NOT NULL DEFAULT false,
    mgmt_affecting         boolean     NOT NULL DEFAULT false,
    degrade_affecting      boolean     NOT NULL DEFAULT false,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    owner                  text        NOT NULL,
    version                bigint      NOT NULL CHECK (version >= 1),
    CONSTRAINT active_alarms_instance UNIQUE (alarm_id, entity_instance_id)
);

CREATE INDEX IF NOT EXISTS active_alarms_entity ON active_alarms (entity_instance_id text_pattern_ops);
CREATE INDEX IF NOT EXISTS active_alarms_owner ON active_alarms (owner);

CREATE TABLE IF NOT EXISTS event_log (
    seq                    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uuid                   uuid        NOT NULL UNIQUE,
    event_log_id           text        NOT NULL,
    state                  text        NOT NULL CHECK (state IN ('set', 'clear', 'log')),
    change                 text        NOT NULL CHECK (change IN ('raised', 'changed', 'cleared', 'logged')),
    changes                jsonb       NOT NULL DEFAULT '[]'::jsonb,
    cause                  text,
    alarm_uuid             uuid,
    entity_type_id         text        NOT NULL,
    entity_instance_id     text        NOT NULL,
    timestamp              timestamptz NOT NULL,
    severity               text        NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    reason_text            text        NOT NULL DEFAULT '',
    event_log_type         text        NOT NULL,
    probable_cause         text        NOT NULL,
    proposed_repair_action text        NOT NULL DEFAULT '',
    service_affecting      boolean     NOT NULL DEFAULT false,
    suppression            boolean     NOT NULL DEFAULT false,
    owner                  text        NOT NULL,
    version                bigint,
    recorded_at            timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS event_log_recorded ON event_log (recorded_at);
CREATE INDEX IF NOT EXISTS event_log_timestamp ON event_log (timestamp DESC, seq DESC);
CREATE INDEX IF NOT EXISTS event_log_id ON event_log (event_log_id);
CREATE INDEX IF NOT EXISTS event_log_alarm ON event_log (alarm_uuid) WHERE alarm_uuid IS NOT NULL;

CREATE TABLE IF NOT EXISTS suppression (
    alarm_id   text        PRIMARY KEY,
    suppressed boolean     NOT NULL,
    updated_by text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
