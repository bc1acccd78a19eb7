-- Which client transport carried a turn: the WebSocket mode, or the HTTP surface
-- (POST /v1/responses, /v1/responses/compact; docs/DESIGN.md#http-surface).
ALTER TABLE usage_logs ADD COLUMN transport TEXT NOT NULL DEFAULT 'ws';
COMMENT ON COLUMN usage_logs.transport IS 'ws: the WebSocket mode; http: POST /v1/responses or /v1/responses/compact.';

-- Sticky routing (docs/DESIGN.md#routing): the account that served the last turn of a key's
-- prompt cache (`pck:` + hash of prompt_cache_key) or client session (`sid:` + hash of its
-- session id), so the next one goes there too, from any relay sharing the database.
CREATE TABLE account_affinity (
    api_key_id    BIGINT NOT NULL,
    affinity_key  TEXT NOT NULL,
    account       TEXT NOT NULL,
    updated_at    TIMESTAMP NOT NULL,
    expires_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (api_key_id, affinity_key)
);
CREATE INDEX account_affinity_expires_idx ON account_affinity (expires_at);
