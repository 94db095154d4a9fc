//! A layer built without a scope warns once, naming the risk; one built with a scope, or
//! explicitly `unscoped()`, does not.
//!
//! Alone in its test binary: tracing caches each callsite's interest process-wide, so a test
//! running in parallel without a subscriber could hide the event from this one's capture.

#![allow(clippy::unwrap_used)] // tests may panic

use std::sync::{Arc, Mutex};

use tower_idempotency::{IdempotencyLayer, MemoryLedger};
use tracing::{Event, Level, Subscriber, field::Visit};
use tracing_subscriber::{Layer, layer::Context, prelude::*};

#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

struct Message<'a>(&'a mut String);

impl Visit for Message<'_> {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{value:?} "));
    }
}

impl<S: Subscriber> Layer<S> for Warnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if *event.metadata().level() == Level::WARN {
            let mut text = String::new();
            event.record(&mut Message(&mut text));
            self.0.lock().unwrap().push(text);
        }
    }
}

fn warnings_while(build: impl FnOnce()) -> Vec<String> {
    let warnings = Warnings::default();
    let subscriber = tracing_subscriber::registry().with(warnings.clone());
    tracing::subscriber::with_default(subscriber, build);
    warnings.0.lock().unwrap().clone()
}

#[test]
fn a_layer_without_a_scope_warns_and_an_explicit_choice_does_not() {
    let unscoped = warnings_while(|| {
        let _ = IdempotencyLayer::builder(MemoryLedger::new())
            .build()
            .unwrap();
    });
    assert_eq!(unscoped.len(), 1, "{unscoped:?}");
    assert!(unscoped[0].contains("with_scope"), "{unscoped:?}");

    let quick_start = warnings_while(|| {
        let _ = IdempotencyLayer::new(MemoryLedger::new());
    });
    assert_eq!(quick_start.len(), 1, "new() warns too: {quick_start:?}");

    let scoped = warnings_while(|| {
        let _ = IdempotencyLayer::builder(MemoryLedger::new())
            .with_scope(|_: &http::request::Parts| b"tenant".to_vec())
            .build()
            .unwrap();
        let _ = IdempotencyLayer::builder(MemoryLedger::new())
            .unscoped()
            .build()
            .unwrap();
    });
    assert!(scoped.is_empty(), "{scoped:?}");
}
