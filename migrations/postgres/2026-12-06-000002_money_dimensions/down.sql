UPDATE usage_logs SET origin = 'compact' WHERE origin = 'compaction';
ALTER TABLE api_keys DROP COLUMN allowed_service_tiers;
ALTER TABLE api_keys DROP COLUMN allowed_models;
ALTER TABLE usage_logs DROP COLUMN cache_write_12h_tokens;
ALTER TABLE usage_logs DROP COLUMN cache_write_30m_tokens;
ALTER TABLE usage_logs DROP COLUMN service_tier;
