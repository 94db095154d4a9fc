//! What the tests that run the real binary share: starting `payment-service` (serve or
//! processor) and reading its stdout, and killing it by its pid.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::{process::Stdio, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

/// A guard against hangs, not a timing under test.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `payment-service`, killed (by its pid) when dropped.
pub struct Process {
    pub child: Child,
    /// `http://ADDR`, from its `listening on` line.
    pub base: String,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Process {
    /// The binary with `args`, with the service's own environment variables that a developer's
    /// shell may set cleared, errors only on stderr, and stdout piped for [`Process::spawn`].
    pub fn command(args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_payment-service"));
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("PAYMENT_SERVICE_LEDGER_URL")
            .env_remove("PAYMENT_SERVICE_LEDGER_TABLE")
            .env_remove("PAYMENT_SERVICE_PAUSE_AFTER_WRITE")
            .env_remove("PAYMENT_SERVICE_PAUSE_AFTER_CHARGE")
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command
    }

    /// Starts `command` and waits (at most [`PATIENCE`]) for its `listening on` line.
    pub async fn spawn(mut command: Command) -> Self {
        let mut child = command.spawn().expect("start payment-service");
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(PATIENCE, stdout.next_line())
            .await
            .expect("payment-service did not start listening")
            .unwrap()
            .expect("payment-service exited before listening");
        let addr = line
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("not a listening line: {line:?}"));
        Self {
            base: format!("http://{addr}"),
            child,
            stdout,
        }
    }

    /// Its next stdout line, waiting at most [`PATIENCE`].
    pub async fn next_line(&mut self) -> Option<String> {
        tokio::time::timeout(PATIENCE, self.stdout.next_line())
            .await
            .expect("payment-service said nothing")
            .unwrap()
    }

    /// SIGKILL, by this child's pid: no destructor runs, nothing is rolled back by the process.
    pub async fn kill(mut self) {
        self.child.start_kill().unwrap();
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("payment-service did not die")
            .unwrap();
    }
}
