-- The idempotency key of a turn is the relay's own turn id (turn_…), generated when the relay
-- accepts the response.create and kept in the spool record: an upstream that reuses a response
-- id (a restarted upstream numbers its responses again) can no longer merge two turns.
-- The upstream's response id moves to its own indexed column.
ALTER TABLE usage_logs ADD COLUMN response_id TEXT;
-- Rows written before this migration used the upstream response id as request_id.
UPDATE usage_logs SET response_id = request_id WHERE request_id NOT LIKE 'turn\_%';
CREATE INDEX usage_logs_response_idx ON usage_logs (response_id);
COMMENT ON COLUMN usage_logs.request_id IS 'Relay-generated turn id (turn_…), the idempotency key with api_key_id. Rows older than migration 2026-11-27-000001 hold the upstream response id here.';
COMMENT ON COLUMN usage_logs.response_id IS 'Upstream response id (resp_…) when the upstream named one; NULL when the turn never reached the upstream or ended before response.created. Not unique: an upstream may reuse ids.';

-- Records the database refused for their content (not for an outage): kept with the reason so
-- that they never block the records behind them (SPEC §5.4.9). No foreign keys: a record that
-- names a deleted key must still land here.
CREATE TABLE usage_quarantine (
    id          BIGSERIAL PRIMARY KEY,
    request_id  TEXT NOT NULL,
    api_key_id  BIGINT NOT NULL,
    payload     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX usage_quarantine_time_idx ON usage_quarantine (created_at);
COMMENT ON TABLE usage_quarantine IS 'Turn records the database refused for their content (e.g. a key deleted since); an operator fixes the cause and re-applies them.';
COMMENT ON COLUMN usage_quarantine.id IS 'Surrogate key.';
COMMENT ON COLUMN usage_quarantine.request_id IS 'The turn id of the record (usage_logs.request_id it would have had).';
COMMENT ON COLUMN usage_quarantine.api_key_id IS 'The key the record names (may no longer exist).';
COMMENT ON COLUMN usage_quarantine.payload IS 'The whole turn record as JSON (spool format), NUL bytes removed.';
COMMENT ON COLUMN usage_quarantine.reason IS 'The database error that refused the usage row and its compensation.';
COMMENT ON COLUMN usage_quarantine.created_at IS 'When the record was quarantined (UTC).';
