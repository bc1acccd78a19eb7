-- What relays learnt of an upstream account's transport (docs/DESIGN.md#learnt-facts): shared
-- by every relay on the database, kept across restarts, forgotten after upstream.learnt_ttl_s
-- (the next turn probes again).
CREATE TABLE account_facts (
    account             TEXT PRIMARY KEY,
    http_only           BOOLEAN NOT NULL DEFAULT FALSE,
    lanes_refused       BOOLEAN NOT NULL DEFAULT FALSE,
    refused_frame_bytes BIGINT NOT NULL DEFAULT 0,
    learnt_at           TIMESTAMP NOT NULL
);
COMMENT ON TABLE account_facts IS 'Facts relays learnt of each upstream account''s transport, shared across relays; a row older than upstream.learnt_ttl_s is forgotten.';
COMMENT ON COLUMN account_facts.http_only IS 'The upstream answered a WebSocket handshake 426: turns go over HTTP.';
COMMENT ON COLUMN account_facts.lanes_refused IS 'The upstream refused stream_id (no lanes): named lanes'' turns go over HTTP.';
COMMENT ON COLUMN account_facts.refused_frame_bytes IS 'The smallest request frame the upstream closed with 1009 (message too big); 0: none. Requests this large go over HTTP.';
COMMENT ON COLUMN account_facts.learnt_at IS 'When a relay last learnt or confirmed these facts (UTC).';
