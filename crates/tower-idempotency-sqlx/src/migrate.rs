//! Creating a ledger's table from the SQL shipped in `migrations/`, for every backend.

use sqlx::{AssertSqlSafe, Executor};

use crate::{SqlLedger, backend::Backend, table::render_migration};

impl<DB: Backend> SqlLedger<DB>
where
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
{
    /// Creates the table and its indexes if they do not exist, running the migrations shipped in
    /// `migrations/sqlite/` or `migrations/postgres/` in one transaction (on PostgreSQL under an
    /// advisory lock, so app instances that start together do not race). Safe to run at every
    /// start. The schema of a qualified PostgreSQL name must exist.
    pub async fn migrate(&self) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        DB::before_migrations(&mut tx, &self.table).await?;
        for (_, sql) in DB::MIGRATIONS {
            sqlx::raw_sql(AssertSqlSafe(render_migration(sql, &self.table)))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }
}

impl<DB: Backend> SqlLedger<DB> {
    /// The migrations as run for this ledger's table: `(name, SQL)` in order, for applying them
    /// with your own migration tool.
    pub fn migrations(&self) -> Vec<(&'static str, String)> {
        DB::MIGRATIONS
            .iter()
            .map(|(name, sql)| (*name, render_migration(sql, &self.table)))
            .collect()
    }
}
