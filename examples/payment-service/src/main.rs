//! `payment-service serve`: the payment API on tower-idempotency; `payment-service processor`:
//! the card processor it calls; `payment-service ledger ...`: the operator's commands on the
//! idempotency ledger.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use payment_service::{Database, Settings, card_processor, telemetry};
use tower_idempotency::InProgress;

#[derive(Debug, Parser)]
#[command(version, about = "A payment API that cannot charge twice")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API. Without --processor-url it starts its card processor in-process, behind a
    /// real HTTP listener on 127.0.0.1 (any free port) with its own SQLite file
    /// (--processor-database-url): one command runs both, and every charge still crosses HTTP.
    Serve(Serve),
    /// Serve the card processor alone (for `serve --processor-url`): it records charges in its
    /// own SQLite file and is idempotent on the Idempotency-Key it is sent.
    Processor(ProcessorArgs),
    /// The operator's commands on the idempotency ledger: inspect a key, list stuck claims,
    /// release a stuck claim, evict a stored answer. They read --database-url, --ledger-table
    /// and --ledger-url as `serve` does.
    Ledger(payment_service::ledger_cli::LedgerArgs),
    /// Print the `key` span attribute of a token and an idempotency key, to find its trace.
    Key {
        /// The bearer token the request was sent with.
        #[arg(long, env = "PAYMENT_SERVICE_TOKEN")]
        token: String,
        /// The Idempotency-Key header's value.
        key: String,
    },
}

/// What a duplicate gets while the first request with its key runs.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Policy {
    /// 409 with Retry-After.
    Conflict,
    /// 202 with the Location of /operations/{id}.
    Accepted,
    /// Wait for the first request (up to --wait-timeout-ms), then replay it.
    Wait,
}

#[derive(Debug, clap::Args)]
struct Serve {
    /// The address to listen on (port 0: any free port). Once it listens, the service prints
    /// `listening on http://ADDR` on stdout (on stderr with --otel stdout).
    #[arg(long, env = "PAYMENT_SERVICE_ADDR", default_value = "127.0.0.1:3000")]
    addr: SocketAddr,
    /// sqlite://FILE?mode=rwc or postgres://USER@HOST/DB; the ledger and the payments share it.
    /// URL parameters go to the driver (such as ?application_name=.. on PostgreSQL).
    #[arg(long, env = "DATABASE_URL", default_value = payment_service::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// The ledger's table, instead of idempotency_records.
    #[arg(long, env = "PAYMENT_SERVICE_LEDGER_TABLE")]
    ledger_table: Option<String>,
    /// Where the idempotency ledger lives, if not in the database: redis://HOST:PORT, or a
    /// comma-separated list of redis:// URLs for a Redis Cluster (the payments stay in the
    /// database). Needs --exactly-once false: Redis cannot commit with the payments.
    #[arg(long, env = "PAYMENT_SERVICE_LEDGER_URL")]
    ledger_url: Option<String>,
    /// Exactly-once mode: write each payment in the idempotency ledger's transaction, so that
    /// the payment and its stored response commit together (false: the payment commits first,
    /// and a crash in between charges twice on retry).
    #[arg(long, env = "PAYMENT_SERVICE_EXACTLY_ONCE", default_value_t = true, action = ArgAction::Set)]
    exactly_once: bool,
    /// Test hook: print WRITTEN on stdout after writing a payment, then never answer.
    #[arg(long, env = "PAYMENT_SERVICE_PAUSE_AFTER_WRITE", hide = true)]
    pause_after_write: bool,
    /// Test hook: print CHARGED on stdout after the charge, before the payment row, then never
    /// answer.
    #[arg(long, env = "PAYMENT_SERVICE_PAUSE_AFTER_CHARGE", hide = true)]
    pause_after_charge: bool,
    /// Test hook: the share of payment inserts that fail with 500 after the charge (0.0 to 1.0).
    #[arg(
        long,
        env = "PAYMENT_SERVICE_FAIL_INSERT_RATE",
        default_value_t = 0.0,
        hide = true
    )]
    fail_insert_rate: f64,
    /// An external card processor (`payment-service processor`), such as http://127.0.0.1:3001.
    /// Without it, serve starts one in-process on 127.0.0.1 (any free port), on
    /// --processor-database-url, with the fault flags below.
    #[arg(long, env = "PAYMENT_SERVICE_PROCESSOR_URL")]
    processor_url: Option<String>,
    /// The in-process processor's database (ignored with --processor-url).
    #[arg(long, env = "PAYMENT_SERVICE_PROCESSOR_DATABASE_URL", default_value = payment_service::card_processor::DEFAULT_DATABASE_URL)]
    processor_database_url: String,
    /// The timeout of every call to the processor, in milliseconds.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_PROCESSOR_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    processor_timeout_ms: u64,
    #[command(flatten)]
    faults: FaultArgs,
    /// How often expired idempotency records are purged, in seconds.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_PURGE_INTERVAL_SECS",
        default_value_t = 300
    )]
    purge_interval_secs: u64,
    /// What a duplicate of a request still running gets.
    #[arg(long, env = "PAYMENT_SERVICE_IN_PROGRESS", value_enum, default_value_t = Policy::Conflict)]
    in_progress: Policy,
    /// How long a waiting duplicate waits (with --in-progress wait), in milliseconds.
    #[arg(long, env = "PAYMENT_SERVICE_WAIT_TIMEOUT_MS", default_value_t = 5000)]
    wait_timeout_ms: u64,
    /// The idempotency lease, in milliseconds.
    #[arg(long, env = "PAYMENT_SERVICE_LEASE_MS", default_value_t = 30_000)]
    lease_ms: u64,
    /// On SIGTERM or Ctrl-C, how long to wait for payments in flight (including those whose
    /// client left) to finish and be recorded, in milliseconds; new payments get 503 meanwhile.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_DRAIN_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    drain_timeout_ms: u64,
    /// Where spans and metrics go.
    #[arg(long, env = "PAYMENT_SERVICE_OTEL", value_enum, default_value_t = telemetry::Otel::None)]
    otel: telemetry::Otel,
}

/// How the card processor misbehaves (the in-process one of `serve`, or `processor`).
#[derive(Debug, clap::Args)]
struct FaultArgs {
    /// How long the processor takes per charge, in milliseconds.
    #[arg(long, env = "PAYMENT_SERVICE_LATENCY_MS", default_value_t = 50)]
    latency_ms: u64,
    /// The share of charges the processor fails with 503 before charging (0.0 to 1.0).
    #[arg(long, env = "PAYMENT_SERVICE_FAIL_RATE", default_value_t = 0.0)]
    fail_rate: f64,
    /// The share of charges the processor records, then answers 503 (0.0 to 1.0).
    #[arg(long, env = "PAYMENT_SERVICE_FAIL_AFTER_RATE", default_value_t = 0.0)]
    fail_after_rate: f64,
    /// The share of charges the processor records, then breaks the connection mid-answer
    /// (0.0 to 1.0).
    #[arg(long, env = "PAYMENT_SERVICE_DROP_AFTER_RATE", default_value_t = 0.0)]
    drop_after_rate: f64,
    /// The processor's idempotency lease, in milliseconds.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_PROCESSOR_LEASE_MS",
        default_value_t = 30_000
    )]
    processor_lease_ms: u64,
}

impl FaultArgs {
    fn faults(&self, pause_after_charge: bool) -> card_processor::Faults {
        card_processor::Faults {
            latency: Duration::from_millis(self.latency_ms),
            fail_before: self.fail_rate.clamp(0.0, 1.0),
            fail_after: self.fail_after_rate.clamp(0.0, 1.0),
            drop_after: self.drop_after_rate.clamp(0.0, 1.0),
            pause_after_charge,
            lease: Some(Duration::from_millis(self.processor_lease_ms)),
        }
    }
}

#[derive(Debug, clap::Args)]
struct ProcessorArgs {
    /// The address to listen on (port 0: any free port); prints `listening on http://ADDR`.
    #[arg(long, env = "PAYMENT_PROCESSOR_ADDR", default_value = "127.0.0.1:3001")]
    addr: SocketAddr,
    /// The processor's SQLite database: its idempotency ledger and its charges.
    #[arg(long, env = "PAYMENT_PROCESSOR_DATABASE_URL", default_value = payment_service::card_processor::DEFAULT_DATABASE_URL)]
    database_url: String,
    #[command(flatten)]
    faults: FaultArgs,
    /// Test hook: print CHARGED on stdout after recording a charge, then never answer.
    #[arg(long, hide = true)]
    pause_after_charge: bool,
    /// How often expired idempotency records are purged, in seconds.
    #[arg(
        long,
        env = "PAYMENT_SERVICE_PURGE_INTERVAL_SECS",
        default_value_t = 300
    )]
    purge_interval_secs: u64,
}

/// Purges at most this many expired records per statement.
const PURGE_BATCH: usize = 1000;

#[tokio::main]
async fn main() -> ExitCode {
    let args = match Cli::parse().command {
        Command::Serve(args) => args,
        Command::Processor(args) => {
            let telemetry = match telemetry::init(telemetry::Otel::None) {
                Ok(telemetry) => telemetry,
                Err(error) => {
                    eprintln!("payment-service processor: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let result = processor(args).await;
            telemetry.shutdown();
            return match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("payment-service processor: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Ledger(args) => return payment_service::ledger_cli::run(args).await,
        Command::Key { token, key } => {
            return match payment_service::auth::key_attribute(&token, &key) {
                Some(attribute) => {
                    println!("{attribute}");
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("payment-service: not a valid idempotency key");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let telemetry = match telemetry::init(args.otel) {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("payment-service: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = serve(args).await;
    if let Err(error) = &result {
        tracing::error!(%error, "payment-service stopped");
    }
    telemetry.shutdown();
    if result.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn processor(args: ProcessorArgs) -> Result<(), Box<dyn std::error::Error>> {
    let ledger = card_processor::connect(&args.database_url).await?;
    tokio::spawn(tower_idempotency::purge_periodically(
        ledger.clone(),
        Duration::from_secs(args.purge_interval_secs.max(1)),
        PURGE_BATCH,
    ));
    let router = card_processor::router(ledger, args.faults.faults(args.pause_after_charge))?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

async fn serve(args: Serve) -> Result<(), Box<dyn std::error::Error>> {
    // The processor: external, or in-process behind a real listener (so every charge crosses
    // HTTP, with its timeout, exactly as it would to a remote processor).
    let processor_url = match &args.processor_url {
        Some(url) => url.clone(),
        None => {
            let url =
                card_processor::spawn(&args.processor_database_url, args.faults.faults(false))
                    .await?;
            tracing::info!(%url, database = %args.processor_database_url, "card processor started in-process");
            url
        }
    };
    let settings = Settings {
        processor_url,
        processor_timeout: Duration::from_millis(args.processor_timeout_ms),
        pause_after_charge: args.pause_after_charge,
        fail_insert_rate: args.fail_insert_rate,
        in_progress: match args.in_progress {
            Policy::Conflict => InProgress::Conflict,
            Policy::Accepted => InProgress::Accepted,
            Policy::Wait => InProgress::Wait {
                timeout: Duration::from_millis(args.wait_timeout_ms),
            },
        },
        lease: Duration::from_millis(args.lease_ms),
        // The global meter provider, installed by telemetry::init.
        meter: None,
        exactly_once: args.exactly_once,
        pause_after_write: args.pause_after_write,
    };
    let database = Database::connect(&args.database_url, args.ledger_table.as_deref())
        .await?
        .with_ledger_url(&args.database_url, args.ledger_url.as_deref())
        .await?;
    let every = Duration::from_secs(args.purge_interval_secs.max(1));
    match &database {
        Database::Sqlite(ledger) => {
            tokio::spawn(tower_idempotency::purge_periodically(
                ledger.clone(),
                every,
                PURGE_BATCH,
            ));
        }
        Database::Postgres(ledger) => {
            tokio::spawn(tower_idempotency::purge_periodically(
                ledger.clone(),
                every,
                PURGE_BATCH,
            ));
        }
        // Redis expires its records itself: nothing to purge.
        Database::Redis(..) => {}
    }
    let (router, drain) = database.router_with_drain(&settings)?;
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        database = database.kind(),
        in_progress = ?settings.in_progress,
        exactly_once = settings.exactly_once,
        "payment-service listening on http://{addr}",
    );
    // For scripts and tests that ask for port 0; stdout is the telemetry stream with --otel stdout.
    if args.otel == telemetry::Otel::Stdout {
        eprintln!("listening on http://{addr}");
    } else {
        println!("listening on http://{addr}");
    }
    // At the signal: stop accepting (axum), and at once refuse new payments on connections
    // still open (the drain); after the server stopped, wait for the payments in flight,
    // detached ones included, so that each is recorded before the process exits.
    let deadline = Duration::from_millis(args.drain_timeout_ms);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
    let signalled = async move {
        shutdown_signal().await;
        let _ = drained_tx.send(tokio::spawn(async move { drain.drain(deadline).await }));
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(signalled)
        .await?;
    if let Ok(drained) = drained_rx.await {
        if drained.await.unwrap_or(false) {
            tracing::info!("every payment in flight was recorded");
        } else {
            tracing::error!(
                ?deadline,
                "payments still in flight at the drain deadline; their keys free themselves when their leases expire"
            );
        }
    }
    Ok(())
}

/// Ctrl-C or SIGTERM: finish the requests in flight, then flush the exporters.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
