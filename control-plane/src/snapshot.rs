//! What the fleet looks like now, read once for the notifier's rules and the fleet-level
//! metrics: every enrolled device with its derived state, the rollouts and the training
//! jobs. Plain data; [`Snapshot::read`] is the only part that touches the stores.
//!
//! Device states are brief ([`crate::store::with_brief_states`]): neither reader looks at
//! a window's per-feature drift. At 10,000 devices a snapshot of whole states was about
//! 160 MiB while it lived (measured with heaptrack); [`Shared`] keeps the notifier and
//! the metrics from holding two at once.

use std::sync::{Arc, Mutex, Weak};

use crate::jobs::spec::Job;
use crate::records::{DeviceRecord, DeviceState};
use crate::rollout::Rollout;
use crate::store::StoreError;

/// How old a snapshot still in use may be for the fleet metrics to take it instead of
/// reading their own (the notifier, which judges silence by the clock, reads afresh).
pub const SHARED_MS: u64 = 5_000;

/// Snapshots read one at a time, and shared: a caller that asks while the last one is
/// still in use (and young enough) gets that one instead of a second copy. Nothing is
/// kept once its users are done with it.
#[derive(Debug, Default)]
pub struct Shared {
    last: Mutex<Option<(u64, Weak<Snapshot>)>>,
}

impl Shared {
    /// The snapshot still in use if it was read at most `max_age_ms` before `now_ms`;
    /// otherwise a new one from `read`. Readers wait for each other.
    pub fn get(
        &self,
        now_ms: u64,
        max_age_ms: u64,
        read: impl FnOnce() -> Result<Snapshot, StoreError>,
    ) -> Result<Arc<Snapshot>, StoreError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, weak)) = &*last
            && now_ms.saturating_sub(*at) <= max_age_ms
            && let Some(snap) = weak.upgrade()
        {
            return Ok(snap);
        }
        *last = None;
        let snap = Arc::new(read()?);
        *last = Some((now_ms, Arc::downgrade(&snap)));
        Ok(snap)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Enrolled devices that are not revoked, with what their messages said, brief
    /// ([`DeviceState::brief`]: no window's per-feature drift).
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
        let live: Vec<DeviceRecord> = fleet
            .devices()?
            .into_iter()
            .filter(|d| d.revoked_ms.is_none())
            .collect();
        let devices = crate::store::with_brief_states(fleet, live)?;
        Ok(Snapshot {
            devices,
            rollouts: rollouts.rollouts()?,
            jobs: jobs.all()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_in_use_is_shared_and_none_is_kept_after() {
        let shared = Shared::default();
        let mut reads = 0;
        let mut read = || {
            reads += 1;
            Ok(Snapshot::default())
        };
        let first = shared.get(1_000, 5_000, &mut read).expect("read");
        let second = shared.get(2_000, 5_000, &mut read).expect("shared");
        assert!(Arc::ptr_eq(&first, &second));
        // Too old: read again, though still in use.
        let third = shared.get(7_000, 5_000, &mut read).expect("fresh");
        assert!(!Arc::ptr_eq(&first, &third));
        // Nobody holds it: read again, even when young.
        drop((first, second, third));
        let _fourth = shared.get(7_001, 5_000, &mut read).expect("again");
        assert_eq!(reads, 3);
    }
}
