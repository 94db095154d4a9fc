//! PostgreSQL ledger benchmark (being written).

fn main() {}
