-- Which client transport carried a turn: the WebSocket mode, or the HTTP surface
-- (POST /v1/responses, /v1/responses/compact; docs/DESIGN.md#http-surface).
ALTER TABLE usage_logs ADD COLUMN transport TEXT NOT NULL DEFAULT 'ws';
COMMENT ON COLUMN usage_logs.transport IS 'ws: the WebSocket mode; http: POST /v1/responses or /v1/responses/compact.';
