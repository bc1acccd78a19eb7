-- turnpike schema, SQLite (column comments: see the PostgreSQL migration). Money is integer nano-USD (1 USD = 1,000,000,000).
-- Timestamps are UTC without time zone (the same representation as on SQLite).

CREATE TABLE users (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT NOT NULL UNIQUE,
    enabled         BOOLEAN NOT NULL DEFAULT 1,
    balance_nanousd BIGINT,
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE api_keys (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id              BIGINT NOT NULL REFERENCES users(id),
    key_hash             TEXT NOT NULL UNIQUE,
    key_prefix           TEXT NOT NULL,
    label                TEXT,
    quota_nanousd        BIGINT,
    spent_nanousd        BIGINT NOT NULL DEFAULT 0,
    max_sessions         INTEGER,
    max_concurrent_turns INTEGER,
    created_at           TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    revoked_at           TIMESTAMP,
    CONSTRAINT api_keys_hash_is_sha256 CHECK (length(key_hash) = 64),
    CONSTRAINT api_keys_spent_non_negative CHECK (spent_nanousd >= 0)
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);

CREATE TABLE usage_logs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id          TEXT NOT NULL,
    api_key_id          BIGINT NOT NULL REFERENCES api_keys(id),
    user_id             BIGINT NOT NULL REFERENCES users(id),
    session_id          TEXT NOT NULL,
    turn_index          INTEGER NOT NULL,
    account             TEXT NOT NULL,
    model               TEXT NOT NULL,
    status              TEXT NOT NULL,
    usage_source        TEXT NOT NULL,
    warmup              BOOLEAN NOT NULL DEFAULT 0,
    input_tokens        BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens       BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens    BIGINT NOT NULL DEFAULT 0,
    total_tokens        BIGINT NOT NULL DEFAULT 0,
    cost_nanousd        BIGINT NOT NULL DEFAULT 0,
    upstream_wait_ms    BIGINT,
    first_event_ms      BIGINT,
    first_token_ms      BIGINT,
    duration_ms         BIGINT NOT NULL,
    error_code          TEXT,
    accepted_at         TIMESTAMP NOT NULL,
    created_at          TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT usage_logs_request_key UNIQUE (request_id, api_key_id),
    CONSTRAINT usage_logs_status_known CHECK (status IN
        ('completed','incomplete','failed','cancelled','preempted','client_gone','upstream_lost','rejected')),
    CONSTRAINT usage_logs_source_known CHECK (usage_source IN ('reported','estimated','partial','none'))
);
CREATE INDEX usage_logs_key_time_idx ON usage_logs (api_key_id, accepted_at);
CREATE INDEX usage_logs_user_time_idx ON usage_logs (user_id, accepted_at);
CREATE INDEX usage_logs_time_idx ON usage_logs (accepted_at);

CREATE TABLE billing_ledger (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id     TEXT NOT NULL,
    api_key_id     BIGINT NOT NULL REFERENCES api_keys(id),
    user_id        BIGINT NOT NULL REFERENCES users(id),
    amount_nanousd BIGINT NOT NULL,
    created_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT billing_ledger_request_key UNIQUE (request_id, api_key_id)
);
CREATE INDEX billing_ledger_key_time_idx ON billing_ledger (api_key_id, created_at);

CREATE TABLE billing_compensations (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id      TEXT NOT NULL,
    api_key_id      BIGINT NOT NULL REFERENCES api_keys(id),
    user_id         BIGINT NOT NULL REFERENCES users(id),
    amount_nanousd  BIGINT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMP,
    last_error      TEXT,
    error_history   TEXT NOT NULL DEFAULT '[]',
    created_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at      TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    settled_at      TIMESTAMP,
    dead_at         TIMESTAMP,
    CONSTRAINT billing_compensations_request_key UNIQUE (request_id, api_key_id),
    CONSTRAINT billing_compensations_status_known CHECK (status IN ('pending','settled','dead'))
);
CREATE INDEX billing_compensations_due_idx ON billing_compensations (next_attempt_at) WHERE status = 'pending';
CREATE INDEX billing_compensations_status_idx ON billing_compensations (status, created_at);

CREATE TABLE response_bindings (
    response_id TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    api_key_id  BIGINT NOT NULL REFERENCES api_keys(id),
    created_at  TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    expires_at  TIMESTAMP NOT NULL
);
CREATE INDEX response_bindings_expiry_idx ON response_bindings (expires_at);

CREATE VIEW billing_compensation_backlog AS
SELECT status,
       count(*)                                  AS rows_count,
       COALESCE(sum(amount_nanousd), 0)          AS amount_nanousd,
       min(created_at)                           AS oldest_created_at,
       COALESCE(CAST((julianday('now') - julianday(min(created_at))) * 86400 AS INTEGER), 0) AS oldest_age_s,
       max(attempts)                             AS max_attempts
FROM billing_compensations
GROUP BY status;
