-- See the PostgreSQL migration of the same version for the why.
CREATE TABLE account_facts (
    account             TEXT PRIMARY KEY NOT NULL,
    http_only           BOOLEAN NOT NULL DEFAULT 0,
    lanes_refused       BOOLEAN NOT NULL DEFAULT 0,
    refused_frame_bytes BIGINT NOT NULL DEFAULT 0,
    learnt_at           TIMESTAMP NOT NULL
);
