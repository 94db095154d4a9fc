//! Spans: the outcome attribute, the span tree, and no raw key anywhere.
//!
//! Alone in its test binary on purpose: tracing caches each callsite's interest process-wide,
//! so a test running in parallel without a subscriber can make the spans of this one invisible
//! to its thread-local capture.

#![allow(clippy::unwrap_used)] // tests may panic

mod support;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use support::*;
use tower_idempotency::{IdempotencyLayer, MemoryLedger};
use tracing::{
    Subscriber,
    field::{Field, Visit},
    span::{Attributes, Id, Record},
};
use tracing_subscriber::{Layer, layer::Context, prelude::*, registry::LookupSpan};

/// One recorded span: its name, its parent's name and every field recorded on it.
#[derive(Debug, Clone, Default)]
struct Captured {
    name: String,
    parent: Option<String>,
    fields: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(u64, Captured)>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut captured = Captured {
            name: attrs.metadata().name().to_owned(),
            parent: ctx
                .span(id)
                .and_then(|s| s.parent())
                .map(|p| p.name().to_owned()),
            ..Default::default()
        };
        attrs.record(&mut Fields(&mut captured.fields));
        self.0.lock().unwrap().push((id.into_u64(), captured));
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        let mut spans = self.0.lock().unwrap();
        if let Some((_, span)) = spans.iter_mut().rev().find(|(i, _)| *i == id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
}

const RAW_KEY: &str = "customer-secret-key-4711";

#[tokio::test]
async fn spans_carry_the_outcome_and_the_digest_never_the_key() {
    let capture = Capture::default();
    let _guard = tracing_subscriber::registry()
        .with(capture.clone())
        .set_default();
    let runs = Runs::default();
    let app =
        payments(runs.clone(), Duration::ZERO).layer(IdempotencyLayer::new(MemoryLedger::new()));

    send(&app, pay(RAW_KEY, "{}")).await;
    send(&app, pay(RAW_KEY, "{}")).await;
    send(&app, pay(RAW_KEY, r#"{"other":1}"#)).await;

    let spans: Vec<Captured> = capture
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    let requests: Vec<&Captured> = spans.iter().filter(|s| s.name == "idempotency").collect();
    let outcomes: Vec<&str> = requests
        .iter()
        .map(|s| s.fields["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["executed", "replayed", "mismatch"]);
    for span in &requests {
        let key = &span.fields["key"];
        assert_eq!(key.len(), 16, "a short digest: {key}");
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(span.fields.contains_key("operation_id"), "{span:?}");
        assert_eq!(span.fields["ledger"], "memory");
    }
    assert_eq!(
        requests[0].fields["operation_id"],
        requests[1].fields["operation_id"]
    );

    let ledger_calls: Vec<(&str, Option<&str>)> = spans
        .iter()
        .filter(|s| s.name == "idempotency.ledger")
        .map(|s| (s.fields["operation"].as_str(), s.parent.as_deref()))
        .collect();
    assert_eq!(
        ledger_calls,
        [
            ("claim", Some("idempotency")),
            ("complete", Some("idempotency")),
            ("claim", Some("idempotency")),
            ("claim", Some("idempotency")),
        ]
    );

    let everything = format!("{spans:?}");
    assert!(
        !everything.contains(RAW_KEY),
        "the raw key reached a span: {everything}"
    );
}
