//! PostgreSQL clean-up that must run from `Drop`, where nothing can be awaited.

use std::time::Duration;

use tower_idempotency_sqlx::sqlx::{self, AssertSqlSafe, postgres::PgPoolOptions};

/// Drops `table` on `url`, blocking: on a thread with a runtime of its own and a connection of
/// its own, giving up after a few seconds (a lock a failing test still holds would otherwise
/// block the `DROP`) rather than hang the test. For a test's `Drop`, pass or fail.
pub fn drop_table_blocking(url: String, table: String) {
    execute_blocking(url, format!("DROP TABLE IF EXISTS \"{table}\""));
}

/// Drops `schema` and everything in it on `url`, blocking, as [`drop_table_blocking`] does.
pub fn drop_schema_blocking(url: String, schema: String) {
    execute_blocking(url, format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"));
}

/// Runs `sql` on `url` under a 5 s lock timeout, on a thread, runtime and connection of its own,
/// and waits for it; errors are ignored (this is clean-up).
fn execute_blocking(url: String, sql: String) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let connect = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(&url);
            let Ok(pool) = connect.await else {
                return;
            };
            let sql = format!("SET lock_timeout = '5s'; {sql}");
            let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await;
            pool.close().await;
        });
    });
    let _ = cleanup.join();
}

/// Drops its schema when dropped, pass or fail: for a test that makes a schema of its own.
#[derive(Debug)]
pub struct SchemaGuard {
    /// The database.
    pub url: String,
    /// The schema to drop.
    pub schema: String,
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        drop_schema_blocking(self.url.clone(), self.schema.clone());
    }
}

/// Drops its roles (and revokes what was granted to them) when dropped, pass or fail: for a test
/// that makes roles of its own. Roles are cluster-wide, so a leaked one outlives the database.
#[derive(Debug)]
pub struct RoleGuard {
    /// The database.
    pub url: String,
    /// The roles to drop.
    pub roles: Vec<String>,
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        for role in &self.roles {
            let literal = role.replace('\'', "''");
            let ident = role.replace('"', "\"\"");
            execute_blocking(
                self.url.clone(),
                format!(
                    "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{literal}') THEN \
                       EXECUTE 'DROP OWNED BY \"{ident}\"'; EXECUTE 'DROP ROLE \"{ident}\"'; \
                     END IF; END $$"
                ),
            );
        }
    }
}
