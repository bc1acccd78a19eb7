DROP TABLE account_affinity;
ALTER TABLE usage_logs DROP COLUMN transport;
