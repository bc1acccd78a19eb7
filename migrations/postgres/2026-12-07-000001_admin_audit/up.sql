-- Every operator action, through the admin API or the CLI (docs/DESIGN.md#audit).
CREATE TABLE admin_audit (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMP NOT NULL,
    actor       TEXT NOT NULL,
    peer        TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX admin_audit_at_idx ON admin_audit (at);
COMMENT ON TABLE admin_audit IS 'Operator actions (admin API and CLI): who, from where, what, on what, when. Never updated; rows are kept when usage is purged.';
COMMENT ON COLUMN admin_audit.actor IS 'Who: the X-Turnpike-Operator header of an admin call (else "admin"), or "cli:<user>" for the command line.';
COMMENT ON COLUMN admin_audit.peer IS 'From where: the admin caller''s IP address and port, or "local" for the CLI.';
COMMENT ON COLUMN admin_audit.action IS 'What, as a stable name: users.create, users.balance, users.disable, users.enable, keys.create, keys.update, keys.revoke, actors.restart, sessions.end, accounts.disable, accounts.enable, compensations.retry, usage.purge.';
COMMENT ON COLUMN admin_audit.target IS 'On what: a user name, a key id and prefix, an actor, a session id, an account, a compensation id.';
COMMENT ON COLUMN admin_audit.detail IS 'The change as JSON (new values; never a key or a token).';
