-- turnpike schema, PostgreSQL. Money is integer nano-USD (1 USD = 1,000,000,000).
-- Timestamps are UTC without time zone (the same representation as on SQLite).

CREATE TABLE users (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    enabled         BOOLEAN NOT NULL DEFAULT TRUE,
    balance_nanousd BIGINT,
    created_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    updated_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc')
);
COMMENT ON TABLE users IS 'People or services that own API keys; the prepaid balance lives here.';
COMMENT ON COLUMN users.id IS 'Surrogate key.';
COMMENT ON COLUMN users.created_at IS 'When the user was created (UTC).';
COMMENT ON COLUMN users.updated_at IS 'Last change to enabled or balance (UTC).';
COMMENT ON COLUMN users.name IS 'Unique login-style name used by the CLI and admin API.';
COMMENT ON COLUMN users.enabled IS 'FALSE refuses every key of this user (checked at connect and at every turn).';
COMMENT ON COLUMN users.balance_nanousd IS 'Prepaid balance in nano-USD, debited per turn; NULL = no balance limit (postpaid).';

CREATE TABLE api_keys (
    id                   BIGSERIAL PRIMARY KEY,
    user_id              BIGINT NOT NULL REFERENCES users(id),
    key_hash             TEXT NOT NULL UNIQUE,
    key_prefix           TEXT NOT NULL,
    label                TEXT,
    quota_nanousd        BIGINT,
    spent_nanousd        BIGINT NOT NULL DEFAULT 0,
    max_sessions         INTEGER,
    max_concurrent_turns INTEGER,
    created_at           TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    revoked_at           TIMESTAMP,
    CONSTRAINT api_keys_hash_is_sha256 CHECK (length(key_hash) = 64),
    CONSTRAINT api_keys_spent_non_negative CHECK (spent_nanousd >= 0)
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);
COMMENT ON TABLE api_keys IS 'turnpike API keys. The key itself is never stored: only its SHA-256 and a display prefix.';
COMMENT ON COLUMN api_keys.id IS 'Surrogate key; usage and billing rows refer to it.';
COMMENT ON COLUMN api_keys.user_id IS 'Owner of the key.';
COMMENT ON COLUMN api_keys.created_at IS 'When the key was created (UTC).';
COMMENT ON COLUMN api_keys.key_hash IS 'Lower-case hex SHA-256 of the full key; looked up on every connect and compared in constant time.';
COMMENT ON COLUMN api_keys.key_prefix IS 'First characters of the key, for humans to tell keys apart (not a secret, not unique).';
COMMENT ON COLUMN api_keys.label IS 'Optional free-text label.';
COMMENT ON COLUMN api_keys.quota_nanousd IS 'Spending cap of this key in nano-USD; NULL = no cap.';
COMMENT ON COLUMN api_keys.spent_nanousd IS 'What this key has been billed so far, in nano-USD.';
COMMENT ON COLUMN api_keys.max_sessions IS 'Most client WebSockets open at once with this key; NULL = no limit.';
COMMENT ON COLUMN api_keys.max_concurrent_turns IS 'Most turns in flight at once with this key; NULL = no limit.';
COMMENT ON COLUMN api_keys.revoked_at IS 'Set when revoked; a revoked key is refused at connect and at the next turn.';

CREATE TABLE usage_logs (
    id                  BIGSERIAL PRIMARY KEY,
    request_id          TEXT NOT NULL,
    api_key_id          BIGINT NOT NULL REFERENCES api_keys(id),
    user_id             BIGINT NOT NULL REFERENCES users(id),
    session_id          TEXT NOT NULL,
    turn_index          INTEGER NOT NULL,
    account             TEXT NOT NULL,
    model               TEXT NOT NULL,
    status              TEXT NOT NULL,
    usage_source        TEXT NOT NULL,
    warmup              BOOLEAN NOT NULL DEFAULT FALSE,
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
    created_at          TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    CONSTRAINT usage_logs_request_key UNIQUE (request_id, api_key_id),
    CONSTRAINT usage_logs_status_known CHECK (status IN
        ('completed','incomplete','failed','cancelled','preempted','client_gone','upstream_lost','rejected')),
    CONSTRAINT usage_logs_source_known CHECK (usage_source IN ('reported','estimated','partial','none'))
);
CREATE INDEX usage_logs_key_time_idx ON usage_logs (api_key_id, accepted_at);
CREATE INDEX usage_logs_user_time_idx ON usage_logs (user_id, accepted_at);
CREATE INDEX usage_logs_time_idx ON usage_logs (accepted_at);
COMMENT ON TABLE usage_logs IS 'One row per turn (response.create) that turnpike accepted, whatever its outcome.';
COMMENT ON COLUMN usage_logs.id IS 'Surrogate key (insertion order; not dense on PostgreSQL).';
COMMENT ON COLUMN usage_logs.request_id IS 'Upstream response id (resp_…), else a relay-generated turn id (turn_…). Unique with api_key_id.';
COMMENT ON COLUMN usage_logs.api_key_id IS 'The key that ran the turn.';
COMMENT ON COLUMN usage_logs.user_id IS 'Owner of the key at the time of the turn.';
COMMENT ON COLUMN usage_logs.session_id IS 'Relay session (client WebSocket) id, as in the logs.';
COMMENT ON COLUMN usage_logs.turn_index IS '1-based turn number within the session.';
COMMENT ON COLUMN usage_logs.account IS 'Upstream account that served the turn (empty if none was leased).';
COMMENT ON COLUMN usage_logs.model IS 'Model requested for the turn.';
COMMENT ON COLUMN usage_logs.status IS 'completed | incomplete | failed | cancelled | preempted | client_gone | upstream_lost | rejected';
COMMENT ON COLUMN usage_logs.usage_source IS 'reported (terminal event usage) | estimated (from streamed text) | partial (turn cut short) | none';
COMMENT ON COLUMN usage_logs.warmup IS 'TRUE for generate:false warm-ups (never billed).';
COMMENT ON COLUMN usage_logs.input_tokens IS 'Input tokens, cached ones included.';
COMMENT ON COLUMN usage_logs.cached_input_tokens IS 'Input tokens served from the prompt cache.';
COMMENT ON COLUMN usage_logs.cache_write_tokens IS 'Input tokens written to the prompt cache.';
COMMENT ON COLUMN usage_logs.output_tokens IS 'Output tokens, reasoning ones included.';
COMMENT ON COLUMN usage_logs.reasoning_tokens IS 'Reasoning tokens (part of output_tokens).';
COMMENT ON COLUMN usage_logs.total_tokens IS 'Total as reported (or input + output).';
COMMENT ON COLUMN usage_logs.cost_nanousd IS 'Price of the turn in nano-USD (integer; 0 for warm-ups).';
COMMENT ON COLUMN usage_logs.upstream_wait_ms IS 'accepted -> request written upstream (lease wait + dial).';
COMMENT ON COLUMN usage_logs.first_event_ms IS 'accepted -> first upstream event of this turn.';
COMMENT ON COLUMN usage_logs.first_token_ms IS 'accepted -> first token event (delta) of this turn; NULL if none.';
COMMENT ON COLUMN usage_logs.duration_ms IS 'accepted -> terminal event, or the moment the turn was ended otherwise.';
COMMENT ON COLUMN usage_logs.error_code IS 'turnpike or upstream error code when the turn did not complete.';
COMMENT ON COLUMN usage_logs.accepted_at IS 'When the relay read the client''s response.create (UTC).';
COMMENT ON COLUMN usage_logs.created_at IS 'When the row was written (UTC).';

CREATE TABLE billing_ledger (
    id             BIGSERIAL PRIMARY KEY,
    request_id     TEXT NOT NULL,
    api_key_id     BIGINT NOT NULL REFERENCES api_keys(id),
    user_id        BIGINT NOT NULL REFERENCES users(id),
    amount_nanousd BIGINT NOT NULL,
    created_at     TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    CONSTRAINT billing_ledger_request_key UNIQUE (request_id, api_key_id)
);
CREATE INDEX billing_ledger_key_time_idx ON billing_ledger (api_key_id, created_at);
COMMENT ON TABLE billing_ledger IS 'Debits applied: one row per billed turn, written in the same transaction as the balance and spent updates.';
COMMENT ON COLUMN billing_ledger.id IS 'Surrogate key.';
COMMENT ON COLUMN billing_ledger.api_key_id IS 'Key billed.';
COMMENT ON COLUMN billing_ledger.user_id IS 'User whose balance was debited.';
COMMENT ON COLUMN billing_ledger.created_at IS 'When the debit committed (UTC).';
COMMENT ON COLUMN billing_ledger.request_id IS 'Same key as usage_logs.request_id.';
COMMENT ON COLUMN billing_ledger.amount_nanousd IS 'Amount debited in nano-USD.';

CREATE TABLE billing_compensations (
    id              BIGSERIAL PRIMARY KEY,
    request_id      TEXT NOT NULL,
    api_key_id      BIGINT NOT NULL REFERENCES api_keys(id),
    user_id         BIGINT NOT NULL REFERENCES users(id),
    amount_nanousd  BIGINT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending',
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMP,
    last_error      TEXT,
    error_history   TEXT NOT NULL DEFAULT '[]',
    created_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    updated_at      TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    settled_at      TIMESTAMP,
    dead_at         TIMESTAMP,
    CONSTRAINT billing_compensations_request_key UNIQUE (request_id, api_key_id),
    CONSTRAINT billing_compensations_status_known CHECK (status IN ('pending','settled','dead'))
);
CREATE INDEX billing_compensations_due_idx ON billing_compensations (next_attempt_at) WHERE status = 'pending';
CREATE INDEX billing_compensations_status_idx ON billing_compensations (status, created_at);
COMMENT ON TABLE billing_compensations IS 'Debits that could not be applied with their usage row; retried by the compensator.';
COMMENT ON COLUMN billing_compensations.id IS 'Surrogate key; the admin API and CLI re-queue by it.';
COMMENT ON COLUMN billing_compensations.api_key_id IS 'Key to bill.';
COMMENT ON COLUMN billing_compensations.user_id IS 'User whose balance is to be debited.';
COMMENT ON COLUMN billing_compensations.created_at IS 'When the billing failure was recorded (UTC).';
COMMENT ON COLUMN billing_compensations.updated_at IS 'Last state change (UTC).';
COMMENT ON COLUMN billing_compensations.request_id IS 'Same key as usage_logs.request_id.';
COMMENT ON COLUMN billing_compensations.amount_nanousd IS 'Amount still to debit, in nano-USD.';
COMMENT ON COLUMN billing_compensations.status IS 'pending (will be retried) -> settled (debit applied) | dead (gave up after max attempts; an operator may re-queue it)';
COMMENT ON COLUMN billing_compensations.attempts IS 'Attempts so far, counted when an attempt claims the row.';
COMMENT ON COLUMN billing_compensations.next_attempt_at IS 'When the compensator may try again (pending rows only).';
COMMENT ON COLUMN billing_compensations.last_error IS 'Why the latest attempt failed.';
COMMENT ON COLUMN billing_compensations.error_history IS 'JSON array of {at, attempt, error}, oldest first.';
COMMENT ON COLUMN billing_compensations.settled_at IS 'When the debit was finally applied.';
COMMENT ON COLUMN billing_compensations.dead_at IS 'When the compensator gave up.';

CREATE TABLE response_bindings (
    response_id TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    api_key_id  BIGINT NOT NULL REFERENCES api_keys(id),
    created_at  TIMESTAMP NOT NULL DEFAULT (now() AT TIME ZONE 'utc'),
    expires_at  TIMESTAMP NOT NULL
);
CREATE INDEX response_bindings_expiry_idx ON response_bindings (expires_at);
COMMENT ON TABLE response_bindings IS 'store:true response -> upstream account, so a continuation chain stays on the account that holds it.';
COMMENT ON COLUMN response_bindings.response_id IS 'Upstream response id (resp_…).';
COMMENT ON COLUMN response_bindings.api_key_id IS 'Key that created the response; only it may continue the chain.';
COMMENT ON COLUMN response_bindings.created_at IS 'When the binding was written (UTC).';
COMMENT ON COLUMN response_bindings.account IS 'Upstream account (config accounts[].name) that produced the response.';
COMMENT ON COLUMN response_bindings.expires_at IS 'After this the binding is ignored and may be deleted.';

CREATE VIEW billing_compensation_backlog AS
SELECT status,
       count(*)::BIGINT                          AS rows_count,
       COALESCE(sum(amount_nanousd), 0)::BIGINT AS amount_nanousd,
       min(created_at)                           AS oldest_created_at,
       COALESCE(EXTRACT(EPOCH FROM ((now() AT TIME ZONE 'utc') - min(created_at))), 0)::BIGINT AS oldest_age_s,
       max(attempts)                             AS max_attempts
FROM billing_compensations
GROUP BY status;
COMMENT ON VIEW billing_compensation_backlog IS 'Compensation backlog by status: how many rows, how much money, how old the oldest.';
