-- API tokens: bearer tokens for the REST APIs and for the commands on the bus (services.core.auth).
--
-- A token is "roost_" followed by 43 URL-safe base64 characters (256 random bits).  Only its SHA-256 is
-- stored: a dump of this table does not let anyone authenticate.  A plain (unsalted, fast) hash is
-- enough because the tokens are random and long: nobody can guess one from its hash, and a fixed hash
-- lets a token be looked up by its hash through the unique index.
--
-- A token is never updated except for last_used_at (written at most once a minute per token) and
-- revoked_at.  Revoked rows are kept for the audit trail; a name can be reused once its token is revoked.

CREATE TABLE IF NOT EXISTS core.api_tokens (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    role         text        NOT NULL CHECK (role IN ('admin', 'reader')),
    kind         text        NOT NULL DEFAULT 'user' CHECK (kind IN ('user', 'service', 'agent')),
    token_hash   bytea       NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    expires_at   timestamptz,
    revoked_at   timestamptz
);

-- One active token per name.
CREATE UNIQUE INDEX IF NOT EXISTS api_tokens_active_name ON core.api_tokens (name) WHERE revoked_at IS NULL;
