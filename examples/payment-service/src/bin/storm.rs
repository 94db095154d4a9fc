//! `storm`: duplicates, drops and retries against a running payment-service, then an audit.
//! Exits with 1 if any payment was charged twice or lost.

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use payment_service::storm::{self, Config};

/// Sends each payment as concurrent duplicates over a flaky network, then audits the charges.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The payment service.
    #[arg(long, env = "STORM_URL", default_value = "http://127.0.0.1:3000")]
    url: String,
    /// How many payments.
    #[arg(long, env = "STORM_PAYMENTS", default_value_t = 200)]
    payments: usize,
    /// Concurrent duplicates per payment (same key, same body).
    #[arg(long, env = "STORM_DUPLICATES", default_value_t = 8)]
    duplicates: usize,
    /// The probability that a request is abandoned by the client and retried.
    #[arg(long, env = "STORM_DROP_RATE", default_value_t = 0.2)]
    drop_rate: f64,
    /// A dropped request is abandoned after a random delay up to this many milliseconds.
    #[arg(long, env = "STORM_DROP_AFTER_MS", default_value_t = 100)]
    drop_after_ms: u64,
    /// Payments in flight at once.
    #[arg(long, env = "STORM_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
    /// The bearer token, so the tenant (default: a fresh `storm-<run id>`).
    #[arg(long, env = "STORM_TOKEN")]
    token: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = Config::new(args.url);
    config.payments = args.payments;
    config.duplicates = args.duplicates;
    config.drop_rate = args.drop_rate.clamp(0.0, 1.0);
    config.drop_after = Duration::from_millis(args.drop_after_ms);
    config.concurrency = args.concurrency.max(1);
    if let Some(token) = args.token {
        config.token = token;
    }
    config.progress = true;
    eprintln!(
        "storm {}: {} payments x {} duplicates against {}, drop rate {}",
        config.run_id, config.payments, config.duplicates, config.url, config.drop_rate
    );
    match storm::run(config).await {
        Ok(summary) => {
            println!("{summary}");
            if summary.is_clean() {
                println!(
                    "OK: every payment charged exactly once, and every charge has its payment"
                );
                ExitCode::SUCCESS
            } else {
                println!(
                    "FAILED: payments were charged twice or lost, or the processor's charges do \
                     not match the payments"
                );
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("storm: {error}");
            ExitCode::from(2)
        }
    }
}
