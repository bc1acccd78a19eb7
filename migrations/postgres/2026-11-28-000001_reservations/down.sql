DROP TABLE IF EXISTS turn_reservations;
