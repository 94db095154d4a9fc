//! `storm`: duplicates, drops and retries against a running payment-service, then an audit.

fn main() {}
