-- dcsync's own tables at the system controller (services/dcsync/store.py).
--
-- subclouds: one row per subcloud; `version` grows by one per change of its state (the version of its
-- roost.subcloud.* events).  subcloud_endpoints: per subcloud and endpoint (identity, image) the sync
-- status, the columns agreed with it (version skew), whether it must be brought back by an audit
-- (`needs_resync`: it joins, or fell behind the change log's retention), and since when it is out of sync.
-- subcloud_cursors: per subcloud, endpoint and lane, the last change it acknowledged.

CREATE TABLE IF NOT EXISTS subclouds (
    name           text        PRIMARY KEY,
    description    text        NOT NULL DEFAULT '',
    management     text        NOT NULL CHECK (management IN ('managed', 'unmanaged')),
    availability   text        NOT NULL DEFAULT 'unknown' CHECK (availability IN ('online', 'offline', 'unknown')),
    join_state     text        NOT NULL DEFAULT 'joining' CHECK (join_state IN ('joining', 'joined', 'join-failed')),
    join_policy    text        NOT NULL CHECK (join_policy IN ('adopt', 'refuse')),
    last_heard_at  timestamptz,
    last_audit_at  timestamptz,
    fernet_fingerprint text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    version        bigint      NOT NULL DEFAULT 1
);

CREATE TABLE IF NOT EXISTS subcloud_endpoints (
    subcloud          text        NOT NULL REFERENCES subclouds (name) ON DELETE CASCADE,
    endpoint          text        NOT NULL CHECK (endpoint IN ('identity', 'image')),
    sync_status       text        NOT NULL DEFAULT 'unknown' CHECK (sync_status IN ('in-sync', 'out-of-sync', 'unknown')),
    needs_resync      boolean     NOT NULL DEFAULT true,
    agreement         jsonb,
    skew              jsonb       NOT NULL DEFAULT '[]',
    out_of_sync_since timestamptz,
    detail            text        NOT NULL DEFAULT '',
    last_audit        jsonb,
    PRIMARY KEY (subcloud, endpoint)
);

CREATE TABLE IF NOT EXISTS subcloud_cursors (
    subcloud   text   NOT NULL,
    endpoint   text   NOT NULL,
    lane       text   NOT NULL,
    acked_seq  bigint NOT NULL,
    PRIMARY KEY (subcloud, endpoint, lane),
    FOREIGN KEY (subcloud, endpoint) REFERENCES subcloud_endpoints (subcloud, endpoint) ON DELETE CASCADE
);
