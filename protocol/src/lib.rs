//! `fleetml-protocol` holds everything that crosses the wire or the disk between the
//! fleetml control plane and its devices: the signed model bundle (`.fmb`) and its
//! manifest, the trust policy that decides whether a bundle may run, the feature schema,
//! the reference profile and golden vectors stored in a bundle, and board profiles.
//!
//! The crate is pure: no async runtime, no sockets, no clock and no filesystem calls.
//! Callers hand it bytes or a [`std::io::Read`] and pass the time in where it matters.
//! Every decoder bounds what it allocates before it allocates it.

pub mod board;
pub mod bundle;
pub mod crypto;
pub mod features;
pub mod golden;
pub mod manifest;
pub mod reference;
pub mod trust;

/// The version of this crate, which is also the agent and control-plane release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
