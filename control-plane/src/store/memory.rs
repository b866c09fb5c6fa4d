//! The store in memory: nothing survives the process. For tests (the conformance suite
//! runs on it beside sled) and for a control plane that is meant to keep nothing.

use std::collections::BTreeMap;
use std::sync::Mutex;

use fleetml_protocol::assignment::AssignedModel;
use fleetml_protocol::telemetry::{DeviceId, Envelope, Received};

use super::{
    AlertStore, AssignmentStore, AuditStore, CaptureStore, DatasetStore, FleetStore, JobStore,
    PolicyStore, RegistryStore, RolloutStore, StoreError, TokenStore,
};
use crate::assign::{AssignmentRecord, point};
use crate::jobs::spec::Job;
use crate::records::{
    AlertRecord, AuditEntry, CaptureRecord, DatasetManifest, DeviceRecord, DeviceState,
    ModelRecord, Policy, PolicyState, Silence, TokenRecord,
};
use crate::rollout::Rollout;

/// Every record behind one lock: each call is one transaction.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    devices: BTreeMap<DeviceId, DeviceRecord>,
    messages: BTreeMap<(DeviceId, u64), Envelope>,
    /// When each message was stored (milliseconds since the epoch).
    stored_ms: BTreeMap<(DeviceId, u64), u64>,
    high: BTreeMap<DeviceId, u64>,
    state: BTreeMap<DeviceId, DeviceState>,
    commands: BTreeMap<DeviceId, u64>,
    assignments: BTreeMap<DeviceId, AssignmentRecord>,
    rollouts: BTreeMap<String, Rollout>,
    rollout_ids: u64,
    tokens: BTreeMap<String, TokenRecord>,
    audit: BTreeMap<u64, AuditEntry>,
    policies: BTreeMap<String, (Policy, PolicyState)>,
    models: BTreeMap<(String, u64), ModelRecord>,
    captures: BTreeMap<(DeviceId, u64), CaptureRecord>,
    datasets: BTreeMap<String, DatasetManifest>,
    jobs: BTreeMap<String, Job>,
    job_ids: u64,
    job_specs: BTreeMap<String, String>,
    alerts: BTreeMap<String, AlertRecord>,
    silences: BTreeMap<String, Silence>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock left whole records: every change below is
        // computed first and then written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn bump_command_seq(&mut self, device: &DeviceId) -> u64 {
        let n = self.commands.entry(device.clone()).or_insert(0);
        let before = *n;
        *n += 1;
        before
    }

    fn assign_all(
        &mut self,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Vec<u64> {
        changes
            .iter()
            .map(|(device, to)| {
                let record = self.assignments.entry(device.clone()).or_default();
                point(record, model, to, now_ms);
                record.generation
            })
            .collect()
    }
}

impl FleetStore for MemoryStore {
    fn enroll(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if inner.devices.contains_key(&device.id) {
            return Ok(false);
        }
        inner.devices.insert(device.id.clone(), device.clone());
        Ok(true)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(self.inner().devices.get(id).cloned())
    }

    fn replace_device(&self, device: &DeviceRecord) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        match inner.devices.get_mut(&device.id) {
            Some(d) => {
                *d = device.clone();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        Ok(self.inner().devices.values().cloned().collect())
    }

    fn insert(&self, envelope: &Received, now_ms: u64) -> Result<(bool, Option<u64>), StoreError> {
        let mut inner = self.inner();
        let key = (envelope.device.clone(), envelope.seq);
        let new = !inner.messages.contains_key(&key);
        if new {
            inner.stored_ms.insert(key.clone(), now_ms);
            inner.messages.insert(key, envelope.envelope().clone());
        }
        let high = inner.high.entry(envelope.device.clone());
        let before = match high {
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let before = *o.get();
                *o.get_mut() = before.max(envelope.seq);
                Some(before)
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(envelope.seq);
                None
            }
        };
        Ok((new, before))
    }

    fn prune_messages(&self, device: &DeviceId, keep: usize) -> Result<u64, StoreError> {
        let mut inner = self.inner();
        let seqs: Vec<u64> = inner
            .messages
            .range((device.clone(), 0)..=(device.clone(), u64::MAX))
            .map(|((_, s), _)| *s)
            .collect();
        let drop = seqs.len().saturating_sub(keep);
        for s in &seqs[..drop] {
            inner.messages.remove(&(device.clone(), *s));
            inner.stored_ms.remove(&(device.clone(), *s));
        }
        Ok(drop as u64)
    }

    fn prune_kinds(
        &self,
        device: &DeviceId,
        keep: &std::collections::BTreeMap<String, usize>,
    ) -> Result<u64, StoreError> {
        let mut inner = self.inner();
        let messages = inner
            .messages
            .range((device.clone(), 0)..=(device.clone(), u64::MAX))
            .map(|((_, seq), e)| (e.body.kind(), *seq));
        let gone = super::beyond_kept(messages, keep);
        for s in &gone {
            inner.messages.remove(&(device.clone(), *s));
            inner.stored_ms.remove(&(device.clone(), *s));
        }
        Ok(gone.len() as u64)
    }

    fn expire_messages(&self, rules: &super::AgeRules, now_ms: u64) -> Result<u64, StoreError> {
        let mut inner = self.inner();
        let mut expiry = super::Expiry::new(rules, now_ms);
        let mut gone = Vec::new();
        for (key, e) in &inner.messages {
            let entry = super::LogEntry {
                device: key.0.as_str(),
                kind: Some(e.body.kind()),
                model: match &e.body {
                    fleetml_protocol::telemetry::Body::Window(w) => Some(w.model.as_str()),
                    _ => None,
                },
                stored_ms: inner.stored_ms.get(key).copied().unwrap_or(now_ms),
            };
            if expiry.gone(&entry) {
                gone.push(key.clone());
            }
        }
        for key in &gone {
            inner.messages.remove(key);
            inner.stored_ms.remove(key);
        }
        Ok(gone.len() as u64)
    }

    fn messages(
        &self,
        device: &DeviceId,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Envelope>, StoreError> {
        Ok(self
            .inner()
            .messages
            .range((device.clone(), from)..=(device.clone(), u64::MAX))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }

    fn state(&self, device: &DeviceId) -> Result<Option<DeviceState>, StoreError> {
        Ok(self.inner().state.get(device).cloned())
    }

    fn update_state(
        &self,
        device: &DeviceId,
        change: &mut (dyn FnMut(&mut DeviceState) + Send),
    ) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let mut state = inner.state.get(device).cloned().unwrap_or_default();
        change(&mut state);
        inner.state.insert(device.clone(), state);
        Ok(())
    }

    fn next_command_seq(&self, device: &DeviceId) -> Result<u64, StoreError> {
        Ok(self.inner().bump_command_seq(device))
    }

    fn next_command_seqs(&self, devices: &[DeviceId]) -> Result<Vec<u64>, StoreError> {
        let mut inner = self.inner();
        Ok(devices.iter().map(|d| inner.bump_command_seq(d)).collect())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

impl AssignmentStore for MemoryStore {
    fn assignment(&self, device: &DeviceId) -> Result<Option<AssignmentRecord>, StoreError> {
        Ok(self.inner().assignments.get(device).cloned())
    }

    fn assign(
        &self,
        device: &DeviceId,
        model: &str,
        to: &AssignedModel,
        now_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut inner = self.inner();
        let record = inner.assignments.entry(device.clone()).or_default();
        point(record, model, to, now_ms);
        Ok(record.generation)
    }

    fn assign_all(
        &self,
        model: &str,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        Ok(self.inner().assign_all(model, changes, now_ms))
    }

    fn assignments(&self) -> Result<Vec<(DeviceId, AssignmentRecord)>, StoreError> {
        Ok(self
            .inner()
            .assignments
            .iter()
            .map(|(d, r)| (d.clone(), r.clone()))
            .collect())
    }
}

impl RolloutStore for MemoryStore {
    fn next_rollout_id(&self) -> Result<String, StoreError> {
        let mut inner = self.inner();
        inner.rollout_ids += 1;
        Ok(format!("r{}", inner.rollout_ids))
    }

    fn put_rollout(&self, rollout: &Rollout) -> Result<(), StoreError> {
        self.inner()
            .rollouts
            .insert(rollout.id.clone(), rollout.clone());
        Ok(())
    }

    fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        Ok(self.inner().rollouts.get(id).cloned())
    }

    fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut out: Vec<Rollout> = self.inner().rollouts.values().cloned().collect();
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    fn advance_rollout(
        &self,
        rollout: &mut Rollout,
        changes: &[(DeviceId, AssignedModel)],
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let mut inner = self.inner();
        let generations = inner.assign_all(&rollout.model, changes, now_ms);
        super::record_generations(rollout, changes, &generations);
        inner.rollouts.insert(rollout.id.clone(), rollout.clone());
        Ok(generations)
    }
}

impl TokenStore for MemoryStore {
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.inner().tokens.get(hash).cloned())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let mut out: Vec<TokenRecord> = self.inner().tokens.values().cloned().collect();
        out.sort_by_key(|r| r.created_ms);
        Ok(out)
    }

    fn put_token(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let mut inner = self.inner();
        inner
            .tokens
            .retain(|hash, r| r.id != record.id || *hash == record.hash);
        inner.tokens.insert(record.hash.clone(), record.clone());
        Ok(())
    }

    fn remove_token(&self, id: &str) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let before = inner.tokens.len();
        inner.tokens.retain(|_, r| r.id != id);
        Ok(inner.tokens.len() < before)
    }
}

impl AuditStore for MemoryStore {
    fn append_audit(
        &self,
        next: &mut (dyn FnMut(Option<&AuditEntry>) -> AuditEntry + Send),
    ) -> Result<AuditEntry, StoreError> {
        let mut inner = self.inner();
        let entry = next(inner.audit.values().next_back());
        inner.audit.insert(entry.seq, entry.clone());
        Ok(entry)
    }

    fn audit_entries(&self, from: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        Ok(self
            .inner()
            .audit
            .range(from..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl PolicyStore for MemoryStore {
    fn policy(&self, model: &str) -> Result<Option<(Policy, PolicyState)>, StoreError> {
        Ok(self.inner().policies.get(model).cloned())
    }

    fn put_policy(&self, policy: &Policy, state: &PolicyState) -> Result<(), StoreError> {
        self.inner()
            .policies
            .insert(policy.model.clone(), (policy.clone(), state.clone()));
        Ok(())
    }

    fn policies(&self) -> Result<Vec<(Policy, PolicyState)>, StoreError> {
        Ok(self.inner().policies.values().cloned().collect())
    }
}

impl RegistryStore for MemoryStore {
    fn model_version(&self, name: &str, version: u64) -> Result<Option<ModelRecord>, StoreError> {
        Ok(self
            .inner()
            .models
            .get(&(name.to_string(), version))
            .cloned())
    }

    fn insert_model_version(
        &self,
        record: &ModelRecord,
    ) -> Result<Option<ModelRecord>, StoreError> {
        let mut inner = self.inner();
        let key = (record.name.clone(), record.version);
        if let Some(existing) = inner.models.get(&key) {
            return Ok(Some(existing.clone()));
        }
        inner.models.insert(key, record.clone());
        Ok(None)
    }

    fn update_model_version(
        &self,
        name: &str,
        version: u64,
        change: &(dyn Fn(&mut ModelRecord) + Sync),
    ) -> Result<Option<ModelRecord>, StoreError> {
        let mut inner = self.inner();
        Ok(inner.models.get_mut(&(name.to_string(), version)).map(|r| {
            change(r);
            r.clone()
        }))
    }

    fn model_versions(&self, name: Option<&str>) -> Result<Vec<ModelRecord>, StoreError> {
        Ok(self
            .inner()
            .models
            .values()
            .filter(|r| name.is_none_or(|n| r.name == n))
            .cloned()
            .collect())
    }
}

impl CaptureStore for MemoryStore {
    fn capture(&self, device: &DeviceId, seq: u64) -> Result<Option<CaptureRecord>, StoreError> {
        Ok(self.inner().captures.get(&(device.clone(), seq)).cloned())
    }

    fn put_capture(&self, record: &CaptureRecord) -> Result<Option<CaptureRecord>, StoreError> {
        let mut inner = self.inner();
        let key = (record.device.clone(), record.seq);
        if let Some(existing) = inner.captures.get(&key) {
            return Ok(Some(existing.clone()));
        }
        inner.captures.insert(key, record.clone());
        Ok(None)
    }

    fn captures(&self) -> Result<Vec<CaptureRecord>, StoreError> {
        Ok(self.inner().captures.values().cloned().collect())
    }

    fn device_captures(&self, device: &DeviceId) -> Result<Vec<CaptureRecord>, StoreError> {
        Ok(self
            .inner()
            .captures
            .range((device.clone(), 0)..=(device.clone(), u64::MAX))
            .map(|(_, r)| r.clone())
            .collect())
    }
}

impl DatasetStore for MemoryStore {
    fn dataset(&self, id: &str) -> Result<Option<DatasetManifest>, StoreError> {
        Ok(self.inner().datasets.get(id).cloned())
    }

    fn put_dataset(&self, manifest: &DatasetManifest) -> Result<(), StoreError> {
        self.inner()
            .datasets
            .insert(manifest.id.clone(), manifest.clone());
        Ok(())
    }

    fn datasets(&self) -> Result<Vec<DatasetManifest>, StoreError> {
        let mut out: Vec<DatasetManifest> = self.inner().datasets.values().cloned().collect();
        out.sort_by_key(|m| m.created_ms);
        Ok(out)
    }

    fn remove_dataset(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.inner().datasets.remove(id).is_some())
    }
}

impl AlertStore for MemoryStore {
    fn alerts(&self) -> Result<Vec<AlertRecord>, StoreError> {
        Ok(self.inner().alerts.values().cloned().collect())
    }

    fn update_alerts(&self, changed: &[AlertRecord], removed: &[String]) -> Result<(), StoreError> {
        let mut inner = self.inner();
        for a in changed {
            inner.alerts.insert(a.key.clone(), a.clone());
        }
        for k in removed {
            inner.alerts.remove(k);
        }
        Ok(())
    }

    fn silences(&self) -> Result<Vec<Silence>, StoreError> {
        Ok(self.inner().silences.values().cloned().collect())
    }

    fn put_silence(&self, silence: &Silence) -> Result<(), StoreError> {
        self.inner()
            .silences
            .insert(silence.id.clone(), silence.clone());
        Ok(())
    }

    fn remove_silence(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.inner().silences.remove(id).is_some())
    }
}

impl JobStore for MemoryStore {
    fn next_job_id(&self) -> Result<String, StoreError> {
        let mut inner = self.inner();
        inner.job_ids += 1;
        Ok(format!("j{}", inner.job_ids))
    }

    fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.inner().jobs.insert(job.id.clone(), job.clone());
        Ok(())
    }

    fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        Ok(self.inner().jobs.get(id).cloned())
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let mut out: Vec<Job> = self.inner().jobs.values().cloned().collect();
        out.sort_by_key(|j| j.created_ms);
        Ok(out)
    }

    fn update_job(
        &self,
        id: &str,
        change: &mut (dyn FnMut(&mut Job) + Send),
    ) -> Result<bool, StoreError> {
        Ok(self.inner().jobs.get_mut(id).map(change).is_some())
    }

    fn put_job_spec(&self, model: &str, toml: &str) -> Result<(), StoreError> {
        self.inner()
            .job_specs
            .insert(model.to_string(), toml.to_string());
        Ok(())
    }

    fn job_spec(&self, model: &str) -> Result<Option<String>, StoreError> {
        Ok(self.inner().job_specs.get(model).cloned())
    }
}
