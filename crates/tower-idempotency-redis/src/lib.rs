//! A Redis ledger for [tower-idempotency](https://docs.rs/tower-idempotency): [`RedisLedger`],
//! for one Redis server (7.0 or later) or a Redis Cluster, shared by every app instance that
//! uses it. It passes the
//! [conformance suite](https://docs.rs/tower-idempotency-core/latest/tower_idempotency_core/conformance/)
//! of the [`Ledger`] contract on both (its `purge_expired` has nothing to purge: below).
//!
//! # Quick start
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tower_idempotency_redis::RedisLedger;
//!
//! // One server:
//! let ledger = RedisLedger::builder()
//!     .with_prefix("payments:idem:")?
//!     .with_response_timeout(Duration::from_millis(500))
//!     .connect("redis://cache.internal:6379")
//!     .await?;
//!
//! // A Cluster, through some of its nodes:
//! let clustered = RedisLedger::connect_cluster([
//!     "redis://10.0.0.1:6379",
//!     "redis://10.0.0.2:6379",
//!     "redis://10.0.0.3:6379",
//! ])
//! .await?;
//! // hand either to the idempotency layer; no purge task is needed
//! # Ok(()) }
//! ```
//!
//! # Keys
//!
//! With the default prefix `idempotency:`:
//!
//! | key | type | holds | expires |
//! |---|---|---|---|
//! | `idempotency:{<ledger key, 64 hex>}` | hash | the record | at its retention (`PEXPIRE`) |
//! | `idempotency:op:{<operation id, 32 hex>}` | string | the record's key | no sooner than the record |
//! | `idempotency:changed` | pub/sub channel | record keys, as they change | |
//!
//! The record's fields: `st` (`p` in progress, `c` completed), `tk` the fencing token and `lu`
//! the lease deadline (in progress only, milliseconds by the server's clock), `fp` the
//! fingerprint, `op` the operation id, `sc` the scope digest, `rs` the stored response (completed
//! only), `w` set when a waiter watches the record. The raw idempotency key is never stored.
//!
//! The stored response is one binary field: a version byte, the status (u16), a flags byte
//! (body omitted), the headers' length (u32) and the headers as
//! [`StoredResponse::encode_headers`] writes them (every value of a repeated header, in order, as
//! opaque bytes, so values that are not UTF-8 survive), then the body bytes.
//!
//! # One script per step
//!
//! Claim, complete, release and renew are each one Lua script, run with `EVALSHA` (loaded again
//! by the client after a `NOSCRIPT`, such as after a restart), keyed by the record alone. A
//! script runs atomically in Redis, so no client ever reads and then writes. The source is in
//! [`script_sources`].
//!
//! - **claim** inserts the record, or takes over an in-progress record whose lease has passed
//!   *and* whose fingerprint is the claimant's (keeping its operation id), or writes nothing and
//!   returns the record that holds the key. A record past its retention is already gone: Redis
//!   deleted it.
//! - **complete**, **release**, **renew** act only while the record is in progress under the
//!   caller's token; otherwise they write nothing and the call is [`LedgerError::LeaseLost`].
//! - **Leases are decided by the server's clock**: each script reads `TIME`. App instances whose
//!   clocks disagree still agree on who holds a key. Retention is a Redis expiry (`PEXPIRE`), so
//!   Redis deletes expired records itself, and [`purge_expired`](Ledger::purge_expired) returns
//!   0 without a round trip. (The core conformance check of purge counts deleted records, so
//!   this crate's tests replace it with one checking that the expired keys are gone from
//!   Redis.) [`purge_periodically`] is not needed.
//!
//! # Redis Cluster
//!
//! The record's key carries its digest as the hash tag (`{…}`), so records spread over every
//! slot and each script touches one slot. The operation-id index cannot share the record's
//! slot, because the operation resource looks an operation up by its id alone. So:
//!
//! - On one server the scripts write and expire the index entry themselves, atomically with the
//!   record.
//! - On a Cluster the client writes it after the claim (`SET … PX`) and extends it after
//!   complete, renew and takeover (`PEXPIRE … GT`, so that a late write never shortens it). If
//!   the first write fails, the claim is released and fails, so that the operation resource is
//!   never missing for a whole run; a failed extension is logged.
//! - A lookup reads the index entry, then the record, and answers only if the record's scope
//!   digest and operation id match. That second step is a plain read, not a write, and it makes
//!   a stale entry (the record was released or replaced) answer "not found". An entry can
//!   outlive its record by about the time the handler ran; it is ~100 bytes.
//!
//! Regular `PUBLISH` reaches every node of a Cluster, so the subscriber connects to any one node
//! (the seed nodes in turn). The client follows `MOVED`/`ASK` and refreshes its slot map.
//!
//! # Waiting across instances
//!
//! [`wait_for_change`](Ledger::wait_for_change) (the layer's `Wait` policy) uses one pub/sub
//! connection per ledger, started by the first waiter. It subscribes first, then marks the record
//! watched and checks its state in one script: a completion that landed before the subscription
//! is seen by that check, and one after it publishes. Only watched records publish, so requests
//! nobody waits for cost no pub/sub traffic. A subscribed waiter re-reads the record every
//! second anyway, in case a message was lost. The subscriber pings its server every 2 s; when
//! it is lost or stops answering, every waiter is woken to re-check, and waiters poll every
//! 100 ms until it is back.
//!
//! # Timeouts and errors
//!
//! Every command has a response timeout (default 1 s,
//! [`with_response_timeout`](RedisLedgerBuilder::with_response_timeout)), and every ledger call
//! is bounded by three times that, so a hung or unreachable Redis is a
//! [`LedgerError::Backend`] (its `source()` the [`redis::RedisError`]) rather than a hang. The
//! connection reconnects by itself: the tests pause a server (`CLIENT PAUSE`), see a claim fail
//! after the response timeout and the next claim after the pause succeed, then kill and restart
//! a server and see the same ledger work again (within ~100 ms on loopback). A reply that does
//! not decode is [`LedgerError::Corrupt`]. Setup (`connect`, `connect_cluster`) returns the
//! [`redis::RedisError`]; a bad prefix is a [`ConfigError`].
//!
//! # Durability: what Redis can lose
//!
//! The ledger is as durable as your Redis, and Redis acknowledges a write before it is on disk
//! or on a replica:
//!
//! - With `appendonly yes` and `appendfsync everysec` (the usual setting), a crash of the server
//!   (or of its machine) can lose the last second of claims and completions. With
//!   `appendfsync always` it loses nothing acknowledged, at a large cost in write latency. With
//!   snapshots only (RDB) it loses everything since the last snapshot.
//! - Replication is asynchronous: when a master fails and a replica is promoted (Sentinel or
//!   Cluster failover), writes the replica had not yet received are lost.
//! - **An acknowledged claim that is lost means a second run is possible**: a retry finds no
//!   record and runs the handler again. A lost completion means the retry finds no record (or
//!   an in-progress one, taken over after its lease) and runs again, too.
//! - [`with_wait_replicas(n, timeout)`](RedisLedgerBuilder::with_wait_replicas) narrows the
//!   failover window for claims: after each won claim it sends `WAIT n timeout` to the record's
//!   node and fails (releasing the claim) unless `n` replicas acknowledged it. It costs a round
//!   trip plus the replicas' acknowledgement per first request, and `WAIT` holds up the
//!   multiplexed connection meanwhile. It does not cover disk durability, and a replica that
//!   acknowledged can still lose the write if it crashes too (`WAIT` is not consensus).
//!
//! If a second run is not acceptable, make the handler's side effects idempotent downstream, or
//! use a SQL ledger. **`RedisLedger` is not a
//! [`TransactionalLedger`](tower_idempotency_core::TransactionalLedger)**: the layer's
//! exactly-once mode (`with_transactions()`, the completion committed in the handler's own
//! transaction) needs `PostgresLedger` or `SqliteLedger` from `tower-idempotency-sqlx`.
//!
//! ## A Cluster failover, measured
//!
//! `tests/tests/redis_failover.rs` kills (`SIGKILL`) a master of a 3-master Cluster
//! (`cluster-node-timeout 1000`) while 300 keys are sent twice each through the layer (300 ms
//! response timeout, 1 s ledger timeout, 5 s lease). On loopback it measured:
//!
//! - Every request answered within ~600 ms (201, 503 or 409); no restart needed.
//! - Calls to the failed master's slots failed from ~0.3 s after the kill (one response
//!   timeout) until the replica was promoted and the client had refreshed its slot map:
//!   the first success there 1.9–2.6 s after the kill. Expect about `cluster-node-timeout` (15 s
//!   by default) plus 1–2 s.
//! - Claims on surviving masters failed too when their operation-id index entry fell in the
//!   failed slots (a third of them), and some claims that were written but whose call missed
//!   its bound stayed in progress until their lease passed (409 to the retries meanwhile, then
//!   a takeover: one run, a lease's delay).
//! - 0 keys of 300 ran twice, with and without `WAIT`: a replica on loopback had every write
//!   before the kill. The window exists all the same (previous section), and the test only
//!   bounds it by the keys claimed in the last second.
//! - With [`with_wait_replicas(1, 150 ms)`](RedisLedgerBuilder::with_wait_replicas) and two
//!   replicas per master, the same failover ran no key twice (asserted). With one replica per
//!   master, the promoted master has no replica until the failed node rejoins as one, so every
//!   claim on its slots fails `WAIT` (503) until then: give each master two replicas, or restart
//!   the failed node promptly. `WAIT` narrows the window but does not close it: an acknowledged
//!   write is in a replica's memory, not on its disk, the replica that has it may not be the one
//!   promoted, and completions are not waited for.
//!
//! See docs/operations.md ("Redis Cluster failover") for the counts.
//!
//! # Why redis-rs
//!
//! This crate uses [redis-rs](https://docs.rs/redis) 1.x (re-exported as [`redis`]), not fred:
//! it is the most used Rust client, its `Script` does `EVALSHA` with the `NOSCRIPT` reload, its
//! `ConnectionManager` and `cluster_async::ClusterConnection` take a response timeout and
//! reconnect by themselves, and `route_command` sends `WAIT` to a slot's master. fred would also
//! do (its reconnecting, Cluster-aware pub/sub is nicer); redis-rs has the smaller dependency
//! tree here and one API for both deployments.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod error;
mod ledger;
mod notifier;

pub use error::ConfigError;
pub use ledger::{
    DEFAULT_PREFIX, DEFAULT_RESPONSE_TIMEOUT, RedisLedger, RedisLedgerBuilder, STUCK_SCAN_LIMIT,
    script_sources,
};
pub use redis;
pub use tower_idempotency_core::{
    Claim, ClaimRequest, Ledger, LedgerError, StoredResponse, purge_periodically,
};
