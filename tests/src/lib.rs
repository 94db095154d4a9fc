//! Tests only; see `tests/`. The library holds what several test files share.

pub mod proxy;
