ALTER TABLE usage_logs DROP COLUMN transport;
