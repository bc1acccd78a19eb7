-- See the PostgreSQL migration of the same version for the why.
ALTER TABLE usage_logs ADD COLUMN response_id TEXT;
UPDATE usage_logs SET response_id = request_id WHERE request_id NOT LIKE 'turn\_%' ESCAPE '\';
CREATE INDEX usage_logs_response_idx ON usage_logs (response_id);

CREATE TABLE usage_quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT NOT NULL,
    api_key_id  BIGINT NOT NULL,
    payload     TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX usage_quarantine_time_idx ON usage_quarantine (created_at);
