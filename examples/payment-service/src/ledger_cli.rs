//! `payment-service ledger ...`: the operator's commands on the idempotency ledger.
//!
//! - `ledger inspect --token T KEY [--body]`: the record of the Idempotency-Key `KEY` sent with
//!   the bearer token `T` (state, operation id, lease, expiry, stored status and size).
//! - `ledger stuck [--older-than-ms N] [--limit N] [--token T]`: claims whose lease lapsed (their
//!   holder most likely crashed), every tenant's unless `--token` is given.
//! - `ledger release --token T KEY [--force]`: inspects the key, then releases its claim with the
//!   token it saw (fenced: refused if the claim changed meanwhile), so that the client's retry
//!   runs the payment again. A claim whose lease is still live is refused without `--force`.
//! - `ledger evict --token T KEY`: deletes the record (a stored 4xx that must not be replayed),
//!   so that the retry runs again.
//!
//! The key is digested with the token's tenant exactly as the layer does (the scope is
//! [`Tenant::id`](crate::auth::Tenant::id)); neither the key nor the token is stored or printed.
//! Each command reads the same `--database-url`, `--ledger-table` and `--ledger-url` (and their
//! environment variables and defaults) as `serve`. Every command prints a block a person reads
//! at a glance, or JSON with `--json` (the admin router's
//! [`tower_idempotency::admin::RecordView`]). Exit code: 0 found or done, 1 not
//! found or refused, 2 an error.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime},
};

use serde_json::json;
use tower_idempotency::{
    IdempotencyKey, LedgerError,
    admin::RecordView,
    core::{LedgerKey, Progress, RecordInfo, ScopeDigest},
};

use crate::{Database, auth::Tenant};

/// `payment-service ledger`.
#[derive(Debug, clap::Args)]
pub struct LedgerArgs {
    #[command(subcommand)]
    command: LedgerCommand,
}

#[derive(Debug, clap::Subcommand)]
enum LedgerCommand {
    /// Show the record of an Idempotency-Key sent with a bearer token.
    Inspect {
        #[command(flatten)]
        target: Target,
        /// Also print the stored response's headers and body.
        #[arg(long)]
        body: bool,
        #[command(flatten)]
        common: Common,
    },
    /// List claims whose lease lapsed (their holder most likely crashed), longest lapsed first.
    Stuck {
        /// Only those whose lease lapsed at least this long ago, in milliseconds.
        #[arg(long, default_value_t = 0)]
        older_than_ms: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only this bearer token's tenant's claims (default: every tenant's).
        #[arg(long, env = "PAYMENT_SERVICE_TOKEN")]
        token: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Release a claim stuck in progress, so that the client's retry runs the payment again:
    /// inspects the key, then releases the claim only if the holder seen still has it.
    Release {
        #[command(flatten)]
        target: Target,
        /// Release even if the claim's lease is still live (its holder may still be running:
        /// the retry could then run beside it).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Delete a key's record whatever its state (a stored answer that must not be replayed),
    /// so that the client's retry runs the payment again.
    Evict {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        common: Common,
    },
}

/// Which key: the one a client sent with its token.
#[derive(Debug, clap::Args)]
struct Target {
    /// The bearer token the request was sent with (it picks the tenant, the key's scope).
    #[arg(long, env = "PAYMENT_SERVICE_TOKEN")]
    token: String,
    /// The Idempotency-Key header's value.
    key: String,
}

impl Target {
    fn ledger_key(&self) -> Result<LedgerKey, String> {
        let key = IdempotencyKey::parse(self.key.as_bytes())
            .map_err(|error| format!("not a valid idempotency key: {error}"))?;
        Ok(LedgerKey::new(
            Tenant::of_token(&self.token).id().as_bytes(),
            &key,
        ))
    }

    fn scope(&self) -> ScopeDigest {
        ScopeDigest::new(Tenant::of_token(&self.token).id().as_bytes())
    }
}

/// Where the ledger is (as for `serve`) and how to print.
#[derive(Debug, clap::Args)]
struct Common {
    /// The service's database, as for `serve`.
    #[arg(long, env = "DATABASE_URL", default_value = crate::DEFAULT_DATABASE_URL)]
    database_url: String,
    /// The ledger's table, as for `serve`.
    #[arg(long, env = "PAYMENT_SERVICE_LEDGER_TABLE")]
    ledger_table: Option<String>,
    /// The Redis ledger, as for `serve`.
    #[arg(long, env = "PAYMENT_SERVICE_LEDGER_URL")]
    ledger_url: Option<String>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

impl Common {
    async fn connect(&self) -> Result<Database, String> {
        Database::connect(&self.database_url, self.ledger_table.as_deref())
            .await
            .map_err(|error| error.to_string())?
            .with_ledger_url(&self.database_url, self.ledger_url.as_deref())
            .await
            .map_err(|error| error.to_string())
    }
}

/// How a command ended.
enum Done {
    /// Found, or done: exit 0.
    Ok,
    /// Not found, or refused: exit 1.
    No,
}

/// Runs `payment-service ledger ...`.
pub async fn run(args: LedgerArgs) -> ExitCode {
    match command(args.command).await {
        Ok(Done::Ok) => ExitCode::SUCCESS,
        Ok(Done::No) => ExitCode::from(1),
        Err(error) => {
            eprintln!("payment-service ledger: {error}");
            ExitCode::from(2)
        }
    }
}

fn ledger_error(error: LedgerError) -> String {
    match error {
        LedgerError::Backend(source) => format!("the ledger failed: {source}"),
        error => error.to_string(),
    }
}

async fn lookup(
    database: &Database,
    key: &LedgerKey,
    scope: &ScopeDigest,
    with_body: bool,
) -> Result<Option<RecordInfo>, String> {
    let info = database
        .inspect(key, with_body)
        .await
        .map_err(ledger_error)?;
    Ok(info.filter(|info| info.scope == *scope))
}

fn print_json(value: &serde_json::Value) {
    println!("{value:#}");
}

const NOT_FOUND: &str = "no live record for this key and token: never used, released, evicted or \
                         expired (or the token is not the one the request was sent with)";

async fn command(command: LedgerCommand) -> Result<Done, String> {
    let now = SystemTime::now;
    match command {
        LedgerCommand::Inspect {
            target,
            body,
            common,
        } => {
            let key = target.ledger_key()?;
            let database = common.connect().await?;
            let found = lookup(&database, &key, &target.scope(), body).await?;
            let done = if found.is_some() { Done::Ok } else { Done::No };
            match found {
                Some(info) if common.json => print_json(&view(&info)),
                Some(info) => print!("{}", human(&info, now())),
                None if common.json => print_json(&json!(null)),
                None => println!("{NOT_FOUND}"),
            }
            Ok(done)
        }
        LedgerCommand::Stuck {
            older_than_ms,
            limit,
            token,
            common,
        } => {
            let database = common.connect().await?;
            let scope = token.map(|t| ScopeDigest::new(Tenant::of_token(&t).id().as_bytes()));
            // The ledger lists every tenant's; with a token, ask for more and keep its own.
            let ask = if scope.is_some() {
                limit.max(1_000)
            } else {
                limit
            };
            let stuck = database
                .stuck(Duration::from_millis(older_than_ms), ask)
                .await
                .map_err(ledger_error)?;
            let stuck: Vec<RecordInfo> = stuck
                .into_iter()
                .filter(|info| scope.is_none_or(|scope| info.scope == scope))
                .take(limit)
                .collect();
            if common.json {
                let views: Vec<_> = stuck.iter().map(view).collect();
                print_json(&json!(views));
            } else if stuck.is_empty() {
                println!("no claim stuck for {older_than_ms} ms or more");
            } else {
                println!(
                    "{} claim(s) stuck (lease lapsed {older_than_ms} ms or more ago), longest first:",
                    stuck.len()
                );
                for info in &stuck {
                    println!();
                    print!("{}", human(info, now()));
                }
            }
            Ok(Done::Ok)
        }
        LedgerCommand::Release {
            target,
            force,
            common,
        } => {
            let key = target.ledger_key()?;
            let database = common.connect().await?;
            let Some(info) = lookup(&database, &key, &target.scope(), false).await? else {
                refuse(common.json, "not-found", NOT_FOUND, None);
                return Ok(Done::No);
            };
            let Progress::InProgress {
                token,
                lease_lapsed,
                ..
            } = info.progress
            else {
                refuse(
                    common.json,
                    "completed",
                    "the key completed: its answer is stored and replayed, there is no claim \
                     to release (`ledger evict` deletes the stored answer)",
                    Some(&info),
                );
                return Ok(Done::No);
            };
            if !lease_lapsed && !force {
                refuse(
                    common.json,
                    "lease-live",
                    "the claim's lease is still live: its holder may still be running the \
                     payment. Wait for the lease to lapse, or pass --force",
                    Some(&info),
                );
                return Ok(Done::No);
            }
            match database.force_release(&key, token).await {
                Ok(()) => {
                    if common.json {
                        print_json(&json!({ "released": true, "record": view(&info) }));
                    } else {
                        println!(
                            "released the claim of operation {} (token {}): the client's retry \
                             runs the payment again",
                            info.operation_id,
                            token.as_uuid()
                        );
                    }
                    Ok(Done::Ok)
                }
                Err(LedgerError::LeaseLost) => {
                    refuse(
                        common.json,
                        "token-stale",
                        "the claim changed after it was read (it completed, or another request \
                         took it over): nothing was released. Inspect the key again",
                        Some(&info),
                    );
                    Ok(Done::No)
                }
                Err(error) => Err(ledger_error(error)),
            }
        }
        LedgerCommand::Evict { target, common } => {
            let key = target.ledger_key()?;
            let database = common.connect().await?;
            let Some(info) = lookup(&database, &key, &target.scope(), false).await? else {
                refuse(common.json, "not-found", NOT_FOUND, None);
                return Ok(Done::No);
            };
            if !database.evict(&key).await.map_err(ledger_error)? {
                refuse(common.json, "not-found", NOT_FOUND, None);
                return Ok(Done::No);
            }
            if common.json {
                print_json(&json!({ "evicted": true, "record": view(&info) }));
            } else {
                println!("evicted: the client's retry runs the payment again. It was:");
                print!("{}", human(&info, now()));
            }
            Ok(Done::Ok)
        }
    }
}

fn refuse(json: bool, reason: &str, detail: &str, info: Option<&RecordInfo>) {
    if json {
        let mut value = json!({ "refused": reason, "detail": detail });
        if let Some(info) = info {
            value["record"] = view(info);
        }
        print_json(&value);
    } else {
        println!("refused: {detail}");
        if let Some(info) = info {
            print!("{}", human(info, SystemTime::now()));
        }
    }
}

fn view(info: &RecordInfo) -> serde_json::Value {
    serde_json::to_value(RecordView::new(info, SystemTime::now())).unwrap_or_default()
}

/// The block a person reads: one `label  value` line each.
fn human(info: &RecordInfo, now: SystemTime) -> String {
    let mut lines: Vec<(&str, String)> = vec![(
        "key",
        format!(
            "{} (ledger key digest; the raw key is never stored)",
            info.key.short()
        ),
    )];
    match &info.progress {
        Progress::InProgress {
            token,
            lease_until,
            lease_lapsed,
        } => {
            let state = if *lease_lapsed {
                "in progress, lease lapsed: its holder most likely crashed (`ledger release`)"
            } else {
                "in progress: a request holds it"
            };
            lines.push(("state", state.to_owned()));
            lines.push(("operation", info.operation_id.to_string()));
            lines.push(("token", token.as_uuid().to_string()));
            lines.push(("lease until", at(*lease_until, now)));
        }
        Progress::Completed {
            status,
            body_len,
            body_omitted,
            ..
        } => {
            lines.push(("state", "completed: its answer is replayed".to_owned()));
            lines.push(("operation", info.operation_id.to_string()));
            lines.push(("status", status.to_string()));
            let size = if *body_omitted {
                "body over the store limit, not kept (status and headers replayed)".to_owned()
            } else {
                format!("{body_len} bytes of body")
            };
            lines.push(("size", size));
        }
    }
    lines.push(("expires", at(info.expires_at, now)));
    let fingerprint: String = info.fingerprint.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    lines.push(("fingerprint", format!("{fingerprint}…")));
    let mut out: String = lines
        .iter()
        .map(|(label, value)| format!("{label:<12} {value}\n"))
        .collect();
    if let Progress::Completed {
        response: Some(response),
        ..
    } = &info.progress
    {
        out.push('\n');
        for (name, value) in &response.headers {
            out.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        out.push('\n');
        out.push_str(&String::from_utf8_lossy(&response.body));
        out.push('\n');
    }
    out
}

/// `2025-01-01T12:00:00Z (in 12 s)`, or `(3 min ago)`.
fn at(time: SystemTime, now: SystemTime) -> String {
    let stamp = humantime::format_rfc3339_seconds(time);
    match time.duration_since(now) {
        Ok(ahead) => format!("{stamp} (in {})", span(ahead)),
        Err(behind) => format!("{stamp} ({} ago)", span(behind.duration())),
    }
}

/// A duration in the largest unit that keeps it readable.
fn span(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0..120 => format!("{secs} s"),
        120..7_200 => format!("{} min", secs / 60),
        7_200..172_800 => format!("{} h", secs / 3_600),
        _ => format!("{} d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_at_a_glance() {
        assert_eq!(span(Duration::from_millis(12_400)), "12 s");
        assert_eq!(span(Duration::from_secs(185)), "3 min");
        assert_eq!(span(Duration::from_secs(3 * 3600 + 5)), "3 h");
        assert_eq!(span(Duration::from_secs(3 * 86_400)), "3 d");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            at(now + Duration::from_secs(12), now),
            "2023-11-14T22:13:32Z (in 12 s)"
        );
        assert_eq!(
            at(now - Duration::from_secs(180), now),
            "2023-11-14T22:10:20Z (3 min ago)"
        );
    }
}
