//! `fleetml-protocol` holds everything that crosses the wire or the disk between the
//! fleetml control plane and its devices: the signed model bundle (`.fmb`) and its
//! manifest, the trust policy that decides whether a bundle may run, the feature schema,
//! the reference profile and golden vectors stored in a bundle, board profiles, and the
//! MQTT topics and authenticated CBOR messages devices and the control plane exchange.
//!
//! The crate is pure: no async runtime, no sockets, no clock and no filesystem calls.
//! Callers hand it bytes or a [`std::io::Read`] and pass the time in where it matters.
//! Every decoder bounds what it allocates before it allocates it.

pub mod assignment;
pub mod board;
pub mod broker_acl;
pub mod bundle;
pub mod crypto;
pub mod features;
pub mod golden;
pub mod manifest;
pub mod reference;
pub mod telemetry;
pub mod tensor;
pub mod trust;

/// The version of this crate, which is also the agent and control-plane release version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
