-- tower-idempotency-sqlx, PostgreSQL migration 0005: keep the table's pages, so that key lookups
-- are always planned as index scans.
--
-- Every ledger statement finds its record by `key = $1`. PostgreSQL plans that as a sequential
-- scan when the table is only a few pages long, and sqlx's cached statements keep their plan
-- while the table grows again. VACUUM truncates a table's empty tail: after a quiet spell in
-- which every record expired and was purged, a vacuumed ledger table is a few pages long, and
-- the claims planned then scan the whole table until the next ANALYZE (measured: 11,000 claims
-- per second became 720). So:
-- - `vacuum_truncate = false`: VACUUM leaves the empty pages to be reused (the table keeps the
--   size of its busiest day, which it will need again);
-- - autovacuum's thresholds at 1,000 rows: a new table is first vacuumed or analyzed when it
--   holds that many, tens of pages, not while it is a few rows long (until then PostgreSQL
--   assumes 10 pages, and plans index scans). On a large table the scale factors decide, as
--   before.
-- Each is set only if the table does not set it already, so that an operator's own setting stays;
-- `ALTER TABLE .. SET` takes a SHARE UPDATE EXCLUSIVE lock, which reads and writes do not wait
-- for. A manual VACUUM or ANALYZE of a nearly empty table can still make these plans; see
-- docs/operations.md.
DO $$
DECLARE
    present text[];
    setting text;
BEGIN
    SELECT coalesce(reloptions, '{}') INTO present FROM pg_class WHERE oid = '{{table}}'::regclass;
    FOREACH setting IN ARRAY ARRAY[
        'vacuum_truncate=false',
        'autovacuum_vacuum_threshold=1000',
        'autovacuum_vacuum_insert_threshold=1000',
        'autovacuum_analyze_threshold=1000'
    ] LOOP
        IF NOT EXISTS (
            SELECT 1 FROM unnest(present) AS option
            WHERE split_part(option, '=', 1) = split_part(setting, '=', 1)
        ) THEN
            EXECUTE format('ALTER TABLE {{table}} SET (%s)', setting);
        END IF;
    END LOOP;
END
$$;
