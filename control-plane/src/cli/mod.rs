//! The operator commands of `fleetctl`, one file per noun; `main.rs` parses the
//! command line and hands each command to its file. `common` holds what several share.

pub(crate) mod alerts;
pub(crate) mod audit;
pub(crate) mod broker;
pub(crate) mod bundle;
pub(crate) mod common;
pub(crate) mod data;
pub(crate) mod devices;
pub(crate) mod drift;
pub(crate) mod keys;
pub(crate) mod models;
pub(crate) mod retrain;
pub(crate) mod rollback;
pub(crate) mod rollout;
pub(crate) mod serve;
pub(crate) mod sim;
pub(crate) mod tls;
pub(crate) mod tokens;
pub(crate) mod trainers;
pub(crate) mod trust;

pub(crate) use self::alerts::*;
pub(crate) use self::audit::*;
pub(crate) use self::broker::*;
pub(crate) use self::bundle::*;
pub(crate) use self::data::*;
pub(crate) use self::devices::*;
pub(crate) use self::drift::*;
pub(crate) use self::keys::*;
pub(crate) use self::models::*;
pub(crate) use self::retrain::*;
pub(crate) use self::rollback::*;
pub(crate) use self::rollout::*;
pub(crate) use self::serve::*;
pub(crate) use self::sim::*;
pub(crate) use self::tls::*;
pub(crate) use self::tokens::*;
pub(crate) use self::trainers::*;
pub(crate) use self::trust::*;
