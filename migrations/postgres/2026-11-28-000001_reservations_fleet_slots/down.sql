DROP TABLE IF EXISTS fleet_slots;
DROP TABLE IF EXISTS turn_reservations;
ALTER TABLE usage_logs DROP COLUMN origin;
