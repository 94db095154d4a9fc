//! `RedisLedger`: the type, its keys and calls, and the `Ledger` implementation. The builder,
//! the connection, the scripts and the operator calls are in the submodules.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use redis::{FromRedisValue, ScriptInvocation, Value};
use tokio::time::Instant;
use tower_idempotency_core::{
    Claim, ClaimRequest, FencingToken, Lease, Ledger, LedgerError, LedgerKey, OperationId,
    RecordInfo, RecordState, ScopeDigest, StoredResponse,
};

use crate::{
    codec::{self, ClaimReply},
    notifier::Notifier,
};

mod builder;
mod connection;
mod operator;
mod scripts;

pub use builder::{DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT, RedisLedgerBuilder};
use connection::{Connection, error, millis};
pub use operator::STUCK_SCAN_LIMIT;
pub use scripts::script_sources;
use scripts::{CLAIM, COMPLETE, EVICT, HELD, RELEASE, RENEW};

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

    /// `f`, bounded by the call timeout and boxed: redis-rs's futures make a call's future
    /// several KB, and the layer holds a claim's future inline in every request's state (see
    /// `Ledger`'s docs); one allocation per round trip costs less than moving that state.
    fn call<T>(
        &self,
        f: impl Future<Output = Result<T, LedgerError>> + Send,
    ) -> impl Future<Output = Result<T, LedgerError>> + Send {
        let call = tokio::time::timeout(self.inner.call_timeout, f);
        Box::pin(async move {
            call.await
                .unwrap_or_else(|elapsed| Err(LedgerError::backend(elapsed)))
        })
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

/// How often a waiter without a subscription re-reads the record.
const POLL: Duration = Duration::from_millis(100);
/// How often a subscribed waiter re-reads the record anyway, in case a message was lost.
const RECHECK: Duration = Duration::from_millis(1000);

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
        self.stuck_records(older_than, limit).await
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
