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
