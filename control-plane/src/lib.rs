//! `fleet-control` is the fleetml control plane and the library behind the `fleetctl`
//! operator CLI. This release holds the offline half: signing keys and trust policies
//! (`keys`), and building, signing, verifying and inspecting model bundles (`bundle`).
//! Every check of a bundle is done by `fleetml-protocol`, the same code the agent runs.

pub mod bundle;
pub mod client;
pub mod ingest;
pub mod keys;
pub mod onnx;
pub mod output;
pub mod server;
pub mod views;
