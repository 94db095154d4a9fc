//! `RedisLedger`: the connection, the scripts, and the `Ledger` implementation.

use std::{
    fmt,
    future::Future,
    sync::{Arc, LazyLock},
    time::Duration,
};

use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, RedisError, Script, ScriptInvocation, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, Lease, Ledger, LedgerError, LedgerKey, OperationId,
    Progress, RecordInfo, RecordState, ScopeDigest, StoredResponse, system_time_from_millis,
};

use crate::{
    ConfigError,
    codec::{self, ClaimReply},
    notifier::Notifier,
};

/// The key prefix used unless [`with_prefix`](RedisLedgerBuilder::with_prefix) says otherwise.
pub const DEFAULT_PREFIX: &str = "idempotency:";

/// The response timeout used unless
/// [`with_response_timeout`](RedisLedgerBuilder::with_response_timeout) says otherwise.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

macro_rules! script {
    ($name:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/prelude.lua"),
                include_str!(concat!("lua/", $name, ".lua"))
            ))
        })
    };
}

static CLAIM: LazyLock<Script> = script!("claim");
static COMPLETE: LazyLock<Script> = script!("complete");
static RELEASE: LazyLock<Script> = script!("release");
static RENEW: LazyLock<Script> = script!("renew");
static HELD: LazyLock<Script> = script!("held");
static INSPECT: LazyLock<Script> = script!("inspect");
static EVICT: LazyLock<Script> = script!("evict");

/// How many keys [`stuck`](Ledger::stuck) scans at most, so that one call on a large keyspace
/// stays bounded; a record beyond it is not listed.
pub const STUCK_SCAN_LIMIT: usize = 10_000;

/// The Lua source of the scripts, by name, for review and for tests: `claim`, `complete`,
/// `release`, `renew`, `held`, `inspect` and `evict`, each with the shared prelude in front.
pub fn script_sources() -> [(&'static str, &'static str); 7] {
    macro_rules! source {
        ($name:literal) => {
            (
                $name,
                concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!(concat!("lua/", $name, ".lua"))
                ),
            )
        };
    }
    [
        source!("claim"),
        source!("complete"),
        source!("release"),
        source!("renew"),
        source!("held"),
        source!("inspect"),
        source!("evict"),
    ]
}

/// A duration in whole milliseconds, at least 1 (PEXPIRE 0 deletes the key at once) and capped
/// at about 100 years, as the other ledgers cap it.
fn millis(duration: Duration) -> u64 {
    const CAP: u64 = 100 * 366 * 24 * 3600 * 1000;
    u64::try_from(duration.as_millis()).map_or(CAP, |ms| ms.clamp(1, CAP))
}

#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, RedisError> {
        // Both handles are cheap clones over one multiplexed connection (per node).
        match self.clone() {
            Self::Single(mut c) => invocation.invoke_async(&mut c).await,
            Self::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, RedisError> {
        match self.clone() {
            Self::Single(mut c) => cmd.query_async(&mut c).await,
            Self::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }

    /// `WAIT` on the node that holds `record`.
    async fn wait_replicas(
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
}

impl Default for RedisLedgerBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            wait_replicas: None,
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
    /// [`LedgerError::Backend`], not a hang). Default [`DEFAULT_RESPONSE_TIMEOUT`] (1 s); also
    /// the connect timeout. A whole ledger call (a script, its reload after a restart, a
    /// Cluster index write) is bounded by three times this.
    pub fn with_response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// After every won claim, waits until `replicas` replicas have acknowledged it (Redis
    /// `WAIT replicas timeout`), so that a failover right after the claim does not lose it. If
    /// fewer acknowledge within `timeout`, the claim is released and the call fails with
    /// [`LedgerError::Backend`] (the layer answers 503; the client retries). Default: off.
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
        let info = url.into_connection_info()?;
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
            .map(IntoConnectionInfo::into_connection_info)
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
        let client = ClusterClientBuilder::new(infos)
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
                notifier: Notifier::new(clients, channel),
                prefix: self.prefix,
            }),
        }
    }
}

async fn bounded<T>(limit: Duration, f: impl Future<Output = T>) -> Result<T, RedisError> {
    tokio::time::timeout(limit, f).await.map_err(|_| {
        RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from Redis within {limit:?}"),
        ))
    })
}

/// A ledger in Redis or a Redis Cluster, shared by every app instance that uses it. See the
/// [crate documentation](crate) for the key layout, the scripts, Cluster and durability.
///
/// Cloning is cheap and shares the connection and the subscriber.
#[derive(Clone)]
pub struct RedisLedger {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    prefix: String,
    /// The index-key prefix handed to the scripts: `{prefix}op:{` on one server, empty on a
    /// Cluster.
    script_index: String,
    cluster: bool,
    call_timeout: Duration,
    wait_replicas: Option<(u32, Duration)>,
    notifier: Notifier,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger")
            .field("prefix", &self.inner.prefix)
            .field("cluster", &self.inner.cluster)
            .field("call_timeout", &self.inner.call_timeout)
            .field("wait_replicas", &self.inner.wait_replicas)
            .finish_non_exhaustive()
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

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether this ledger is on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.cluster
    }

    /// The pub/sub channel that completions and releases of watched records are published on,
    /// with the record's key as the message: the prefix and `changed`.
    pub fn channel(&self) -> &str {
        self.inner.notifier.channel()
    }

    /// The Redis key of the record of `key`: the prefix, then the digest in lowercase hex as
    /// the Cluster hash tag: `idempotency:{3f2a…}`.
    pub fn record_key(&self, key: &LedgerKey) -> String {
        let mut out = String::with_capacity(self.inner.prefix.len() + 66);
        out.push_str(&self.inner.prefix);
        out.push('{');
        for b in key.as_bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('}');
        out
    }

    /// The Redis key of the operation-id index entry of `id`: `idempotency:op:{<id hex>}`,
    /// holding the record's key.
    pub fn operation_key(&self, id: OperationId) -> String {
        format!("{}op:{{{}}}", self.inner.prefix, id.simple())
    }

    async fn call<T>(
        &self,
        f: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, LedgerError> {
        tokio::time::timeout(self.inner.call_timeout, f)
            .await
            .unwrap_or_else(|elapsed| Err(LedgerError::backend(elapsed)))
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T, LedgerError> {
        self.inner
            .connection
            .invoke(invocation)
            .await
            .map_err(error)
    }

    /// On a Cluster, moves the index entry's expiry to at least `ttl` (the scripts do it
    /// themselves on one server). A failure only delays operation lookups, so it is logged.
    async fn extend_index(&self, id: OperationId, ttl: Duration) {
        if !self.inner.cluster {
            return;
        }
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(self.operation_key(id)).arg(millis(ttl)).arg("GT");
        if let Err(error) = self.inner.connection.query::<Value>(&cmd).await {
            tracing::warn!(%error, operation_id = %id, "extending the idempotency operation index failed");
        }
    }

    async fn claim_once(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        let record = self.record_key(&request.key);
        let mut invocation = CLAIM.key(&record);
        invocation
            .arg(&request.scope.as_bytes()[..])
            .arg(&request.fingerprint.as_bytes()[..])
            .arg(&request.operation_id.as_bytes()[..])
            .arg(&request.token.as_uuid().as_bytes()[..])
            .arg(millis(request.lease))
            .arg(millis(request.retention))
            .arg(&self.inner.script_index)
            .arg(self.channel());
        let reply: Value = self.invoke(&invocation).await?;
        let (taken_over, operation_id) = match codec::claim_reply(reply)? {
            ClaimReply::Lost(existing) => return Ok(Claim::Existing(existing)),
            ClaimReply::Won {
                taken_over,
                operation_id,
            } => (taken_over, operation_id),
        };
        let lease = Lease {
            token: request.token,
            operation_id,
            taken_over,
        };
        if self.inner.cluster {
            if taken_over {
                self.extend_index(operation_id, request.retention).await;
            } else {
                let mut cmd = redis::cmd("SET");
                cmd.arg(self.operation_key(operation_id))
                    .arg(&record)
                    .arg("PX")
                    .arg(millis(request.retention));
                if let Err(error) = self.inner.connection.query::<Value>(&cmd).await {
                    // Without its index the operation resource would 404 for the whole run:
                    // give the key back and fail the claim, so that the retry starts clean.
                    self.give_back(&request.key, request.token).await;
                    return Err(LedgerError::backend(error));
                }
            }
        }
        if let Some((replicas, timeout)) = self.inner.wait_replicas {
            let acked = self
                .inner
                .connection
                .wait_replicas(record.as_bytes(), replicas, timeout)
                .await;
            let failure = match acked {
                Ok(n) if n >= replicas => None,
                Ok(n) => Some(LedgerError::backend(format!(
                    "the claim reached {n} of {replicas} replicas within {timeout:?}"
                ))),
                Err(error) => Some(LedgerError::backend(error)),
            };
            if let Some(failure) = failure {
                self.give_back(&request.key, request.token).await;
                return Err(failure);
            }
        }
        Ok(Claim::Acquired(lease))
    }

    /// Best-effort release of a claim that is being failed.
    async fn give_back(&self, key: &LedgerKey, token: FencingToken) {
        if let Err(error) = self.release_once(key, token).await {
            tracing::warn!(%error, key = %key, "releasing a failed idempotency claim failed");
        }
    }

    async fn release_once(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        let mut invocation = RELEASE.key(self.record_key(key));
        invocation
            .arg(&token.as_uuid().as_bytes()[..])
            .arg(&self.inner.script_index)
            .arg(self.channel());
        let released: Option<Vec<u8>> = self.invoke(&invocation).await?;
        released.map(drop).ok_or(LedgerError::LeaseLost)
    }

    /// The token of the live lease on `key`, marking the record watched if `watch`.
    async fn held(&self, key: &LedgerKey, watch: bool) -> Result<Option<Vec<u8>>, LedgerError> {
        self.call(async {
            let mut invocation = HELD.key(self.record_key(key));
            invocation.arg(if watch { "1" } else { "0" });
            self.invoke(&invocation).await
        })
        .await
    }

    /// Polls the record every 100 ms until it is no longer in progress under the lease first
    /// seen, or `deadline`.
    async fn poll(&self, key: &LedgerKey, deadline: Instant) {
        let Ok(Some(first)) = self.held(key, false).await else {
            return;
        };
        loop {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            tokio::time::sleep(POLL.min(deadline - now)).await;
            match self.held(key, false).await {
                Ok(Some(token)) if token == first => {}
                _ => return,
            }
        }
    }
}

impl RedisLedger {
    /// The record under the Redis key `record`, for operators.
    async fn inspect_record(
        &self,
        record: &str,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        let reply: Option<Vec<Value>> = self.invoke(&INSPECT.key(record)).await?;
        let Some(fields) = reply else {
            return Ok(None);
        };
        let [st, tk, lu, fp, op, sc, rs, pttl, now]: [Value; 9] = fields
            .try_into()
            .map_err(|_| LedgerError::corrupt("inspect returned the wrong number of fields"))?;
        let number = |value: Value, what: &str| -> Result<i64, LedgerError> {
            let text = codec::bytes(value, what)?.unwrap_or_default();
            std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| LedgerError::corrupt(format!("stored {what} is not a number")))
        };
        let digest = |value: Value, what: &str| -> Result<[u8; 32], LedgerError> {
            let b = codec::bytes(value, what)?.unwrap_or_default();
            <[u8; 32]>::try_from(&b[..])
                .map_err(|_| LedgerError::corrupt(format!("stored {what} is not 32 bytes")))
        };
        let key = record
            .strip_prefix(&self.inner.prefix)
            .and_then(|rest| rest.strip_prefix('{')?.strip_suffix('}'))
            .and_then(|hex| {
                let mut out = [0u8; 32];
                (hex.len() == 64).then_some(())?;
                for (i, byte) in out.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
                }
                Some(LedgerKey::from_bytes(out))
            })
            .ok_or_else(|| LedgerError::corrupt("a record key is not a ledger key"))?;
        let now = number(now, "server time")?;
        let pttl = number(pttl, "expiry")?;
        let lease_until = number(lu, "lease")?;
        let progress = match codec::state(st, rs)? {
            // `codec::state` reads the stored state only; whether the lease lapsed is below.
            RecordState::InProgress | RecordState::Abandoned => {
                let token = codec::bytes(tk, "token")?.unwrap_or_default();
                let token = <[u8; 16]>::try_from(&token[..])
                    .map_err(|_| LedgerError::corrupt("stored token is not 16 bytes"))?;
                Progress::InProgress {
                    token: FencingToken::from_uuid(uuid::Uuid::from_bytes(token)),
                    lease_until: system_time_from_millis(lease_until),
                    lease_lapsed: lease_until <= now,
                }
            }
            RecordState::Completed(response) => Progress::Completed {
                status: response.status,
                body_len: response.body.len(),
                body_omitted: response.body_omitted,
                response: with_body.then_some(response),
            },
        };
        Ok(Some(RecordInfo {
            key,
            scope: ScopeDigest::from_bytes(digest(sc, "scope")?),
            operation_id: codec::operation_id(op)?,
            fingerprint: codec::fingerprint(fp)?,
            // A record without an expiry (PTTL -1) is not one of ours; report it as expiring now.
            expires_at: system_time_from_millis(now + pttl.max(0)),
            progress,
        }))
    }

    /// Up to [`STUCK_SCAN_LIMIT`] record keys under the prefix (operation-index keys excluded),
    /// by `SCAN`.
    async fn scan_records(&self) -> Result<Vec<String>, LedgerError> {
        let mut pattern = String::new();
        for c in self.inner.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push_str("{*");
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let (next, batch): (u64, Vec<String>) = self
                .call(async { self.inner.connection.query(&scan).await.map_err(error) })
                .await?;
            keys.extend(batch);
            if next == 0 || keys.len() >= STUCK_SCAN_LIMIT {
                keys.truncate(STUCK_SCAN_LIMIT);
                return Ok(keys);
            }
            cursor = next;
        }
    }
}

/// How often a waiter without a subscription re-reads the record.
const POLL: Duration = Duration::from_millis(100);
/// How often a subscribed waiter re-reads the record anyway, in case a message was lost.
const RECHECK: Duration = Duration::from_millis(1000);

fn error(error: RedisError) -> LedgerError {
    match error.kind() {
        redis::ErrorKind::Parse | redis::ErrorKind::UnexpectedReturnType => {
            LedgerError::corrupt(error.to_string())
        }
        _ => LedgerError::backend(error),
    }
}

impl Ledger for RedisLedger {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn claim(&self, request: &ClaimRequest) -> Result<Claim, LedgerError> {
        self.call(self.claim_once(request)).await
    }

    async fn complete(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> Result<(), LedgerError> {
        self.call(async {
            let mut invocation = COMPLETE.key(self.record_key(key));
            invocation
                .arg(&token.as_uuid().as_bytes()[..])
                .arg(codec::encode_response(response))
                .arg(millis(retention))
                .arg(&self.inner.script_index)
                .arg(self.channel());
            let done: Option<Value> = self.invoke(&invocation).await?;
            let id = codec::operation_id(done.ok_or(LedgerError::LeaseLost)?)?;
            self.extend_index(id, retention).await;
            Ok(())
        })
        .await
    }

    async fn release(&self, key: &LedgerKey, token: FencingToken) -> Result<(), LedgerError> {
        self.call(self.release_once(key, token)).await
    }

    async fn renew(
        &self,
        key: &LedgerKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<(), LedgerError> {
        self.call(async {
            let mut invocation = RENEW.key(self.record_key(key));
            invocation
                .arg(&token.as_uuid().as_bytes()[..])
                .arg(millis(lease))
                .arg(&self.inner.script_index);
            let done: Option<Value> = self.invoke(&invocation).await?;
            let id = codec::operation_id(done.ok_or(LedgerError::LeaseLost)?)?;
            self.extend_index(id, lease).await;
            Ok(())
        })
        .await
    }

    /// Two plain reads: the index entry gives the record's key, then the record, whose scope and
    /// operation id must match (the entry may outlive a released or replaced record).
    async fn operation(
        &self,
        scope: &ScopeDigest,
        id: OperationId,
    ) -> Result<Option<RecordState>, LedgerError> {
        self.call(async {
            let mut get = redis::cmd("GET");
            get.arg(self.operation_key(id));
            let record: Option<Vec<u8>> = self.inner.connection.query(&get).await.map_err(error)?;
            let Some(record) = record else {
                return Ok(None);
            };
            if !record.starts_with(self.inner.prefix.as_bytes()) {
                return Err(LedgerError::corrupt(
                    "operation index points outside the ledger",
                ));
            }
            let mut hmget = redis::cmd("HMGET");
            hmget
                .arg(&record)
                .arg("sc")
                .arg("op")
                .arg("st")
                .arg("rs")
                .arg("lu");
            let fields: Vec<Value> = self.inner.connection.query(&hmget).await.map_err(error)?;
            let [sc, op, st, rs, lu]: [Value; 5] = fields
                .try_into()
                .map_err(|_| LedgerError::corrupt("HMGET returned the wrong number of fields"))?;
            let Some(sc) = codec::bytes(sc, "scope")? else {
                return Ok(None); // the record is gone
            };
            if sc[..] != scope.as_bytes()[..] || codec::operation_id(op)? != id {
                return Ok(None);
            }
            match codec::state(st, rs)? {
                // Leases are decided by the server's clock (as the scripts do): a third read,
                // for in-progress records only.
                RecordState::InProgress => {
                    let lease_until = codec::bytes(lu, "lease")?
                        .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok())
                        .ok_or_else(|| {
                            LedgerError::corrupt("an in-progress record has no lease")
                        })?;
                    let (secs, micros): (u64, u64) = self
                        .inner
                        .connection
                        .query(&redis::cmd("TIME"))
                        .await
                        .map_err(error)?;
                    let now = secs * 1000 + micros / 1000;
                    Ok(Some(if lease_until <= now {
                        RecordState::Abandoned
                    } else {
                        RecordState::InProgress
                    }))
                }
                state => Ok(Some(state)),
            }
        })
        .await
    }

    /// Returns 0 and sends nothing: every record carries a Redis expiry (`PEXPIRE`), so Redis
    /// deletes it at its deadline and nothing is left to purge.
    async fn purge_expired(&self, batch: usize) -> Result<u64, LedgerError> {
        let _ = batch;
        Ok(0)
    }

    /// `true`: Redis deletes each record at its expiry.
    fn expires_records_itself(&self) -> bool {
        true
    }

    /// Subscribes (once per ledger) to the change channel, marks the record watched and checks
    /// its state in one script, then waits for its message, re-reading the record every second
    /// in case a message was lost. Without a subscription (it cannot connect, or is
    /// reconnecting) it polls every 100 ms.
    async fn wait_for_change(&self, key: &LedgerKey, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if !self.inner.notifier.listening(deadline).await {
            return self.poll(key, deadline).await;
        }
        let record = self.record_key(key);
        // Registered before the record is checked, so that a completion between the check and
        // the wait is not missed; one before the check makes the check return at once.
        let mut waiter = self.inner.notifier.waiter(record.as_bytes());
        let Ok(Some(first)) = self.held(key, true).await else {
            return;
        };
        loop {
            let tick = (Instant::now() + RECHECK).min(deadline);
            if waiter.changed_before(tick).await || Instant::now() >= deadline {
                return;
            }
            match self.held(key, false).await {
                Ok(Some(token)) if token == first => {}
                _ => return,
            }
        }
    }

    /// One script reads the record, its remaining time to live and Redis's clock.
    async fn inspect(
        &self,
        key: &LedgerKey,
        with_body: bool,
    ) -> Result<Option<RecordInfo>, LedgerError> {
        self.call(self.inspect_record(&self.record_key(key), with_body))
            .await
    }

    /// `SCAN`s the prefix (at most [`STUCK_SCAN_LIMIT`] keys, so on a larger keyspace some
    /// stuck records may be missed), then inspects each record: one round trip per record, for
    /// on-call use rather than a dashboard's poll. Not on a Cluster, where `SCAN` is per node:
    /// [`LedgerError::Unsupported`].
    async fn stuck(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<Vec<RecordInfo>, LedgerError> {
        if self.inner.cluster {
            return Err(LedgerError::Unsupported { operation: "stuck" });
        }
        let older_than = older_than.min(tower_idempotency_core::MAX_DURATION);
        let mut found = Vec::new();
        for record in self.scan_records().await? {
            let info = self.call(self.inspect_record(&record, false)).await?;
            if let Some(
                info @ RecordInfo {
                    progress: Progress::InProgress { lease_until, .. },
                    ..
                },
            ) = info
            {
                // Judged by Redis's clock: the record said whether its lease lapsed, and when.
                let lapsed_for = match &info.progress {
                    Progress::InProgress {
                        lease_lapsed: true, ..
                    } => std::time::SystemTime::now()
                        .duration_since(lease_until)
                        .unwrap_or_default(),
                    _ => continue,
                };
                if lapsed_for >= older_than {
                    found.push((lease_until, info));
                }
            }
        }
        found.sort_by_key(|(lease_until, _)| *lease_until);
        Ok(found
            .into_iter()
            .take(limit)
            .map(|(_, info)| info)
            .collect())
    }

    async fn evict(&self, key: &LedgerKey) -> Result<bool, LedgerError> {
        self.call(async {
            let mut invocation = EVICT.key(self.record_key(key));
            invocation.arg(&self.inner.script_index).arg(self.channel());
            let deleted: i64 = self.invoke(&invocation).await?;
            Ok(deleted == 1)
        })
        .await
    }
}
