DROP TRIGGER usage_daily_after_insert;
DROP TABLE usage_daily;
