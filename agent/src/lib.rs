//! `fleet-agent` runs on each device. It verifies signed model bundles with the same
//! code the control plane uses (`fleetml-protocol`), self-tests a model against the
//! golden vectors its bundle carries, activates models atomically and serves
//! predictions on the CPU (tract) or, built with the `gpu` feature, the GPU (wonnx).
//!
//! Invariant: nothing from a bundle is written to disk or loaded for inference before the
//! whole bundle has been verified against the trust policy.

pub mod activation;
pub mod api;
pub mod assignments;
pub mod backend;
pub mod batcher;
#[cfg(feature = "capture")]
pub mod capture;
pub mod clock;
pub mod config;
pub mod explain;
pub mod files;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod http;
pub mod liveness;
pub mod memory;
pub mod monitoring;
pub mod outbox;
pub mod publisher;
pub mod runtime;
pub mod sdnotify;
pub mod selftest;
pub mod serve;
pub mod shadow;
#[cfg(feature = "sinks")]
pub mod sinks;
pub mod store;
pub mod telemetry;
pub mod wire;

/// This agent's release, compared against a bundle's `min_agent_version`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
