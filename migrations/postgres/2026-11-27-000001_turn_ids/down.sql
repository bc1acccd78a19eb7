DROP TABLE IF EXISTS usage_quarantine;
DROP INDEX IF EXISTS usage_logs_response_idx;
ALTER TABLE usage_logs DROP COLUMN IF EXISTS response_id;
