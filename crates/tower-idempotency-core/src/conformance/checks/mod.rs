//! The checks themselves: one public async function per rule of the [`Ledger`] contract, one
//! file per theme.
//!
//! [`Ledger`]: crate::Ledger

mod lifecycle;
mod lookup;
mod maintenance;
mod operator;
mod races;
mod support;

pub use lifecycle::*;
pub use lookup::*;
pub use maintenance::*;
pub use operator::*;
pub use races::*;
pub use support::sample_response;
