DROP VIEW IF EXISTS billing_compensation_backlog;
DROP TABLE IF EXISTS response_bindings;
DROP TABLE IF EXISTS billing_compensations;
DROP TABLE IF EXISTS billing_ledger;
DROP TABLE IF EXISTS usage_logs;
DROP TABLE IF EXISTS api_keys;
DROP TABLE IF EXISTS users;
