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

CREATE TABLE fleet_slots (
    slot_id     TEXT PRIMARY KEY,
    api_key_id  BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    relay_id    TEXT NOT NULL,
    created_at  TIMESTAMP NOT NULL,
    expires_at  TIMESTAMP NOT NULL
);
CREATE INDEX fleet_slots_key_idx ON fleet_slots (api_key_id, kind, expires_at);
CREATE INDEX fleet_slots_relay_idx ON fleet_slots (relay_id);

-- What started a turn: the client's response.create, or the upstream's automatic successor of
-- a steered response (docs/DESIGN.md#steering).
ALTER TABLE usage_logs ADD COLUMN origin TEXT NOT NULL DEFAULT 'create';
