//! `fleet-control` is the fleetml control plane and the library behind the `fleetctl`
//! operator CLI: signing keys and trust policies (`keys`); building, signing, verifying
//! and inspecting model bundles (`bundle`); and `fleetctl serve` (`server`) — the operator
//! API, the MQTT broker devices report to (embedded rumqttd or an external one), and the
//! telemetry ingest (`ingest`) behind the fleet views (`views`) that `fleetctl devices`
//! and `fleetctl drift` print through the API client (`client`). Every check of a bundle
//! or a message is done by `fleetml-protocol`, the same code the agent runs. `fleetctl sim`
//! (`sim`) measures a control plane under a fleet of simulated devices.

pub mod alerts;
pub mod api;
pub mod assign;
pub mod auth;
pub mod broker;
pub mod bundle;
pub mod calibrate;
pub mod captures;
pub mod client;
pub mod compare;
pub mod console;
pub mod csvfile;
pub mod datasets;
pub mod demo;
pub mod fleet_metrics;
pub mod golden;
pub mod http;
pub mod ingest;
pub mod ingest_mqtt;
pub mod ingest_queue;
pub mod jobs;
pub mod k8s;
pub mod keys;
pub mod leader;
pub mod memory;
pub mod mosquitto;
pub mod multivariate;
pub mod nats_auth;
pub mod onnx;
pub mod output;
pub mod performance;
pub mod pg;
pub mod plane;
pub(crate) mod policy;
pub mod profile;
pub mod records;
pub mod refusal;
pub mod registry;
pub(crate) mod retrain;
pub mod rollout;
pub mod server;
pub mod sim;
pub mod snapshot;
pub mod store;
pub mod tls;
pub mod views;
