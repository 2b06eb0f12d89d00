-- The newest version of each entity a consumer has applied (services.core.versions): an event carrying
-- an older or equal version than the one recorded here is stale and is not applied.
CREATE TABLE IF NOT EXISTS core.entity_versions (
    consumer    text        NOT NULL,
    entity_type text        NOT NULL,
    entity_id   text        NOT NULL,
    version     bigint      NOT NULL CHECK (version >= 1),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, entity_type, entity_id)
);
