//! The rules a fleetml device follows, once, for both devices there are: `fleet-agent`
//! on a board and the simulated devices of `fleetctl sim`.
//!
//! Everything here is sans-io: no clock (the caller passes the time in, as
//! milliseconds), no files, no sockets, no async runtime. The agent wraps these rules
//! in sled, hyper and rumqttc; the simulator wraps them in memory. A rule changed here
//! changes for both, which is the point: the simulator measures the control plane
//! against what real devices do.
//!
//! - [`delivery`]: when a published message may be forgotten (the broker's PUBACK,
//!   then the control plane's receipts), and which ones to publish again.
//! - [`pull`]: what an assignment pull's answer means, and what to do per model.
//! - [`download`]: resuming a bundle download and checking what the server sends.
//! - [`backoff`]: reconnect back-off and poll jitter, given a random number.
//! - [`commands`]: when missed commands call for an assignment pull (a refused command
//!   subscription, a reconnect).

pub mod backoff;
pub mod commands;
pub mod delivery;
pub mod download;
pub mod pull;
