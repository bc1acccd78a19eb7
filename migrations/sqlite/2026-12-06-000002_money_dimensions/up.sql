-- Money in every dimension the upstream bills (docs/DESIGN.md#pricing).
-- The service tier a turn was billed at: the one the upstream reported for the response, else
-- the one requested ('standard' is the upstream's 'default').
ALTER TABLE usage_logs ADD COLUMN service_tier TEXT NOT NULL DEFAULT 'standard';
-- Cache writes split by lifetime (part of cache_write_tokens; the rest has no lifetime named).
ALTER TABLE usage_logs ADD COLUMN cache_write_30m_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_logs ADD COLUMN cache_write_12h_tokens BIGINT NOT NULL DEFAULT 0;
-- A key's allow-lists, comma-separated; NULL: every model / every tier.
ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
ALTER TABLE api_keys ADD COLUMN allowed_service_tiers TEXT;
-- Compaction turns are `compaction` now, over both transports.
UPDATE usage_logs SET origin = 'compaction' WHERE origin = 'compact';
