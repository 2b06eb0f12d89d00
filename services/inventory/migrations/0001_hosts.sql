-- Inventory's own tables (services/inventory/store.py).
--
-- hosts: one row per host.  `node_id` is a stable small integer, never reused.  hostname, mgmt_mac and
-- agent are unique when set (a discovered host has none of hostname and personality yet).  The state
-- triple (administrative / operational / availability), task and action are written only through the
-- host state machine (services/inventory/machine.py).  `degrade_reasons` maps a reporter's key to its
-- text.  The BMC password is stored encrypted (`bmc_password`, AES-GCM, key `bmc_key_id` from the
-- secret store, the host's uuid as associated data) and never returned.  `version` grows by one per
-- change of the host (the version of its roost.host.* events).
--
-- hardware: the last report per host and source (agent, redfish).
--
-- site: one row; locking it serialises the decisions that look at several hosts (the active
-- controller, the last enabled controller), across replicas.

CREATE TABLE IF NOT EXISTS hosts (
    uuid             uuid        PRIMARY KEY,
    node_id          bigint      GENERATED ALWAYS AS IDENTITY UNIQUE,
    hostname         text        UNIQUE,
    personality      text        CHECK (personality IN ('controller', 'worker', 'storage')),
    subfunctions     text[]      NOT NULL DEFAULT '{}',
    administrative   text        NOT NULL DEFAULT 'locked' CHECK (administrative IN ('locked', 'unlocked')),
    operational      text        NOT NULL DEFAULT 'disabled' CHECK (operational IN ('enabled', 'disabled')),
    availability     text        NOT NULL DEFAULT 'offline' CHECK (availability IN
                                     ('available', 'degraded', 'failed', 'offline', 'online', 'intest', 'power-off')),
    task             text        NOT NULL DEFAULT '',
    action           text        NOT NULL DEFAULT 'none',
    power_state      text        NOT NULL DEFAULT 'unknown',
    uptime_seconds   bigint,
    mgmt_mac         text        UNIQUE,
    serial           text        NOT NULL DEFAULT '',
    location         text        NOT NULL DEFAULT '',
    labels           jsonb       NOT NULL DEFAULT '{}'::jsonb,
    addresses        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    degrade_reasons  jsonb       NOT NULL DEFAULT '{}'::jsonb,
    agent            text        UNIQUE,
    agent_alive      boolean     NOT NULL DEFAULT false,
    agent_seen_at    timestamptz,
    agent_interval   double precision,
    agent_boot_id    text,
    inventoried      boolean     NOT NULL DEFAULT false,
    bmc_type         text        NOT NULL DEFAULT 'none' CHECK (bmc_type IN ('none', 'redfish')),
    bmc_address      text        NOT NULL DEFAULT '',
    bmc_username     text        NOT NULL DEFAULT '',
    bmc_password     bytea,
    bmc_key_id       text,
    bmc_system_id    text,
    bmc_verify_tls   boolean     NOT NULL DEFAULT true,
    bmc_reachable    boolean,
    bmc_outcome      text        CHECK (bmc_outcome IN ('ok', 'unreachable', 'auth-failed')),
    bmc_last_error   text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    version          bigint      NOT NULL DEFAULT 1 CHECK (version >= 1)
);

CREATE TABLE IF NOT EXISTS hardware (
    host_uuid    uuid        NOT NULL REFERENCES hosts (uuid) ON DELETE CASCADE,
    source       text        NOT NULL CHECK (source IN ('agent', 'redfish')),
    report       jsonb       NOT NULL,
    reported_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_uuid, source)
);

CREATE TABLE IF NOT EXISTS site (
    id            integer     PRIMARY KEY CHECK (id = 1),
    active        uuid,
    active_epoch  bigint      NOT NULL DEFAULT 0
);

INSERT INTO site (id) VALUES (1) ON CONFLICT DO NOTHING;
