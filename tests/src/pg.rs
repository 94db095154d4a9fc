//! PostgreSQL clean-up that must run from `Drop`, where nothing can be awaited.

use std::time::Duration;

use tower_idempotency_sqlx::sqlx::{self, AssertSqlSafe, postgres::PgPoolOptions};

/// Drops `table` on `url`, blocking: on a thread with a runtime of its own and a connection of
/// its own, giving up after a few seconds (a lock a failing test still holds would otherwise
/// block the `DROP`) rather than hang the test. For a test's `Drop`, pass or fail.
pub fn drop_table_blocking(url: String, table: String) {
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
            let sql = format!("SET lock_timeout = '5s'; DROP TABLE IF EXISTS \"{table}\"");
            let _ = sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await;
            pool.close().await;
        });
    });
    let _ = cleanup.join();
}
