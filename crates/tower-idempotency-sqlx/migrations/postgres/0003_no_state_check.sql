-- tower-idempotency-sqlx, PostgreSQL migration 0003: no CHECK constraint on `state`.
--
-- PostgreSQL reads a table's CHECK constraints from the catalog and plans them again in every
-- INSERT and UPDATE (per statement, not once per connection), and a first request writes twice:
-- profiled on the fresh path, the one CHECK of 0001 cost about 23 us of database CPU per request,
-- about 6 % of it (docs/benchmarks.md, "Issue 18, third pass"). The ledger writes `state` only as
-- the constants of its own statements, and a record whose state is neither `in_progress` nor
-- `completed` is refused when read (`LedgerError::Corrupt`), so nothing is replayed from it.
-- Only 0001's constraint is dropped (its definition names `state` and both values); a CHECK of
-- your own on the table stays. Idempotent, like 0001: once the constraint is gone this finds
-- nothing and takes no lock.
DO $$
DECLARE
    constraint_name name;
BEGIN
    FOR constraint_name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = '{{table}}'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%state%in_progress%completed%'
    LOOP
        EXECUTE format('ALTER TABLE {{table}} DROP CONSTRAINT %I', constraint_name);
    END LOOP;
END
$$;
