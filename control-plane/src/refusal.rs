//! What an operation of the control plane reports when it cannot be done, by what a caller
//! does about it. The rooms that both the API and the background tasks use (starting
//! rollouts, comparing models, starting training jobs, reading datasets and captures)
//! return a [`Refusal`]; the API turns each kind into its HTTP status
//! (`From<Refusal> for ApiError`), the drift policy logs it and tries again on its next
//! tick. The message always names what was wrong and, where there is one, what to do.

use crate::store::StoreError;

/// Why an operation was not done.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// What it names does not exist (a model version, a dataset, a job).
    #[error("{0}")]
    NotFound(String),
    /// It existed, its data is gone (a dataset file removed from disk).
    #[error("{0}")]
    Gone(String),
    /// It collides with something going on (another rollout of the model).
    #[error("{0}")]
    Conflict(String),
    /// The control plane is not set up for it (no trust policy, say).
    #[error("{0}")]
    Precondition(String),
    /// Well-formed, but not something that can be done (an archived version, a
    /// selector matching no device, no captured rows).
    #[error("{0}")]
    Unprocessable(String),
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The control plane failed (a file it wrote cannot be read back, say).
    #[error("{0}")]
    Internal(String),
}

impl Refusal {
    /// [`Refusal::NotFound`] from anything printable.
    pub fn not_found(e: impl std::fmt::Display) -> Refusal {
        Refusal::NotFound(e.to_string())
    }

    /// [`Refusal::Gone`] from anything printable.
    pub fn gone(e: impl std::fmt::Display) -> Refusal {
        Refusal::Gone(e.to_string())
    }

    /// [`Refusal::Conflict`] from anything printable.
    pub fn conflict(e: impl std::fmt::Display) -> Refusal {
        Refusal::Conflict(e.to_string())
    }

    /// [`Refusal::Precondition`] from anything printable.
    pub fn precondition(e: impl std::fmt::Display) -> Refusal {
        Refusal::Precondition(e.to_string())
    }

    /// [`Refusal::Unprocessable`] from anything printable.
    pub fn unprocessable(e: impl std::fmt::Display) -> Refusal {
        Refusal::Unprocessable(e.to_string())
    }

    /// [`Refusal::Internal`] from anything printable.
    pub fn internal(e: impl std::fmt::Display) -> Refusal {
        Refusal::Internal(e.to_string())
    }
}
