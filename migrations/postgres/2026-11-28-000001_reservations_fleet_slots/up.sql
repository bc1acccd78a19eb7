-- A turn's expected cost, held against its key's quota and its user's balance from admission
-- until its record is written (docs/DESIGN.md#reservations).
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
COMMENT ON TABLE turn_reservations IS 'Expected cost of turns in flight, reserved at admission against the key quota and the user balance; deleted in the transaction that writes the turn''s usage row and debit, ignored once expired (a relay that died), purged later.';
COMMENT ON COLUMN turn_reservations.request_id IS 'The turn id (usage_logs.request_id of the record that settles it).';
COMMENT ON COLUMN turn_reservations.amount_nanousd IS 'Reserved nano-USD: input estimated from the request, output from max_output_tokens or billing.reserve_output_tokens.';
COMMENT ON COLUMN turn_reservations.expires_at IS 'After this the reservation no longer counts (billing.reservation_ttl_s after admission).';

-- Open sessions and turns in flight per key, counted for the whole fleet of relays sharing
-- this database (docs/DESIGN.md#fleet-slots).
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
COMMENT ON TABLE fleet_slots IS 'One row per open session (kind session) or turn in flight (kind turn) of a key with a limit, on any relay; taken under the key''s row lock against max_sessions / max_concurrent_turns, deleted when the session or turn ends, kept alive by its relay''s heartbeat and ignored once expired (a relay that died).';
COMMENT ON COLUMN fleet_slots.relay_id IS 'The relay process holding it (random per start).';
COMMENT ON COLUMN fleet_slots.expires_at IS 'Extended by the relay''s heartbeat (limits.fleet_slot_ttl_ms); past it the slot no longer counts.';

-- What started a turn: the client's response.create, or the upstream's automatic successor of
-- a steered response (docs/DESIGN.md#steering).
ALTER TABLE usage_logs ADD COLUMN origin TEXT NOT NULL DEFAULT 'create';
COMMENT ON COLUMN usage_logs.origin IS 'create: the client''s response.create; steer: a successor the upstream started after response.steer.';
