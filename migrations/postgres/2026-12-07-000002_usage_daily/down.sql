DROP TRIGGER usage_daily_after_insert ON usage_logs;
DROP FUNCTION usage_daily_add();
DROP TABLE usage_daily;
