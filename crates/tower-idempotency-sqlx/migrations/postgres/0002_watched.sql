-- tower-idempotency-sqlx, PostgreSQL migration 0002: notify only records that someone waits for.
--
-- `pg_notify` in a transaction makes its commit take a lock that every notifying commit in the
-- database shares, so notifying on every completion serialises them (and their fsyncs). A
-- waiter now sets `watched` before it waits, and completion and release notify only a watched
-- record. Idempotent, like 0001.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS watched boolean NOT NULL DEFAULT false;
