//! `RedisLedgerBuilder`: the settings, and connecting to a server or a Cluster.

use std::{sync::Arc, time::Duration};

use redis::{
    ConnectionInfo, IntoConnectionInfo, RedisError, aio::ConnectionManagerConfig,
    cluster::ClusterClientBuilder,
};

use super::{
    Inner, RedisLedger,
    connection::{Connection, bounded},
};
use crate::{ConfigError, notifier};

/// The key prefix used unless [`with_prefix`](RedisLedgerBuilder::with_prefix) says otherwise.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// The response timeout used unless
/// [`with_response_timeout`](RedisLedgerBuilder::with_response_timeout) says otherwise.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds a [`RedisLedger`]: settings first, then [`connect`](Self::connect) (one server) or
/// [`connect_cluster`](Self::connect_cluster).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_idempotency_redis::RedisLedger;
///
/// let ledger = RedisLedger::builder()
///     .with_prefix("billing:idem:")?
///     .with_response_timeout(Duration::from_millis(500))
///     .connect("redis://cache.internal:6379")
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisLedgerBuilder {
    prefix: String,
    response_timeout: Duration,
    wait_replicas: Option<(u32, Duration)>,
    nodelay: bool,
}

impl Default for RedisLedgerBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            wait_replicas: None,
            nodelay: true,
        }
    }
}

impl RedisLedgerBuilder {
    /// The prefix of every key and of the change channel. Default [`DEFAULT_PREFIX`]
    /// (`"idempotency:"`). At most 128 bytes, printable ASCII without `{`, `}` or spaces (the
    /// braces would change the Cluster hash tag).
    ///
    /// ```
    /// use tower_idempotency_redis::RedisLedger;
    /// assert!(RedisLedger::builder().with_prefix("app:idem:").is_ok());
    /// assert!(RedisLedger::builder().with_prefix("{app}:").is_err());
    /// ```
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, ConfigError> {
        if prefix.len() > 128
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
        {
            return Err(ConfigError::InvalidPrefix(prefix.to_owned()));
        }
        self.prefix = prefix.to_owned();
        Ok(self)
    }

    /// How long one Redis command may take before it fails (a hung or unreachable Redis is a
    /// [`LedgerError::Backend`](tower_idempotency_core::LedgerError::Backend), not a hang). Default [`DEFAULT_RESPONSE_TIMEOUT`] (1 s); also
    /// the connect timeout. A whole ledger call (a script, its reload after a restart, a
    /// Cluster index write) is bounded by three times this.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Whether the connections set `TCP_NODELAY` (turn Nagle's algorithm off). Default: on
    /// (redis-rs leaves it off). The ledger multiplexes every call on one connection per node;
    /// with Nagle on, a call written while an earlier one is unacknowledged waits for that call's
    /// answer, a round trip more for every call made while another is in flight. Measured
    /// through a 1.1 ms round trip with 4 concurrent requests: a replay took 1.3 ms with it off,
    /// 2.3 ms with it on. On the same host as Redis, at high concurrency, leaving Nagle on
    /// batches writes and costs fewer packets (fresh requests about 15 % faster at 32 connections
    /// over loopback): `with_tcp_nodelay(false)` there. docs/benchmarks.md, issue 18.
    pub fn with_tcp_nodelay(mut self, nodelay: bool) -> Self {
        self.nodelay = nodelay;
        self
    }

    /// After every won claim, waits until `replicas` replicas have acknowledged it (Redis
    /// `WAIT replicas timeout`), so that a failover right after the claim does not lose it. If
    /// fewer acknowledge within `timeout`, the claim is released and the call fails with
    /// [`LedgerError::Backend`](tower_idempotency_core::LedgerError::Backend) (the layer answers 503; the client retries). Default: off.
    ///
    /// `WAIT` blocks the connection it runs on, and the ledger multiplexes one connection per
    /// node, so other ledger calls queue behind it for up to the replicas' acknowledgement
    /// time. Keep `timeout` well below the response timeout.
    pub fn with_wait_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait_replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// Connects to one Redis server (a `redis://` or `rediss://` URL, or any
    /// [`IntoConnectionInfo`]). The connection reconnects by itself after a failure.
    pub async fn connect(self, url: impl IntoConnectionInfo) -> Result<RedisLedger, RedisError> {
        let info = with_nodelay(url.into_connection_info()?, self.nodelay);
        let client = redis::Client::open(info)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(self.response_timeout))
            .set_connection_timeout(Some(self.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(self.response_timeout);
        let manager = bounded(
            self.response_timeout * 3,
            client.get_connection_manager_with_config(config),
        )
        .await??;
        Ok(self.finish(Connection::Single(manager), vec![client], false))
    }

    /// Connects to a Redis Cluster through its seed nodes (any of its nodes; more than one, so
    /// that the ledger starts while one is down). Slots, redirections and failovers are
    /// followed by the client.
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        self,
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<RedisLedger, RedisError> {
        let infos = nodes
            .into_iter()
            .map(|node| {
                node.into_connection_info()
                    .map(|info| with_nodelay(info, self.nodelay))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let clients = infos
            .iter()
            .cloned()
            .map(redis::Client::open)
            .collect::<Result<Vec<_>, _>>()?;
        if clients.is_empty() {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "a Redis Cluster needs at least one seed node",
            )));
        }
        // The cluster client takes one set of TCP settings for every node it finds: the first
        // seed's (there is one, checked above).
        let tcp = infos
            .first()
            .map(|info| info.tcp_settings().clone())
            .unwrap_or_default();
        let client = ClusterClientBuilder::new(infos)
            .tcp_settings(tcp)
            .response_timeout(self.response_timeout)
            .connection_timeout(self.response_timeout)
            .build()?;
        let connection =
            bounded(self.response_timeout * 3, client.get_async_connection()).await??;
        Ok(self.finish(Connection::Cluster(connection), clients, true))
    }

    fn finish(
        self,
        connection: Connection,
        clients: Vec<redis::Client>,
        cluster: bool,
    ) -> RedisLedger {
        let channel = format!("{}changed", self.prefix);
        RedisLedger {
            inner: Arc::new(Inner {
                connection,
                // On one server the scripts keep the operation index themselves; on a Cluster it
                // is in another slot than the record, and the client writes it.
                script_index: if cluster {
                    String::new()
                } else {
                    format!("{}op:{{", self.prefix)
                },
                cluster,
                call_timeout: self.response_timeout * 3,
                wait_replicas: self.wait_replicas,
                notifier: notifier::notifier(clients, channel),
                prefix: self.prefix,
            }),
        }
    }
}

impl RedisLedger {
    /// A builder with the defaults: prefix `"idempotency:"`, response timeout 1 s, no `WAIT`.
    pub fn builder() -> RedisLedgerBuilder {
        RedisLedgerBuilder::default()
    }

    /// Connects to one Redis server with the default settings.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), tower_idempotency_redis::redis::RedisError> {
    /// let ledger = tower_idempotency_redis::RedisLedger::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: impl IntoConnectionInfo) -> Result<Self, RedisError> {
        Self::builder().connect(url).await
    }

    /// Connects to a Redis Cluster with the default settings; see
    /// [`RedisLedgerBuilder::connect_cluster`].
    pub async fn connect_cluster<T: IntoConnectionInfo>(
        nodes: impl IntoIterator<Item = T>,
    ) -> Result<Self, RedisError> {
        Self::builder().connect_cluster(nodes).await
    }
}

/// `info` with `TCP_NODELAY` as [`RedisLedgerBuilder::with_tcp_nodelay`] says, its other TCP
/// settings kept.
fn with_nodelay(info: ConnectionInfo, nodelay: bool) -> ConnectionInfo {
    let tcp = info.tcp_settings().clone().set_nodelay(nodelay);
    info.set_tcp_settings(tcp)
}

#[cfg(test)]
mod tests {
    use redis::IntoConnectionInfo;

    #[test]
    fn connections_turn_nagle_off_and_keep_the_rest() {
        let info = "redis://127.0.0.1:6379/3"
            .into_connection_info()
            .expect("a valid URL");
        assert!(!info.tcp_settings().nodelay(), "redis-rs's default changed");
        let info = super::with_nodelay(info, super::RedisLedgerBuilder::default().nodelay);
        assert!(
            info.tcp_settings().nodelay(),
            "the builder's default is TCP_NODELAY"
        );
        assert_eq!(info.redis_settings().db(), 3);
    }
}
