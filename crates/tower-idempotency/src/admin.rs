//! For operators: one record as JSON ([`RecordView`]), and (feature `axum`) a scope-checked
//! router over the ledger's operator calls, [`IdempotencyLayer::admin_router`].
//!
//! [`IdempotencyLayer::admin_router`]: crate::IdempotencyLayer::admin_router

use std::time::{Duration, SystemTime};

use serde::Serialize;
use tower_idempotency_core::{Progress, RecordInfo};
use uuid::Uuid;

/// One record as an operator sees it, ready to serialize: what the admin router answers, and
/// what a CLI prints with `--json`. Digests are lowercase hex; times are RFC 3339 (UTC,
/// milliseconds) with their distance from `now` in milliseconds (negative: in the past). The raw
/// idempotency key is never in it (the ledger never has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct RecordView {
    /// The ledger key (the digest of scope and idempotency key), 64 hex digits.
    pub ledger_key: String,
    /// Its first 16 hex digits: the `key` attribute of the layer's spans and log lines.
    pub key_attribute: String,
    /// The digest of the record's scope, 64 hex digits.
    pub scope: String,
    /// `"in_progress"` or `"completed"`.
    pub state: &'static str,
    /// The operation id.
    pub operation_id: Uuid,
    /// The fingerprint of the request that created the record, 64 hex digits.
    pub fingerprint: String,
    /// When the record expires and is purged.
    pub expires_at: String,
    /// Milliseconds from `now` to `expires_at`.
    pub expires_in_ms: i64,
    /// In progress: the holder's fencing token, to pass to a release.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Uuid>,
    /// In progress: when another request may take the key over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<String>,
    /// In progress: milliseconds from `now` to `lease_until`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_in_ms: Option<i64>,
    /// In progress: the lease had lapsed when the ledger read it (the holder most likely
    /// crashed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_lapsed: Option<bool>,
    /// Completed: the stored status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Completed: the stored body's length in bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_len: Option<usize>,
    /// Completed: the body was over the store limit and was not kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_omitted: Option<bool>,
    /// Completed, when the body was asked for: the stored headers, in order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<(String, String)>>,
    /// Completed, when the body was asked for and it is UTF-8: the stored body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Completed, when the body was asked for and it is not UTF-8: the stored body in hex.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
}

impl RecordView {
    /// The view of `info`, with times relative to `now`.
    pub fn new(info: &RecordInfo, now: SystemTime) -> Self {
        let mut view = Self {
            ledger_key: hex(info.key.as_bytes()),
            key_attribute: info.key.short(),
            scope: hex(info.scope.as_bytes()),
            state: "completed",
            operation_id: info.operation_id,
            fingerprint: hex(info.fingerprint.as_bytes()),
            expires_at: rfc3339(info.expires_at),
            expires_in_ms: millis_from(now, info.expires_at),
            token: None,
            lease_until: None,
            lease_in_ms: None,
            lease_lapsed: None,
            status: None,
            body_len: None,
            body_omitted: None,
            headers: None,
            body: None,
            body_hex: None,
        };
        match &info.progress {
            Progress::InProgress {
                token,
                lease_until,
                lease_lapsed,
            } => {
                view.state = "in_progress";
                view.token = Some(token.as_uuid());
                view.lease_until = Some(rfc3339(*lease_until));
                view.lease_in_ms = Some(millis_from(now, *lease_until));
                view.lease_lapsed = Some(*lease_lapsed);
            }
            Progress::Completed {
                status,
                body_len,
                body_omitted,
                response,
            } => {
                view.status = Some(status.as_u16());
                view.body_len = Some(*body_len);
                view.body_omitted = Some(*body_omitted);
                if let Some(response) = response {
                    view.headers = Some(
                        response
                            .headers
                            .iter()
                            .map(|(name, value)| {
                                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                                (name.as_str().to_owned(), value)
                            })
                            .collect(),
                    );
                    match std::str::from_utf8(&response.body) {
                        Ok(body) => view.body = Some(body.to_owned()),
                        Err(_) => view.body_hex = Some(hex(&response.body)),
                    }
                }
            }
        }
        view
    }
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds from `now` to `then`, negative if `then` is past.
fn millis_from(now: SystemTime, then: SystemTime) -> i64 {
    let clamp = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    match then.duration_since(now) {
        Ok(ahead) => clamp(ahead),
        Err(behind) => -clamp(behind.duration()),
    }
}

/// `time` as RFC 3339 in UTC with milliseconds, such as `2023-11-14T22:13:20.000Z`. Times before
/// the Unix epoch print as the epoch.
///
/// ```
/// use std::time::{Duration, SystemTime};
/// use tower_idempotency::admin::rfc3339;
///
/// let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
/// assert_eq!(rfc3339(t), "2023-11-14T22:13:20.123Z");
/// ```
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60,
        since.subsec_millis()
    )
}

#[cfg(feature = "axum")]
mod router {
    use std::{sync::Arc, time::SystemTime};

    use axum::{
        Router,
        body::{Body, Bytes},
        extract::Path,
        response::{IntoResponse, Response},
        routing::{get, post},
    };
    use http::{StatusCode, request::Parts};
    use tower_idempotency_core::{
        FencingToken, IdempotencyKey, Ledger, LedgerError, LedgerKey, RecordInfo, ScopeDigest,
    };
    use uuid::Uuid;

    use super::RecordView;
    use crate::{IdempotencyLayer, config::Shared, ledger_call::Door, problem::admin_problem};

    /// Records per `stuck` call asked of the ledger before keeping the caller's own.
    const STUCK_SCAN: usize = 1_000;

    impl<L: Ledger> IdempotencyLayer<L> {
        /// The operator's router over this layer's ledger, under `base` (such as
        /// `/admin/idempotency`). Every route takes the client's raw `Idempotency-Key` and
        /// digests it with the caller's scope, exactly as the layer does (the layer's scope
        /// function on the admin request's parts), so a caller reaches only its own scope's
        /// records; another scope's record is a 404.
        ///
        /// | route | answer |
        /// |---|---|
        /// | `GET {base}/keys/{key}` (`?body=true` adds the stored headers and body) | 200 [`RecordView`] |
        /// | `POST {base}/keys/{key}/release` with the token from inspect (`?token=` or `{"token": ..}`) | 200 `{"released": true, "operation_id", "key_attribute"}`; 409 `token-stale` if the token is no longer the record's |
        /// | `DELETE {base}/keys/{key}` | 200 `{"evicted": true, "record"}` |
        /// | `GET {base}/stuck?older_than_ms=0&limit=100` | 200 `{"stuck": [RecordView]}`: the caller's scope's claims whose lease lapsed at least `older_than_ms` ago |
        ///
        /// Errors are `application/problem+json` (see [`problem`](crate::problem)): 400
        /// `invalid-key`, `invalid-token` or `invalid-parameter`, 404 `record-not-found`, 409
        /// `token-stale`, 501 `unsupported` (the ledger does not offer the call), 503
        /// `ledger-unavailable`. Calls go through the layer's ledger timeout and circuit breaker.
        ///
        /// **The router only scopes; it does not authenticate.** Mount it behind the operators'
        /// authentication (and whatever sets the scope the layer reads), never on the public
        /// listener as is. A release or an evict makes the next retry run the handler again:
        /// release only a claim whose holder is gone (`lease_lapsed`).
        ///
        /// The ledger's list of stuck claims is not scoped: the router asks for up to
        /// `max(limit, 1000)` of them and keeps the caller's, so a caller may see fewer than
        /// `limit` while more than that many other scopes' claims are stuck.
        ///
        /// ```
        /// use axum::{Router, routing::post};
        /// use tower_idempotency::{IdempotencyLayer, MemoryLedger};
        ///
        /// # async fn create() {}
        /// # async fn operators_only(r: axum::extract::Request, n: axum::middleware::Next) -> axum::response::Response { n.run(r).await }
        /// let layer = IdempotencyLayer::new(MemoryLedger::new());
        /// let admin: Router = layer
        ///     .admin_router("/admin/idempotency")
        ///     .layer(axum::middleware::from_fn(operators_only)); // your operators' auth
        /// let app: Router = Router::new()
        ///     .route("/payments", post(create))
        ///     .layer(layer.clone())
        ///     .merge(admin);
        /// ```
        #[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
        pub fn admin_router<S>(&self, base: &str) -> Router<S>
        where
            S: Clone + Send + Sync + 'static,
        {
            admin_router(self.shared.clone(), base)
        }
    }

    fn admin_router<L, S>(shared: Arc<Shared<L>>, base: &str) -> Router<S>
    where
        L: Ledger,
        S: Clone + Send + Sync + 'static,
    {
        let base = base.trim_end_matches('/');
        let key_path = format!("{base}/keys/{{key}}");
        let (a, b, c, d) = (shared.clone(), shared.clone(), shared.clone(), shared);
        Router::new()
            .route(
                &key_path,
                get(move |parts: Parts, Path(key): Path<String>| inspect(a.clone(), parts, key))
                    .delete(move |parts: Parts, Path(key): Path<String>| {
                        evict(b.clone(), parts, key)
                    }),
            )
            .route(
                &format!("{key_path}/release"),
                post(move |parts: Parts, Path(key): Path<String>, body: Bytes| {
                    release(c.clone(), parts, key, body)
                }),
            )
            .route(
                &format!("{base}/stuck"),
                get(move |parts: Parts| stuck(d.clone(), parts)),
            )
    }

    /// The caller's scope (by the layer's scope function) and its digest.
    fn scope<L>(shared: &Shared<L>, parts: &Parts) -> (Vec<u8>, ScopeDigest) {
        let scope = shared.config.scope_of(parts);
        let digest = ScopeDigest::new(&scope);
        (scope, digest)
    }

    /// The ledger key of the raw key `key` in the caller's scope.
    fn ledger_key<L>(
        shared: &Shared<L>,
        parts: &Parts,
        key: &str,
    ) -> Result<(LedgerKey, ScopeDigest), Box<Response>> {
        let key = IdempotencyKey::parse(key.as_bytes()).map_err(|error| {
            Box::new(problem(
                StatusCode::BAD_REQUEST,
                "invalid-key",
                "Invalid idempotency key",
                &format!("not a valid idempotency key: {error}"),
            ))
        })?;
        let (scope, digest) = scope(shared, parts);
        Ok((LedgerKey::new(&scope, &key), digest))
    }

    fn query<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
        parts
            .uri
            .query()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    fn problem(status: StatusCode, slug: &str, title: &str, detail: &str) -> Response {
        admin_problem(status, slug, title, detail)
            .map(Body::from)
            .into_response()
    }

    fn not_found() -> Response {
        problem(
            StatusCode::NOT_FOUND,
            "record-not-found",
            "Record not found",
            "no live record for this key in the caller's scope: never used, released, evicted \
             or expired",
        )
    }

    fn ledger_failed(error: &LedgerError) -> Response {
        if let LedgerError::Unsupported { operation } = error {
            return problem(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                "Not supported by this ledger",
                &format!("this idempotency ledger does not support `{operation}`"),
            );
        }
        tracing::warn!(%error, "an operator call on the idempotency ledger failed");
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "ledger-unavailable",
            "Idempotency ledger unavailable",
            "the idempotency ledger is unavailable",
        )
    }

    fn json(value: serde_json::Value) -> Response {
        axum::Json(value).into_response()
    }

    fn view(info: &RecordInfo) -> serde_json::Value {
        serde_json::to_value(RecordView::new(info, SystemTime::now())).unwrap_or_default()
    }

    /// The caller's live record under `key`, or the answer to give instead.
    async fn lookup<L: Ledger>(
        shared: &Shared<L>,
        key: &LedgerKey,
        scope: &ScopeDigest,
        with_body: bool,
    ) -> Result<RecordInfo, Response> {
        let ledger = &shared.ledger;
        match shared
            .call("inspect", Door::Gated, ledger.inspect(key, with_body))
            .await
        {
            // The ledger key already digests the scope; the record's own scope is checked too.
            Ok(Some(info)) if info.scope == *scope => Ok(info),
            Ok(_) => Err(not_found()),
            Err(error) => Err(ledger_failed(&error)),
        }
    }

    async fn inspect<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts, key: String) -> Response {
        let (key, scope) = match ledger_key(&shared, &parts, &key) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let with_body = matches!(query(&parts, "body"), Some("true" | "1" | ""));
        match lookup(&shared, &key, &scope, with_body).await {
            Ok(info) => json(view(&info)),
            Err(response) => response,
        }
    }

    async fn release<L: Ledger>(
        shared: Arc<Shared<L>>,
        parts: Parts,
        key: String,
        body: Bytes,
    ) -> Response {
        let (key, scope) = match ledger_key(&shared, &parts, &key) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let from_body = || {
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()?
                .get("token")?
                .as_str()
                .map(str::to_owned)
        };
        let token = query(&parts, "token").map(str::to_owned).or_else(from_body);
        let Some(token) = token.and_then(|t| Uuid::parse_str(&t).ok()) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "invalid-token",
                "Fencing token required",
                "send the token seen in the record (`?token=` or `{\"token\": ..}`)",
            );
        };
        let token = FencingToken::from_uuid(token);
        let info = match lookup(&shared, &key, &scope, false).await {
            Ok(info) => info,
            Err(response) => return response,
        };
        let stale = || {
            problem(
                StatusCode::CONFLICT,
                "token-stale",
                "The record changed",
                "the token is no longer the record's: its request completed, or another request \
                 took the key over. Inspect the key again",
            )
        };
        if info.token() != Some(token) {
            return stale();
        }
        let ledger = &shared.ledger;
        match shared
            .call(
                "force_release",
                Door::Always,
                ledger.force_release(&key, token),
            )
            .await
        {
            Ok(()) => json(serde_json::json!({
                "released": true,
                "operation_id": info.operation_id,
                "key_attribute": key.short(),
            })),
            Err(LedgerError::LeaseLost) => stale(),
            Err(error) => ledger_failed(&error),
        }
    }

    async fn evict<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts, key: String) -> Response {
        let (key, scope) = match ledger_key(&shared, &parts, &key) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let info = match lookup(&shared, &key, &scope, false).await {
            Ok(info) => info,
            Err(response) => return response,
        };
        let ledger = &shared.ledger;
        match shared.call("evict", Door::Always, ledger.evict(&key)).await {
            Ok(true) => json(serde_json::json!({ "evicted": true, "record": view(&info) })),
            Ok(false) => not_found(),
            Err(error) => ledger_failed(&error),
        }
    }

    async fn stuck<L: Ledger>(shared: Arc<Shared<L>>, parts: Parts) -> Response {
        let number = |name: &str, default: u64| match query(&parts, name) {
            None => Ok(default),
            Some(value) => value.parse::<u64>().map_err(|_| {
                Box::new(problem(
                    StatusCode::BAD_REQUEST,
                    "invalid-parameter",
                    "Invalid parameter",
                    &format!("`{name}` must be a non-negative integer"),
                ))
            }),
        };
        let (older_than, limit) = match (number("older_than_ms", 0), number("limit", 100)) {
            (Ok(older), Ok(limit)) => (older, limit),
            (Err(response), _) | (_, Err(response)) => return *response,
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let (_, scope) = scope(&shared, &parts);
        let ledger = &shared.ledger;
        let older_than = std::time::Duration::from_millis(older_than);
        match shared
            .call(
                "stuck",
                Door::Gated,
                ledger.stuck(older_than, limit.max(STUCK_SCAN)),
            )
            .await
        {
            Ok(records) => {
                let now = SystemTime::now();
                let mine: Vec<RecordView> = records
                    .iter()
                    .filter(|info| info.scope == scope)
                    .take(limit)
                    .map(|info| RecordView::new(info, now))
                    .collect();
                json(serde_json::json!({ "stuck": mine }))
            }
            Err(error) => ledger_failed(&error),
        }
    }
}
