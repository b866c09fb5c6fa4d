//! CPU inference: tract, through `fleetml-inference` (the same code the bundle builder
//! used to compute the golden outputs this agent checks).

pub use fleetml_inference::{CpuModel, RuntimeError};
