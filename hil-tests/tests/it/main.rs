//! System tests: the real `fleetctl` and `fleet-agent` binaries on real files.

mod alerts;
mod api;
mod architecture;
mod bundle_cli;
mod capture;
mod conformance;
mod console;
mod demo;
mod demo_loop;
mod fleet;
mod fleet_sim;
mod hil;
mod monitoring;
mod peers;
mod real_models;
mod replicas;
mod retrain;
mod rollout;
mod security;
mod shadow;
mod store_crash;
mod tls;
