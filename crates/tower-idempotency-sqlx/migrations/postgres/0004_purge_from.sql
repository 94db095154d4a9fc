-- tower-idempotency-sqlx, PostgreSQL migration 0004: purge by `purge_from`, so that a completion
-- is a heap-only update.
--
-- A completion rewrites `expires_at`. While `expires_at` was indexed, PostgreSQL had to write the
-- completed row as a new tuple with a new entry in every index of the table (three); with no
-- indexed column changed it writes a heap-only tuple on the same page and no index entry. That
-- cut the WAL of a first request by about a quarter, 1,130 to 865 bytes (docs/benchmarks.md,
-- "Issue 18, third pass").
--
-- Purging still needs an index. `purge_from` is the earliest time the record can expire: the
-- claim sets it to its own expiry, and a completion lowers it only if it asks for a shorter
-- retention than the claim did (`LEAST`), so with the same retention it stays as it is and the
-- update stays heap-only. Every statement keeps `purge_from <= expires_at`, so the purge finds
-- every expired record among those with `purge_from <= now()`.
--
-- Records written before this migration get `-infinity` (no table rewrite: a constant default);
-- the purge looks at them first and deletes each once its `expires_at` has passed.
--
-- On a large table, `CREATE INDEX` blocks writes while it builds. Run
-- `CREATE INDEX CONCURRENTLY {{purge_index}} ON {{table}} (purge_from)` by hand first (after the
-- `ADD COLUMN`), and this finds it. Idempotent, like 0001.
ALTER TABLE {{table}} ADD COLUMN IF NOT EXISTS purge_from timestamptz NOT NULL DEFAULT '-infinity';
CREATE INDEX IF NOT EXISTS {{purge_index}} ON {{table}} (purge_from);
DROP INDEX IF EXISTS {{expires_index_qualified}};
