ALTER TABLE usage_logs DROP COLUMN upstream_transport;
