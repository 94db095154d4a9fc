-- tower-idempotency-sqlx, PostgreSQL migration 0001: the records table and its indexes.
--
-- `PostgresLedger::migrate` runs this with {{table}} and {{operation_index}} filled in (defaults:
-- "idempotency_records", "idempotency_records_operation_id"), in one transaction under an
-- advisory lock. Every statement
-- is idempotent, so running it again, or from many app instances at once, is safe. To manage the
-- schema with your own migration tool, copy this file and fill in the names yourself.
CREATE TABLE IF NOT EXISTS {{table}} (
    key          bytea       PRIMARY KEY,  -- SHA-256 of (scope, idempotency key)
    scope        bytea       NOT NULL,     -- SHA-256 of the caller's scope
    fingerprint  bytea       NOT NULL,     -- SHA-256 of the request
    operation_id uuid        NOT NULL,     -- kept across lease takeovers
    token        uuid        NOT NULL,     -- the current holder's fencing token
    state        text        NOT NULL CHECK (state IN ('in_progress', 'completed')),
    lease_until  timestamptz,              -- in progress: when another request may take over
    expires_at   timestamptz NOT NULL,     -- when the record is treated as absent and purged
    status       smallint,                 -- completed: the stored response
    headers      bytea,
    body         bytea,
    body_omitted boolean     NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX IF NOT EXISTS {{operation_index}} ON {{table}} (operation_id);
-- Until migration 0004 this file also made an index on `expires_at` ({{expires_index}}); 0004
-- drops it and indexes `purge_from` instead. It is no longer made here because `migrate()` runs
-- every file at every start and would make it again.
