//! What the fleet looks like now, read once for the notifier's rules and the fleet-level
//! metrics: every enrolled device with its derived state, the rollouts and the training
//! jobs. Plain data; [`Snapshot::read`] is the only part that touches the stores.

use crate::jobs::spec::Job;
use crate::records::{DeviceRecord, DeviceState};
use crate::rollout::Rollout;
use crate::store::StoreError;

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Enrolled devices that are not revoked, with what their messages said.
    pub devices: Vec<(DeviceRecord, DeviceState)>,
    pub rollouts: Vec<Rollout>,
    pub jobs: Vec<Job>,
}

impl Snapshot {
    /// Reads it from the stores (blocking: call it off the async runtime).
    pub fn read(
        fleet: &dyn crate::store::FleetStore,
        rollouts: &dyn crate::store::RolloutStore,
        jobs: &crate::jobs::Jobs,
    ) -> Result<Snapshot, StoreError> {
        let mut devices = Vec::new();
        for d in fleet.devices()? {
            if d.revoked_ms.is_some() {
                continue;
            }
            let state = fleet.state(&d.id)?.unwrap_or_default();
            devices.push((d, state));
        }
        Ok(Snapshot {
            devices,
            rollouts: rollouts.rollouts()?,
            jobs: jobs.all()?,
        })
    }
}
