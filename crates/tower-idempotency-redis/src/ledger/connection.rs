//! The connection to one server or a Cluster, and the bounds on its calls.

use std::{future::Future, time::Duration};

use redis::{
    Cmd, FromRedisValue, RedisError, ScriptInvocation,
    aio::ConnectionManager,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};
use tower_idempotency_core::LedgerError;

/// A duration in whole milliseconds, at least 1 (PEXPIRE 0 deletes the key at once) and capped
/// at about 100 years, as the other ledgers cap it.
pub(super) fn millis(duration: Duration) -> u64 {
    const CAP: u64 = 100 * 366 * 24 * 3600 * 1000;
    u64::try_from(duration.as_millis()).map_or(CAP, |ms| ms.clamp(1, CAP))
}

#[derive(Clone)]
pub(super) enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(super) async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        // Both handles are cheap clones over one multiplexed connection (per node).
        match self.clone() {
            Self::Single(mut c) => invocation.invoke_async(&mut c).await,
            Self::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        }
    }

    pub(super) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        match self.clone() {
            Self::Single(mut c) => cmd.query_async(&mut c).await,
            Self::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    /// `WAIT` on the node that holds `record`.
    pub(super) async fn wait_replicas(
        &self,
        record: &[u8],
        replicas: u32,
        timeout: Duration,
    ) -> Result<u32, RedisError> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(millis(timeout));
        match self.clone() {
            Self::Single(mut c) => cmd.query_async(&mut c).await,
            Self::Cluster(mut c) => {
                let route = Route::with_key(record, SlotAddr::Master);
                let value = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(value).map_err(RedisError::from)
            }
        }
    }
}

pub(super) async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = T>,
) -> Result<T, RedisError> {
    tokio::time::timeout(limit, f).await.map_err(|_| {
        RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from Redis within {limit:?}"),
        ))
    })
}

/// A Redis error as a ledger error: a reply that does not parse is corrupt data, anything else
/// a backend failure.
pub(super) fn error(error: RedisError) -> LedgerError {
    match error.kind() {
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
            LedgerError::corrupt(error.to_string())
        }
        _ => LedgerError::backend(error),
    }
}
