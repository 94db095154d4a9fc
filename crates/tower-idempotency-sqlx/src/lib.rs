//! SQLite and PostgreSQL ledgers (placeholder: being written).
