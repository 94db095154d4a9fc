//! A record as the memory ledger holds it, and what `inspect` reports of it.

use std::time::SystemTime;

use tokio::{sync::watch, time::Instant};

use crate::{
    FencingToken, Fingerprint, LedgerKey, OperationId, Progress, RecordInfo, ScopeDigest,
    StoredResponse,
};

pub(super) struct Entry {
    pub(super) scope: ScopeDigest,
    pub(super) fingerprint: Fingerprint,
    pub(super) operation_id: OperationId,
    pub(super) expires_at: Instant,
    pub(super) state: State,
    /// Created when someone first waits on this key; every change is sent on it.
    pub(super) changed: Option<watch::Sender<()>>,
}

pub(super) enum State {
    InProgress {
        token: FencingToken,
        lease_until: Instant,
    },
    Completed(StoredResponse),
}

impl Entry {
    pub(super) fn notify(&mut self) {
        if let Some(tx) = self.changed.take() {
            tx.send_replace(());
        }
    }
}

impl Entry {
    pub(super) fn info(&self, key: &LedgerKey, now: Instant, with_body: bool) -> RecordInfo {
        // `Instant`s have no wall-clock meaning: place them relative to this moment.
        let wall = SystemTime::now();
        let at = |instant: Instant| {
            if instant >= now {
                wall + (instant - now)
            } else {
                wall - (now - instant)
            }
        };
        RecordInfo {
            key: *key,
            scope: self.scope,
            operation_id: self.operation_id,
            fingerprint: self.fingerprint,
            expires_at: at(self.expires_at),
            progress: match &self.state {
                State::InProgress { token, lease_until } => Progress::InProgress {
                    token: *token,
                    lease_until: at(*lease_until),
                    lease_lapsed: *lease_until <= now,
                },
                State::Completed(response) => Progress::Completed {
                    status: response.status,
                    body_len: response.body.len(),
                    body_omitted: response.body_omitted,
                    response: with_body.then(|| response.clone()),
                },
            },
        }
    }
}
