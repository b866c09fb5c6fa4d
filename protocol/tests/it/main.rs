//! Integration tests of fleetml-protocol (one test binary for the crate).

mod alloc_track;
mod assignment;
mod board;
mod broker_acl;
mod bundle;
mod features;
mod fixture;
mod payloads;
mod telemetry;
mod wycheproof_ed25519;

#[global_allocator]
static ALLOC: alloc_track::Tracking = alloc_track::Tracking;
