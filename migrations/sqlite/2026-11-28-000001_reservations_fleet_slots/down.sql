DROP TABLE IF EXISTS fleet_slots;
DROP TABLE IF EXISTS turn_reservations;
