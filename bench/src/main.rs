//! HTTP load generator for tower-idempotency, over loopback.
//!
//! Starts each server variant in this process on an ephemeral 127.0.0.1 port (bare axum, the
//! layer on each ledger, peer crates), drives it with keep-alive HTTP/1.1 connections sending a
//! 1 KiB JSON body (with `BENCH_BODY=small`, issue 18's `{"amount":1000}`) to a trivial handler
//! (or, with `BENCH_HANDLER=json`, one that parses the body), on the fresh path (every key new)
//! and on the replay path (keys reused), and prints requests per second, latency p50 and p99,
//! server CPU per request, PostgreSQL WAL bytes per request (for the variants on PostgreSQL) and
//! the ratios to bare axum measured in the same round.
//! `growth` keeps unique-key load on one `MemoryLedger` server and reports each window.
//!
//! ```sh
//! # idempotent 2.0 declares rust-version 1.98 and builds on 1.95: hence --ignore-rust-version
//! cargo run --release --ignore-rust-version -- compare  # BENCH_SECS=5 BENCH_ROUNDS=3
//! #   BENCH_CONNS=32 DATABASE_URL=.. BENCH_ONLY=memory,sqlite,postgres,postgres-cached,postgres-tx,
//! #   axum-idempotent,axum-idempotent-pg,idempotent
//! # BENCH_PATHS=replay (or fresh) runs one path only.
//! cargo run --release --ignore-rust-version -- growth   # GROWTH_SECS=60 GROWTH_WINDOW=5
//! cargo run --release --ignore-rust-version -- one memory fresh  # one run, for a profiler
//! cargo run --release --ignore-rust-version                      # compare, then growth
//! ```
//!
//! `BENCH_DB_DELAY_US=500` (any number > 0) runs with network latency to the databases: every
//! variant, whatever the mode, reaches PostgreSQL (`DATABASE_URL`) and Redis (`REDIS_URL`)
//! through a TCP proxy in this process ([`delay`]) that delays every chunk of bytes by that many
//! microseconds in each direction, so a round trip costs about twice that more; the round trips
//! through the proxy and direct are measured and printed at start.

mod delay;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    http::{Request, StatusCode, header},
    response::IntoResponse,
    routing::{get, post},
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tower_idempotency::{CachedLedger, IdempotencyLayer, Ledger, LedgerTx, MemoryLedger};
use tower_idempotency_redis::RedisLedger;
use tower_idempotency_sqlx::{PostgresLedger, SqliteLedger};

const RESPONSE: &str = r#"{"id":"pay_1","status":"succeeded"}"#;

/// The trivial handler: takes the body, answers 201 with a small JSON document.
async fn create_payment(body: Bytes) -> impl IntoResponse {
    std::hint::black_box(body);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        RESPONSE,
    )
}

/// Gives the connection a session, which axum-idempotent needs before it caches anything.
async fn start_session<S: ruts::store::SessionStore>(session: ruts::Session<S>) -> StatusCode {
    let ttl = ruts::store::Ttl::new(3600).expect("a valid ttl");
    match session.set("bench", &1u8, ttl, None).await {
        Ok(()) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bare,
    Memory,
    Sqlite,
    Postgres,
    PostgresCached,
    PostgresTx,
    Redis,
    AxumIdempotent,
    AxumIdempotentPostgres,
    Idempotent2,
}

impl Variant {
    fn parse(name: &str) -> Option<Self> {
        Some(match name.trim() {
            "bare" => Variant::Bare,
            "memory" => Variant::Memory,
            "sqlite" => Variant::Sqlite,
            "postgres" => Variant::Postgres,
            "postgres-cached" => Variant::PostgresCached,
            "postgres-tx" => Variant::PostgresTx,
            "redis" => Variant::Redis,
            "axum-idempotent" => Variant::AxumIdempotent,
            "axum-idempotent-pg" => Variant::AxumIdempotentPostgres,
            "idempotent" => Variant::Idempotent2,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Variant::Bare => "bare axum",
            Variant::Memory => "tower-idempotency MemoryLedger",
            Variant::Sqlite => "tower-idempotency SqliteLedger (file)",
            Variant::Postgres => "tower-idempotency PostgresLedger",
            Variant::PostgresCached => "tower-idempotency CachedLedger<PostgresLedger>",
            Variant::PostgresTx => "tower-idempotency PostgresLedger, exactly-once mode",
            Variant::Redis => "tower-idempotency RedisLedger",
            Variant::AxumIdempotent => "axum-idempotent 0.6 (ruts MokaStore)",
            Variant::AxumIdempotentPostgres => "axum-idempotent 0.6 (ruts PostgresStore)",
            Variant::Idempotent2 => "idempotent 2.0 (MemoryStore)",
        }
    }

    /// The response header that marks a replay.
    fn replay_header(self) -> Option<&'static str> {
        match self {
            Variant::Bare => None,
            Variant::AxumIdempotent | Variant::AxumIdempotentPostgres => {
                Some("idempotency-replayed")
            }
            _ => Some("idempotent-replayed"),
        }
    }

    /// Needs a session cookie first (axum-idempotent caches only for a request with a session).
    fn needs_session(self) -> bool {
        matches!(
            self,
            Variant::AxumIdempotent | Variant::AxumIdempotentPostgres
        )
    }

    /// Writes to PostgreSQL: its WAL is measured around the run.
    fn uses_postgres(self) -> bool {
        matches!(
            self,
            Variant::Postgres
                | Variant::PostgresCached
                | Variant::PostgresTx
                | Variant::AxumIdempotentPostgres
        )
    }
}

struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
    memory: Option<MemoryLedger>,
    cleanup: Cleanup,
}

enum Cleanup {
    None,
    File(PathBuf),
    Table(PostgresLedger),
    /// ruts' session table, on its own sqlx 0.8 pool.
    PeerTable(sqlx08::PgPool, String),
    /// The run's keys on Redis: (URL, key prefix).
    Redis(String, String),
}

/// The servers run on a runtime of their own (two workers named `bench-server`), apart from the
/// load generator's: both still share the machine's cores, as a server and wrk would, but the
/// servers' CPU time can be read on its own, from their threads (`server_cpu_time`).
fn server_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("bench-server")
            .enable_all()
            .build()
            .expect("the server runtime")
    })
}

/// User + system CPU time of the server runtime's threads so far (`/proc/self/task/*/stat`),
/// their socket system calls included. A thread that has exited is not counted, so take
/// differences only while the same server runs.
fn server_cpu_time() -> Duration {
    let mut ticks = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            if !stat[open + 1..close].starts_with("bench-server") {
                continue;
            }
            let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            ticks += field(11).unwrap_or(0) + field(12).unwrap_or(0);
        }
    }
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

async fn serve(app: Router) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    (addr, task)
}

/// The body's fields, for the handler that parses it (the small body has only `amount`).
#[derive(serde::Deserialize)]
#[allow(dead_code, reason = "parsed for the work of parsing, not read")]
struct Payment {
    amount: u64,
    #[serde(default)]
    currency: String,
    #[serde(default)]
    customer: String,
    #[serde(default)]
    description: String,
}

/// A handler that does a little work, as most do: it parses the JSON body into a struct
/// (`BENCH_HANDLER=json`), then answers like the trivial one.
async fn create_payment_json(Json(payment): Json<Payment>) -> impl IntoResponse {
    std::hint::black_box(payment);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        RESPONSE,
    )
}

/// `BENCH_HANDLER=json` swaps the trivial handler for [`create_payment_json`] in every variant.
fn json_handler() -> bool {
    std::env::var("BENCH_HANDLER").is_ok_and(|h| h == "json")
}

fn payments() -> Router {
    if json_handler() {
        Router::new().route("/payments", post(create_payment_json))
    } else {
        Router::new().route("/payments", post(create_payment))
    }
}

fn layered<L: Ledger + Clone>(ledger: L) -> Router {
    payments().layer(IdempotencyLayer::new(ledger))
}

/// Exactly-once mode (`with_transactions()`): the handler takes the ledger's transaction and, like
/// every other variant's handler, writes nothing; the completion commits in that transaction, and
/// the claim does not wait for its own WAL flush (one flush per request, as the peer's).
fn exactly_once(ledger: PostgresLedger) -> Router {
    let layer = IdempotencyLayer::builder(ledger)
        .with_transactions()
        .build()
        .expect("valid layer settings");
    Router::new()
        .route(
            "/payments",
            post(|tx: LedgerTx<PostgresLedger>, body: Bytes| async move {
                std::hint::black_box((&tx, body));
                (
                    StatusCode::CREATED,
                    [(header::CONTENT_TYPE, "application/json")],
                    RESPONSE,
                )
            }),
        )
        .layer(layer)
}

/// Starts `variant` on the server runtime (its pools and tasks live there too).
async fn start(variant: Variant, run: &str) -> Option<Server> {
    let run = run.to_owned();
    server_runtime()
        .spawn(async move { start_here(variant, &run).await })
        .await
        .expect("starting a server")
}

fn env_url(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|u| !u.is_empty())
}

/// The URLs every variant connects to: `DATABASE_URL` and `REDIS_URL`, or with
/// `BENCH_DB_DELAY_US` their rewrites to the delaying proxies ([`database_latency`]).
struct Urls {
    database: Option<String>,
    redis: Option<String>,
}

static URLS: OnceLock<Urls> = OnceLock::new();

fn urls() -> &'static Urls {
    URLS.get_or_init(|| Urls {
        database: env_url("DATABASE_URL"),
        redis: env_url("REDIS_URL"),
    })
}

/// `BENCH_PG_POOL`: the PostgreSQL pool size of the ledger variants and of the PostgreSQL peer
/// (default 10, `PostgresLedger::connect`'s and sqlx's).
fn pg_pool_size() -> u32 {
    env_u64("BENCH_PG_POOL", 10) as u32
}

/// [`postgres_pool_ledger`], claiming as `BENCH_PG_STRATEGY` says (`combined`, `insert`, `read`;
/// the default strategy otherwise); `BENCH_PG_BATCH=0` writes every completion alone.
async fn postgres_ledger(url: &str) -> PostgresLedger {
    use tower_idempotency_sqlx::ClaimStrategy;
    let ledger = postgres_pool_ledger(url).await;
    let ledger = if std::env::var("BENCH_PG_BATCH").as_deref() == Ok("0") {
        ledger.with_batched_completions(false)
    } else {
        ledger
    };
    match std::env::var("BENCH_PG_STRATEGY").as_deref() {
        Ok("combined") => ledger.with_claim_strategy(ClaimStrategy::Combined),
        Ok("insert") => ledger.with_claim_strategy(ClaimStrategy::InsertFirst),
        Ok("read") => ledger.with_claim_strategy(ClaimStrategy::ReadFirst),
        _ => ledger,
    }
}

/// `PostgresLedger::connect`, or with `BENCH_PG_POOL` the same settings on a pool of that size.
async fn postgres_pool_ledger(url: &str) -> PostgresLedger {
    use std::str::FromStr;
    use tower_idempotency_sqlx::sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    if std::env::var("BENCH_PG_POOL").is_err() {
        return PostgresLedger::connect(url)
            .await
            .expect("connect to PostgreSQL");
    }
    let options = PgConnectOptions::from_str(url)
        .expect("a PostgreSQL URL")
        .options([("statement_timeout", "5s")]);
    let pool = PgPoolOptions::new()
        .max_connections(pg_pool_size())
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .expect("connect to PostgreSQL");
    PostgresLedger::new(pool)
}

fn database_url() -> Option<String> {
    urls().database.clone()
}

fn redis_url() -> Option<String> {
    urls().redis.clone()
}

/// Splits `scheme://[userinfo@]host[:port][/path][?query]` into what comes before the host, the
/// host (without an IPv6 literal's brackets), the port if given, and what follows the port.
/// `None` for a URL without an authority or with several hosts (`host1,host2`).
fn split_url(url: &str) -> Option<(&str, &str, Option<u16>, &str)> {
    let authority_start = url.find("://")? + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let host_start = authority_start + authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &url[host_start..authority_end];
    let (host, port) = if let Some(literal) = host_port.strip_prefix('[') {
        let (host, after) = literal.split_once(']')?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port.parse().ok()?)),
            None if after.is_empty() => (host, None),
            None => return None,
        }
    } else {
        match host_port.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse().ok()?)),
            None => (host_port, None),
        }
    };
    if host.is_empty() || host.contains(',') {
        return None;
    }
    Some((&url[..host_start], host, port, &url[authority_end..]))
}

/// Resolves `host:port` (`localhost` included). When it resolves to several addresses (`::1` and
/// `127.0.0.1`), the first that accepts a connection is the one proxied.
fn resolve(host: &str, port: u16) -> std::io::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.len() > 1 {
        for addr in &addrs {
            if std::net::TcpStream::connect_timeout(addr, Duration::from_secs(1)).is_ok() {
                return Ok(*addr);
            }
        }
    }
    addrs.first().copied().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host}:{port} resolves to no address"),
        )
    })
}

/// A delaying proxy in front of the server `url` names: returns `url` rewritten to the proxy,
/// the server's address and the proxy's.
fn through_proxy(
    name: &str,
    url: &str,
    default_port: u16,
    one_way: Duration,
) -> (String, SocketAddr, SocketAddr) {
    let Some((before, host, port, after)) = split_url(url) else {
        panic!("BENCH_DB_DELAY_US: cannot find one host:port in {name}");
    };
    let upstream = resolve(host, port.unwrap_or(default_port))
        .unwrap_or_else(|e| panic!("BENCH_DB_DELAY_US: resolving {name}'s host {host}: {e}"));
    let proxy = delay::start(upstream, one_way)
        .unwrap_or_else(|e| panic!("BENCH_DB_DELAY_US: starting the proxy for {name}: {e}"));
    (format!("{before}{proxy}{after}"), upstream, proxy)
}

/// Round trips measured on each connection to the databases, after a few unmeasured ones.
const LATENCY_SAMPLES: usize = 200;

/// The median of `LATENCY_SAMPLES` `SELECT 1` round trips, in milliseconds, on one connection.
async fn select_1_p50_ms(url: &str) -> Result<f64, tower_idempotency_sqlx::sqlx::Error> {
    use tower_idempotency_sqlx::sqlx::{self, Connection};
    let mut conn = sqlx::PgConnection::connect(url).await?;
    let mut times = Vec::with_capacity(LATENCY_SAMPLES);
    for i in 0..LATENCY_SAMPLES + 10 {
        let t = Instant::now();
        sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut conn)
            .await?;
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    conn.close().await?;
    Ok(median(&mut times))
}

/// The median of `LATENCY_SAMPLES` Redis `PING` round trips, in milliseconds, over a raw TCP
/// connection to `addr` (a server that wants `AUTH` answers `-NOAUTH ..`: a round trip still).
fn ping_p50_ms(addr: SocketAddr) -> std::io::Result<f64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut times = Vec::with_capacity(LATENCY_SAMPLES);
    let mut buf = [0u8; 256];
    for i in 0..LATENCY_SAMPLES + 10 {
        let t = Instant::now();
        stream.write_all(b"PING\r\n")?;
        let mut reply = Vec::new();
        while !reply.ends_with(b"\r\n") {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            reply.extend_from_slice(&buf[..n]);
        }
        if i >= 10 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(&mut times))
}

/// `BENCH_DB_DELAY_US` > 0: starts a delaying proxy ([`delay`]) in front of PostgreSQL and one in
/// front of Redis, points every variant's URL at them, and prints the round trips measured
/// through each proxy and directly. Must run before anything reads [`urls`].
async fn database_latency() {
    let us = env_u64("BENCH_DB_DELAY_US", 0);
    if us == 0 {
        return;
    }
    let one_way = Duration::from_micros(us);
    let database = env_url("DATABASE_URL")
        .map(|url| (through_proxy("DATABASE_URL", &url, 5432, one_way), url));
    let redis = env_url("REDIS_URL").map(|url| through_proxy("REDIS_URL", &url, 6379, one_way));
    let set = URLS.set(Urls {
        database: database.as_ref().map(|((proxied, ..), _)| proxied.clone()),
        redis: redis.as_ref().map(|(proxied, ..)| proxied.clone()),
    });
    assert!(set.is_ok(), "the URLs were read before the proxies started");

    let mut measured = Vec::new();
    if let Some(((proxied, upstream, proxy), direct)) = &database {
        let line = match (
            select_1_p50_ms(proxied).await,
            select_1_p50_ms(direct).await,
        ) {
            (Ok(through), Ok(direct)) => format!(
                "PostgreSQL ({upstream} via {proxy}) SELECT 1 p50 {through:.3} ms \
                 (direct {direct:.3} ms) over {LATENCY_SAMPLES} queries"
            ),
            (Err(e), _) | (_, Err(e)) => format!("PostgreSQL not measured ({e})"),
        };
        measured.push(line);
    }
    if let Some((_, upstream, proxy)) = redis {
        let pings =
            tokio::task::spawn_blocking(move || (ping_p50_ms(proxy), ping_p50_ms(upstream)))
                .await
                .expect("the Redis round trips");
        let line = match pings {
            (Ok(through), Ok(direct)) => format!(
                "Redis ({upstream} via {proxy}) PING p50 {through:.3} ms (direct {direct:.3} ms) \
                 over {LATENCY_SAMPLES} pings"
            ),
            (Err(e), _) | (_, Err(e)) => format!("Redis not measured ({e})"),
        };
        measured.push(line);
    }
    if measured.is_empty() {
        measured.push("neither DATABASE_URL nor REDIS_URL is set: nothing proxied".into());
    }
    println!(
        "database latency: BENCH_DB_DELAY_US={us} one way, measured round trip through the \
         proxy: {}",
        measured.join("; ")
    );
}

/// PostgreSQL's WAL position in bytes (`pg_current_wal_lsn()`): the difference around a run is
/// the WAL the run wrote, with whatever else the cluster wrote meanwhile (other databases, other
/// users of a shared server, autovacuum).
async fn wal_position(pool: &tower_idempotency_sqlx::sqlx::PgPool) -> Option<f64> {
    tower_idempotency_sqlx::sqlx::query_scalar::<_, f64>(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8",
    )
    .fetch_one(pool)
    .await
    .ok()
}

async fn start_here(variant: Variant, run: &str) -> Option<Server> {
    let (app, memory, cleanup) = match variant {
        Variant::Bare => (payments(), None, Cleanup::None),
        Variant::Memory => {
            let ledger = MemoryLedger::new();
            (layered(ledger.clone()), Some(ledger), Cleanup::None)
        }
        Variant::Sqlite => {
            let path = std::env::temp_dir().join(format!("tower-idempotency-bench-{run}.db"));
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let ledger = SqliteLedger::connect(&url).await.expect("open SQLite");
            ledger.migrate().await.expect("migrate SQLite");
            (layered(ledger), None, Cleanup::File(path))
        }
        Variant::Postgres | Variant::PostgresCached | Variant::PostgresTx => {
            let url = database_url()?;
            let ledger = postgres_ledger(&url)
                .await
                .with_table(&format!("bench_{run}"))
                .expect("a valid table name");
            ledger.migrate().await.expect("migrate PostgreSQL");
            // BENCH_PG_SQL: statements run on the run's table after the migrations (`{t}` is its
            // name), for measuring a schema change before making it a migration.
            if let Ok(sql) = std::env::var("BENCH_PG_SQL") {
                tower_idempotency_sqlx::sqlx::raw_sql(tower_idempotency_sqlx::sqlx::AssertSqlSafe(
                    sql.replace("{t}", &format!("bench_{run}")),
                ))
                .execute(ledger.pool())
                .await
                .expect("BENCH_PG_SQL");
            }
            let app = match variant {
                Variant::PostgresCached => layered(CachedLedger::new(ledger.clone())),
                Variant::PostgresTx => exactly_once(ledger.clone()),
                _ => layered(ledger.clone()),
            };
            (app, None, Cleanup::Table(ledger))
        }
        Variant::Redis => {
            let url = redis_url()?;
            let ledger = RedisLedger::builder()
                .with_prefix(&format!("bench:{run}:"))
                .expect("a valid prefix")
                .connect(url.as_str())
                .await
                .expect("connect to Redis");
            // The prefix keeps runs apart; the run's keys are deleted when it stops.
            (
                layered(ledger),
                None,
                Cleanup::Redis(url, format!("bench:{run}:")),
            )
        }
        Variant::AxumIdempotentPostgres => {
            use axum_idempotent::{IdempotentLayer, IdempotentOptions};
            use ruts::{CookieOptions, SessionLayer, store::postgres::PostgresStore};
            let url = database_url()?;
            // As many connections as the PostgresLedger's pool.
            let pool = sqlx08::postgres::PgPoolOptions::new()
                .max_connections(pg_pool_size())
                .connect(&url)
                .await
                .expect("connect to PostgreSQL (sqlx 0.8)");
            let table = format!("bench_sessions_{run}");
            let store = ruts::store::postgres::PostgresStoreBuilder::new(pool.clone())
                .table_name(table.clone())
                .expect("a valid table name")
                .create_table(true)
                .build()
                .await
                .expect("ruts' PostgresStore");
            let options = IdempotentOptions::default()
                .use_idempotency_key_header(Some("Idempotency-Key"), true)
                .expire_after(3600);
            let app = Router::new()
                .route("/session", get(start_session::<PostgresStore>))
                .merge(payments().layer(IdempotentLayer::<PostgresStore>::new(options)))
                .layer(
                    SessionLayer::new(Arc::new(store)).with_cookie_options(
                        CookieOptions::build()
                            .name("session")
                            .max_age(3600)
                            .path("/"),
                    ),
                )
                .layer(tower_cookies::CookieManagerLayer::new());
            (app, None, Cleanup::PeerTable(pool, table))
        }
        Variant::Idempotent2 => {
            let store = idempotent::store::memory::MemoryStore::builder()
                .try_build()
                .expect("idempotent's memory store");
            let app = payments().layer(idempotent::middleware::IdempotencyLayer::new(store));
            (app, None, Cleanup::None)
        }
        Variant::AxumIdempotent => {
            use axum_idempotent::{IdempotentLayer, IdempotentOptions};
            use ruts::{CookieOptions, SessionLayer, store::moka::MokaStore};
            let store = Arc::new(MokaStore::builder().build());
            let options = IdempotentOptions::default()
                .use_idempotency_key_header(Some("Idempotency-Key"), true)
                .expire_after(3600);
            // The session route sits outside the idempotent layer, which requires a key.
            let app = Router::new()
                .route("/session", get(start_session::<MokaStore>))
                .merge(payments().layer(IdempotentLayer::<MokaStore>::new(options)))
                .layer(
                    SessionLayer::new(store).with_cookie_options(
                        CookieOptions::build()
                            .name("session")
                            .max_age(3600)
                            .path("/"),
                    ),
                )
                .layer(tower_cookies::CookieManagerLayer::new());
            (app, None, Cleanup::None)
        }
    };
    let (addr, task) = serve(app).await;
    Some(Server {
        addr,
        task,
        memory,
        cleanup,
    })
}

impl Server {
    async fn stop(self) {
        server_runtime()
            .spawn(self.stop_here())
            .await
            .expect("stopping a server");
    }

    async fn stop_here(self) {
        self.task.abort();
        match self.cleanup {
            Cleanup::None => {}
            Cleanup::File(path) => {
                for suffix in ["", "-shm", "-wal"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Cleanup::Table(ledger) => {
                let drop = format!("DROP TABLE IF EXISTS {}", ledger.table());
                let _ = tower_idempotency_sqlx::sqlx::raw_sql(
                    tower_idempotency_sqlx::sqlx::AssertSqlSafe(drop),
                )
                .execute(ledger.pool())
                .await;
                ledger.pool().close().await;
            }
            Cleanup::PeerTable(pool, table) => {
                let drop = format!("DROP TABLE IF EXISTS \"{table}\"");
                let _ = sqlx08::raw_sql(&drop).execute(&pool).await;
                pool.close().await;
            }
            Cleanup::Redis(url, prefix) => {
                use tower_idempotency_redis::redis::{self, AsyncCommands};
                let Ok(client) = redis::Client::open(url.as_str()) else {
                    return;
                };
                let Ok(mut con) = client.get_multiplexed_async_connection().await else {
                    return;
                };
                let mut keys: Vec<String> = Vec::new();
                if let Ok(mut iter) = con.scan_match::<_, String>(format!("{prefix}*")).await {
                    while let Some(key) = iter.next_item().await {
                        if let Ok(key) = key {
                            keys.push(key);
                        }
                    }
                }
                for chunk in keys.chunks(1000) {
                    let _: Result<(), _> = con.del(chunk).await;
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Every request has a new key: claim, handler, store.
    Fresh,
    /// Keys from a small pool, each executed once first: every measured request is a replay.
    Replay,
    /// `BENCH_MIX` percent of the requests (default 10) replays as on the replay path, spread
    /// evenly, the rest fresh: traffic in which the ledger's claims mostly find no record.
    Mixed,
}

/// The percentage of replays on the mixed path (`BENCH_MIX`, 0 to 100; default 10).
fn mix_percent() -> u64 {
    env_u64("BENCH_MIX", 10).min(100)
}

/// Keys per connection on the replay path.
const REPLAY_KEYS: usize = 16;

#[derive(Default)]
struct Counters {
    done: AtomicU64,
    /// Responses that were not what the path expects (wrong status, replay header wrong).
    unexpected: AtomicU64,
}

/// `BENCH_BODY=small` sends issue 18's body, `{"amount":1000}` (15 bytes), instead of 1 KiB.
fn small_body() -> bool {
    std::env::var("BENCH_BODY").is_ok_and(|b| b == "small")
}

/// The request body: 1 KiB of JSON, or with `BENCH_BODY=small` issue 18's `{"amount":1000}`.
fn body() -> Bytes {
    if small_body() {
        return Bytes::from_static(br#"{"amount":1000}"#);
    }
    let head = r#"{"amount":1000,"currency":"eur","customer":"cus_42","description":""#;
    let tail = r#""}"#;
    let pad = 1024 - head.len() - tail.len();
    let json = format!("{head}{}{tail}", "x".repeat(pad));
    debug_assert_eq!(json.len(), 1024);
    Bytes::from(json)
}

struct Load {
    addr: SocketAddr,
    variant: Variant,
    path: Path,
    /// Percent of replays on the mixed path.
    mix: u64,
    run: String,
    body: Bytes,
    counters: Arc<Counters>,
    /// Set during the measured window: latencies are recorded only then.
    measuring: AtomicBool,
    stop: Arc<AtomicBool>,
}

/// Drives one keep-alive connection until stopped; returns the latencies (µs) of the requests
/// that completed while `measuring` was set.
async fn connection(load: Arc<Load>, conn: usize) -> Vec<u32> {
    let mut latencies = Vec::new();
    let stream = tokio::net::TcpStream::connect(load.addr)
        .await
        .expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(connection);

    let mut cookie = None;
    if load.variant.needs_session() {
        let request = Request::get("/session")
            .header(header::HOST, "bench")
            .body(Full::new(Bytes::new()))
            .expect("a request");
        sender.ready().await.expect("ready");
        let response = sender.send_request(request).await.expect("session");
        let status = response.status();
        let Some(set) = response
            .headers()
            .get(header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
        else {
            panic!("GET /session gave {status} and no session cookie");
        };
        cookie = Some(set.split(';').next().unwrap_or(set).to_owned());
        let _ = response.into_body().collect().await;
    }

    let replay_header = load.variant.replay_header();
    let mut n = 0u64;
    loop {
        if load.stop.load(Ordering::Relaxed) {
            break;
        }
        let (key, expect_replay) = match load.path {
            Path::Fresh => (format!("{}-{conn}-{n}", load.run), Some(false)),
            Path::Replay => {
                let slot = n as usize % REPLAY_KEYS;
                let first_pass = (n as usize) < REPLAY_KEYS;
                (format!("{}-{conn}-r{slot}", load.run), Some(!first_pass))
            }
            // The n-th request replays when n × mix / 100 steps up: `mix` in every 100, spread.
            Path::Mixed if (n + 1) * load.mix / 100 != n * load.mix / 100 => {
                let replays = n * load.mix / 100;
                let slot = replays as usize % REPLAY_KEYS;
                let first_pass = (replays as usize) < REPLAY_KEYS;
                (format!("{}-{conn}-r{slot}", load.run), Some(!first_pass))
            }
            Path::Mixed => (format!("{}-{conn}-{n}", load.run), Some(false)),
        };
        n += 1;
        let mut request = Request::post("/payments")
            .header(header::HOST, "bench")
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", key);
        if let Some(cookie) = &cookie {
            request = request.header(header::COOKIE, cookie.as_str());
        }
        let request = request
            .body(Full::new(load.body.clone()))
            .expect("a request");
        if sender.ready().await.is_err() {
            break;
        }
        let sent = Instant::now();
        let Ok(response) = sender.send_request(request).await else {
            break;
        };
        let replayed = replay_header.is_some_and(|h| response.headers().contains_key(h));
        let ok = response.status() == StatusCode::CREATED
            && match (replay_header, expect_replay) {
                (None, _) | (_, None) => true,
                (Some(_), Some(expected)) => replayed == expected,
            };
        if response.into_body().collect().await.is_err() {
            break;
        }
        if load.measuring.load(Ordering::Relaxed) {
            latencies.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32);
        }
        if !ok {
            load.counters.unexpected.fetch_add(1, Ordering::Relaxed);
        }
        load.counters.done.fetch_add(1, Ordering::Relaxed);
    }
    latencies
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Measured {
    rps: f64,
    /// Requests per CPU-second of this process (server and load generator together): unlike
    /// req/s, it barely moves when other processes take the cores.
    per_cpu_sec: f64,
    /// Microseconds of the server runtime's CPU time per request: what the server itself spends,
    /// apart from the load generator.
    server_us: f64,
    unexpected: u64,
    load: String,
    /// Latency percentiles of the measured requests, milliseconds.
    p50_ms: f64,
    p99_ms: f64,
    /// PostgreSQL WAL bytes written per request during the measured window (PostgreSQL variants).
    wal_per_req: Option<f64>,
}

/// The `q` quantile (0..=1) of sorted microsecond latencies, in milliseconds.
fn quantile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// User + system CPU time of this process so far, from `/proc/self/stat` (fields 14 and 15).
fn cpu_time() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // The command name (field 2) may hold spaces; count fields after its closing paren.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: u64 = fields.get(11)?.parse().ok()?;
            let stime: u64 = fields.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// Starts `conns` connections on `server` and measures completed requests over `secs`, after a
/// one-second warm-up (which on the replay path also executes every key once).
async fn measure(
    server: &Server,
    variant: Variant,
    path: Path,
    run: &str,
    conns: usize,
    secs: u64,
) -> Measured {
    let load = Arc::new(Load {
        addr: server.addr,
        variant,
        path,
        mix: mix_percent(),
        run: run.to_owned(),
        body: body(),
        counters: Arc::default(),
        measuring: AtomicBool::new(false),
        stop: Arc::default(),
    });
    // Through the delaying proxy under BENCH_DB_DELAY_US, like the variants (database_url()): the
    // WAL positions are read before and after the measured window, so the delay does not count.
    let wal_pool = match (variant.uses_postgres(), database_url()) {
        (true, Some(url)) => tower_idempotency_sqlx::sqlx::PgPool::connect(&url)
            .await
            .ok(),
        _ => None,
    };
    let tasks: Vec<_> = (0..conns)
        .map(|c| tokio::spawn(connection(load.clone(), c)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loadavg = loadavg();
    let wal0 = match &wal_pool {
        Some(pool) => wal_position(pool).await,
        None => None,
    };
    load.measuring.store(true, Ordering::Relaxed);
    let (start, t0, c0, s0) = (
        load.counters.done.load(Ordering::Relaxed),
        Instant::now(),
        cpu_time(),
        server_cpu_time(),
    );
    let unexpected0 = load.counters.unexpected.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (end, t1, c1, s1) = (
        load.counters.done.load(Ordering::Relaxed),
        Instant::now(),
        cpu_time(),
        server_cpu_time(),
    );
    load.measuring.store(false, Ordering::Relaxed);
    let wal1 = match &wal_pool {
        Some(pool) => wal_position(pool).await,
        None => None,
    };
    load.stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        if let Ok(mut l) = task.await {
            latencies.append(&mut l);
        }
    }
    latencies.sort_unstable();
    if let Some(pool) = wal_pool {
        pool.close().await;
    }
    Measured {
        p50_ms: quantile_ms(&latencies, 0.50),
        p99_ms: quantile_ms(&latencies, 0.99),
        wal_per_req: match (wal0, wal1) {
            (Some(a), Some(b)) => Some((b - a) / (end - start) as f64),
            _ => None,
        },
        rps: (end - start) as f64 / (t1 - t0).as_secs_f64(),
        per_cpu_sec: (end - start) as f64 / (c1 - c0).as_secs_f64(),
        server_us: (s1 - s0).as_secs_f64() * 1e6 / (end - start) as f64,
        unexpected: load.counters.unexpected.load(Ordering::Relaxed) - unexpected0,
        load: loadavg,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

async fn compare() -> bool {
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let conns = env_u64("BENCH_CONNS", 32) as usize;
    let mut variants = vec![
        Variant::Bare,
        Variant::Memory,
        Variant::Sqlite,
        Variant::Postgres,
        Variant::PostgresCached,
        Variant::PostgresTx,
        Variant::Redis,
        Variant::AxumIdempotent,
        Variant::AxumIdempotentPostgres,
        Variant::Idempotent2,
    ];
    if database_url().is_none() {
        println!("DATABASE_URL is not set: the PostgreSQL variants are left out");
        variants.retain(|v| !v.uses_postgres());
    }
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        // Bare axum always stays: it is what the others are measured against.
        let only: Vec<Variant> = only.split(',').filter_map(Variant::parse).collect();
        variants.retain(|v| *v == Variant::Bare || only.contains(v));
    }
    println!(
        "compare: {conns} connections, {} JSON body, {} handler, {secs} s per measurement \
         after 1 s warm-up, {rounds} rounds; each variant runs between two bare-axum runs and its \
         ratio is to their mean (the machine is shared: this cancels slow drifts in load)",
        if small_body() { "15-byte" } else { "1 KiB" },
        if json_handler() {
            "JSON-parsing"
        } else {
            "trivial"
        }
    );
    let pid = std::process::id();
    let mut all_ok = true;
    let paths: Vec<Path> = match std::env::var("BENCH_PATHS").as_deref() {
        Ok("fresh") => vec![Path::Fresh],
        Ok("replay") => vec![Path::Replay],
        Ok("mixed") => vec![Path::Mixed],
        _ => vec![Path::Fresh, Path::Replay],
    };
    for path in paths {
        // results[variant][round]
        let mut results: Vec<Vec<Row>> = vec![Vec::new(); variants.len()];
        let mut seq = 0usize;
        for round in 0..rounds {
            let mut bare_before: Option<Measured> = None;
            for (i, &variant) in variants.iter().enumerate() {
                let mut runs = vec![variant];
                if variant != Variant::Bare {
                    runs.push(Variant::Bare);
                }
                let mut measured = Vec::new();
                for run_variant in runs {
                    seq += 1;
                    let run = format!("b{pid}_{seq}_{}", path_tag(path));
                    let Some(server) = start(run_variant, &run).await else {
                        break;
                    };
                    let m = measure(&server, run_variant, path, &run, conns, secs).await;
                    server.stop().await;
                    if m.unexpected > 0 {
                        all_ok = false;
                    }
                    measured.push(m);
                }
                let mut measured = measured.into_iter();
                let Some(m) = measured.next() else {
                    continue;
                };
                let row = match (measured.next(), bare_before.take()) {
                    (Some(after), Some(before)) => {
                        // Against the mean of the bare runs just before and just after.
                        let mean = |f: fn(&Measured) -> f64| (f(&before) + f(&after)) / 2.0;
                        let row = Row {
                            rps: m.rps,
                            ratio: m.rps / mean(|b| b.rps),
                            per_cpu_sec: m.per_cpu_sec,
                            cpu_ratio: m.per_cpu_sec / mean(|b| b.per_cpu_sec),
                            server_us: m.server_us,
                            server_ratio: mean(|b| b.server_us) / m.server_us,
                            p50_ms: m.p50_ms,
                            p99_ms: m.p99_ms,
                            wal_per_req: m.wal_per_req,
                        };
                        print_row(path, round, variant.name(), &row, &m);
                        let bare = Row::bare(&after);
                        print_row(path, round, "bare axum (after)", &bare, &after);
                        results[0].push(bare);
                        bare_before = Some(after);
                        row
                    }
                    _ => {
                        let row = Row::bare(&m);
                        print_row(path, round, variant.name(), &row, &m);
                        bare_before = Some(m);
                        row
                    }
                };
                results[i].push(row);
            }
        }
        println!(
            "{} path, median over {rounds} rounds (bare axum: every bare run):",
            path_tag(path)
        );
        println!(
            "| variant | req/s | × bare (req/s) | × axum-idempotent PG (req/s) | p50 ms | p99 ms | WAL B/req | req per CPU-second | × bare (CPU) | server µs/req | × bare (server CPU) |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let column = |i: usize, f: fn(&Row) -> f64| {
            let mut values: Vec<f64> = results[i].iter().map(f).collect();
            if values.is_empty() {
                f64::NAN
            } else {
                median(&mut values)
            }
        };
        // The peer on the same database: its median req/s, for the "× peer" column.
        let peer = variants
            .iter()
            .position(|v| *v == Variant::AxumIdempotentPostgres)
            .map(|p| column(p, |r| r.rps));
        for (i, variant) in variants.iter().enumerate() {
            let wal = {
                let mut values: Vec<f64> =
                    results[i].iter().filter_map(|r| r.wal_per_req).collect();
                if values.is_empty() {
                    "–".to_owned()
                } else {
                    format!("{:.0}", median(&mut values))
                }
            };
            println!(
                "| {} | {:.0} | {:.3} | {} | {:.2} | {:.2} | {wal} | {:.0} | {:.3} | {:.1} | {:.3} |",
                variant.name(),
                column(i, |r| r.rps),
                column(i, |r| r.ratio),
                peer.map_or("–".to_owned(), |p| format!(
                    "{:.3}",
                    column(i, |r| r.rps) / p
                )),
                column(i, |r| r.p50_ms),
                column(i, |r| r.p99_ms),
                column(i, |r| r.per_cpu_sec),
                column(i, |r| r.cpu_ratio),
                column(i, |r| r.server_us),
                column(i, |r| r.server_ratio),
            );
        }
    }
    all_ok
}

/// One measurement and its ratios to the bare-axum runs around it. `server_ratio` is bare's
/// server CPU per request over this one's: 0.80 means the server spent 1/0.80 as much CPU on
/// each request as bare axum did.
#[derive(Clone)]
struct Row {
    rps: f64,
    ratio: f64,
    per_cpu_sec: f64,
    cpu_ratio: f64,
    server_us: f64,
    server_ratio: f64,
    p50_ms: f64,
    p99_ms: f64,
    wal_per_req: Option<f64>,
}

impl Row {
    fn bare(m: &Measured) -> Self {
        Row {
            rps: m.rps,
            ratio: 1.0,
            per_cpu_sec: m.per_cpu_sec,
            cpu_ratio: 1.0,
            server_us: m.server_us,
            server_ratio: 1.0,
            p50_ms: m.p50_ms,
            p99_ms: m.p99_ms,
            wal_per_req: m.wal_per_req,
        }
    }
}

fn print_row(path: Path, round: usize, name: &str, row: &Row, m: &Measured) {
    println!(
        "  {:<6} round {round}  {:<47} {:>7.0} req/s {:>5.3}x  p50 {:>6.2} ms  p99 {:>6.2} ms  {:>6.0} req/CPU-s {:>5.3}x  server {:>5.1} us/req {:>5.3}x{}  unexpected {}  load {}",
        path_tag(path),
        name,
        row.rps,
        row.ratio,
        row.p50_ms,
        row.p99_ms,
        row.per_cpu_sec,
        row.cpu_ratio,
        row.server_us,
        row.server_ratio,
        row.wal_per_req
            .map(|w| format!("  WAL {w:.0} B/req"))
            .unwrap_or_default(),
        m.unexpected,
        m.load
    );
}

fn path_tag(path: Path) -> &'static str {
    match path {
        Path::Fresh => "fresh",
        Path::Replay => "replay",
        Path::Mixed => "mixed",
    }
}

/// Unique-key load on one MemoryLedger server (default retention, so every key stays), one
/// line per window: throughput must not fall as the ledger grows.
async fn growth() -> bool {
    let secs = env_u64("GROWTH_SECS", 60);
    let window = env_u64("GROWTH_WINDOW", 5);
    let conns = env_u64("BENCH_CONNS", 32) as usize;
    let run = format!("g{}", std::process::id());
    let server = start(Variant::Memory, &run).await.expect("a memory server");
    let ledger = server.memory.clone().expect("the ledger");
    let load = Arc::new(Load {
        addr: server.addr,
        variant: Variant::Memory,
        path: Path::Fresh,
        mix: 0,
        run: run.clone(),
        body: body(),
        counters: Arc::default(),
        measuring: AtomicBool::new(false),
        stop: Arc::default(),
    });
    println!(
        "growth: {conns} connections, unique keys into one MemoryLedger for {secs} s, {window} s windows"
    );
    println!(
        "| window | req/s | req per CPU-second | server µs/req | keys stored at end | load avg |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let tasks: Vec<_> = (0..conns)
        .map(|c| tokio::spawn(connection(load.clone(), c)))
        .collect();
    let (mut rates, mut cpu_rates, mut server_costs) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = (
        load.counters.done.load(Ordering::Relaxed),
        Instant::now(),
        cpu_time(),
        server_cpu_time(),
    );
    for w in 0..secs / window {
        tokio::time::sleep(Duration::from_secs(window)).await;
        let now = (
            load.counters.done.load(Ordering::Relaxed),
            Instant::now(),
            cpu_time(),
            server_cpu_time(),
        );
        let rps = (now.0 - last.0) as f64 / (now.1 - last.1).as_secs_f64();
        let per_cpu = (now.0 - last.0) as f64 / (now.2 - last.2).as_secs_f64();
        let server_us = (now.3 - last.3).as_secs_f64() * 1e6 / (now.0 - last.0) as f64;
        rates.push(rps);
        cpu_rates.push(per_cpu);
        server_costs.push(server_us);
        println!(
            "| {:>3}-{:<3} s | {rps:.0} | {per_cpu:.0} | {server_us:.1} | {} | {} |",
            w * window,
            (w + 1) * window,
            ledger.len(),
            loadavg()
        );
        last = now;
    }
    load.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let unexpected = load.counters.unexpected.load(Ordering::Relaxed);
    server.stop().await;
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    let (cpu_first, cpu_last) = (cpu_rates[0], cpu_rates[cpu_rates.len() - 1]);
    let (server_first, server_last) = (server_costs[0], server_costs[server_costs.len() - 1]);
    let verdict = |r: f64| {
        if r >= 0.90 {
            "flat: >= 0.90"
        } else {
            "FELL below 0.90"
        }
    };
    println!(
        "growth: last window / first window = {:.3} req/s ({}), {:.3} req per CPU-second ({}), \
         {:.3} server CPU per request, first/last ({}); unexpected responses {unexpected}",
        last / first,
        verdict(last / first),
        cpu_last / cpu_first,
        verdict(cpu_last / cpu_first),
        server_first / server_last,
        verdict(server_first / server_last),
    );
    unexpected == 0
}

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    println!(
        "machine: {} cores; load average at start {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    database_latency().await;
    let ok = match mode.as_str() {
        "compare" => compare().await,
        "growth" => growth().await,
        // One measurement, for a profiler: `one memory fresh`.
        "one" => {
            let arg = |n: usize| std::env::args().nth(n).unwrap_or_default();
            let variant = Variant::parse(&arg(2)).expect(
                "a variant: bare, memory, sqlite, postgres, postgres-cached, postgres-tx, axum-idempotent, \
                     axum-idempotent-pg, idempotent",
            );
            let path = match arg(3).as_str() {
                "replay" => Path::Replay,
                "mixed" => Path::Mixed,
                _ => Path::Fresh,
            };
            let secs = env_u64("BENCH_SECS", 5);
            let conns = env_u64("BENCH_CONNS", 32) as usize;
            let run = format!("o{}", std::process::id());
            let server = start(variant, &run).await.expect("a server");
            let m = measure(&server, variant, path, &run, conns, secs).await;
            server.stop().await;
            println!(
                "{} {}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {}server {:.1} us/req, unexpected {}, load {}",
                variant.name(),
                path_tag(path),
                m.rps,
                m.p50_ms,
                m.p99_ms,
                m.wal_per_req
                    .map(|w| format!("WAL {w:.0} B/req, "))
                    .unwrap_or_default(),
                m.server_us,
                m.unexpected,
                m.load
            );
            m.unexpected == 0
        }
        "all" => compare().await & growth().await,
        other => {
            eprintln!("unknown mode {other:?}: compare, growth or all");
            false
        }
    };
    if !ok {
        eprintln!("FAILED: some responses were not what the path expects");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn splits_database_urls() {
        assert_eq!(
            split_url("postgres://postgres@127.0.0.1:5432/test"),
            Some(("postgres://postgres@", "127.0.0.1", Some(5432), "/test"))
        );
        assert_eq!(
            split_url("postgres://u:p%40ss@localhost/db?sslmode=disable"),
            Some((
                "postgres://u:p%40ss@",
                "localhost",
                None,
                "/db?sslmode=disable"
            ))
        );
        assert_eq!(
            split_url("redis://127.0.0.1:6379"),
            Some(("redis://", "127.0.0.1", Some(6379), ""))
        );
        assert_eq!(
            split_url("redis://:secret@[::1]:6380/0"),
            Some(("redis://:secret@", "::1", Some(6380), "/0"))
        );
        assert_eq!(split_url("postgres://a:1,b:2/db"), None);
        assert_eq!(split_url("postgres:///db?host=/run/postgresql"), None);
    }
}
