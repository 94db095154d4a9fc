-- tower-idempotency-sqlx, SQLite migration 0001: the records table and its indexes.
--
-- `SqliteLedger::migrate` runs this with {{table}}, {{operation_index}} and {{expires_index}}
-- filled in (defaults: "idempotency_records", "idempotency_records_operation_id",
-- "idempotency_records_expires_at"), in one transaction. Every statement is idempotent.
-- Times are milliseconds since the Unix epoch (`unixepoch('subsec')` in each statement); UUIDs are 16 bytes.
CREATE TABLE IF NOT EXISTS {{table}} (
    key          BLOB    NOT NULL PRIMARY KEY,  -- SHA-256 of (scope, idempotency key)
    scope        BLOB    NOT NULL,              -- SHA-256 of the caller's scope
    fingerprint  BLOB    NOT NULL,              -- SHA-256 of the request
    operation_id BLOB    NOT NULL,              -- kept across lease takeovers
    token        BLOB    NOT NULL,              -- the current holder's fencing token
    state        TEXT    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    lease_until  INTEGER,                       -- in progress: when another request may take over
    expires_at   INTEGER NOT NULL,              -- when the record is treated as absent and purged
    status       INTEGER,                       -- completed: the stored response
    headers      BLOB,
    body         BLOB,
    body_omitted INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS {{operation_index}} ON {{table}} (operation_id);
CREATE INDEX IF NOT EXISTS {{expires_index}} ON {{table}} (expires_at);
