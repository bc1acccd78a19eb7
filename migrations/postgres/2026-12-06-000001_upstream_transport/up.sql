-- How the turn's request reached the upstream: the account's WebSocket ('ws'), or a
-- POST /responses of its own ('http': a request larger than the account's WebSocket takes;
-- docs/DESIGN.md#upstream-transports). `transport` stays the client's side.
ALTER TABLE usage_logs ADD COLUMN upstream_transport TEXT NOT NULL DEFAULT 'ws';
COMMENT ON COLUMN usage_logs.upstream_transport IS 'ws: the account''s upstream WebSocket; http: POST /responses (SSE or JSON).';
