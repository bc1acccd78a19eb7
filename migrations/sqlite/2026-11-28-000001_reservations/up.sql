-- See the PostgreSQL migration of the same version for the why.
CREATE TABLE turn_reservations (
    request_id      TEXT NOT NULL,
    api_key_id      BIGINT NOT NULL,
    user_id         BIGINT NOT NULL,
    amount_nanousd  BIGINT NOT NULL,
    created_at      TIMESTAMP NOT NULL,
    expires_at      TIMESTAMP NOT NULL,
    PRIMARY KEY (request_id, api_key_id)
);
CREATE INDEX turn_reservations_key_idx ON turn_reservations (api_key_id, expires_at);
CREATE INDEX turn_reservations_user_idx ON turn_reservations (user_id, expires_at);
