//! Tests only; see `tests/`. The library holds what several test files share.

pub mod pg;
pub mod proxy;
