//! The assignment pull's decisions, without I/O and without a clock: what the control
//! plane answered, the assignment held and the time go in; what to keep, report and do
//! comes out. The caller fetches, keeps files, downloads and installs.

use std::collections::HashSet;

use fleetml_protocol::assignment::{
    AssignedModel, Assignment, AssignmentError, Checked, Held, SignedAssignment,
};
use fleetml_protocol::crypto::Sha256;
use fleetml_protocol::telemetry::DeviceId;
use fleetml_protocol::trust::TrustPolicy;

/// What the puller remembers between pulls (in memory: a restart retries everything).
#[derive(Debug, Default)]
pub struct PullState {
    /// Bundles whose activation failed since the last new generation.
    failed: HashSet<Sha256>,
    /// The last refusal reported, so a poll does not repeat it.
    last_refusal: Option<String>,
}

/// What one pull's answer means.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// The control plane has no assignment for this device yet.
    NoAssignment,
    /// It answered something else than an assignment.
    Failed(String),
    /// A newer generation: keep these bytes on disk, report it, then act on it.
    Newer(Assignment),
    /// The generation already held, re-signed: act on it (models may still be missing).
    Unchanged(Assignment),
    /// Refused, what runs is unchanged; `report` is false when this very refusal was
    /// reported at an earlier pull.
    Refused { reason: String, report: bool },
}

/// What to do about one assigned model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Its bundle is the active one.
    Active,
    /// Its bundle failed to activate: reported then; a new generation tries again.
    Failed,
    /// Its bundle is still in the store (a rollback): install it from there.
    InstallStored,
    /// Download it, then install it.
    Download,
}

impl PullState {
    /// Reads the control plane's answer (`status`, `body`, its `Date` header) against
    /// the assignment `held` on disk (its bytes, if any) at `now_ms`.
    #[allow(clippy::too_many_arguments)]
    pub fn answer(
        &mut self,
        status: u16,
        body: &[u8],
        date: Option<&str>,
        held: Option<&[u8]>,
        policy: &TrustPolicy,
        device: &DeviceId,
        now_ms: u64,
    ) -> Answer {
        if status == 404 {
            return Answer::NoAssignment;
        }
        if status != 200 {
            return Answer::Failed(format!(
                "assignment: the control plane answered {status}: {}",
                text(body)
            ));
        }
        let held = held
            .and_then(|b| SignedAssignment::from_cbor(b).ok())
            .and_then(|s| s.verify(policy).ok());
        let checked = SignedAssignment::from_cbor(body).and_then(|signed| {
            signed.check(
                policy,
                device,
                held.as_ref().map(|h| Held {
                    generation: h.generation,
                    models: &h.models,
                }),
                now_ms,
            )
        });
        match checked {
            Ok(Checked::Newer(a)) => {
                self.failed.clear();
                self.last_refusal = None;
                Answer::Newer(a)
            }
            Ok(Checked::Unchanged(a)) => Answer::Unchanged(a),
            Err(e) => {
                let mut reason = e.to_string();
                if let AssignmentError::Expired { now_ms, .. } = e {
                    reason.push_str(&clock_skew(now_ms, date));
                }
                let report = self.last_refusal.as_ref() != Some(&reason);
                self.last_refusal = Some(reason.clone());
                Answer::Refused { reason, report }
            }
        }
    }

    /// What to do about `model`, given the store's active bundle (its digest), whether
    /// its last activation failure was this bundle, and whether the store still has it.
    pub fn step(
        &self,
        model: &AssignedModel,
        active: Option<&str>,
        failed_before: bool,
        stored: bool,
    ) -> Step {
        if active == Some(model.digest.to_string().as_str()) {
            Step::Active
        } else if failed_before || self.failed.contains(&model.digest) {
            Step::Failed
        } else if stored {
            Step::InstallStored
        } else {
            Step::Download
        }
    }

    /// The bundle `digest` failed to download intact or to activate.
    pub fn failed(&mut self, digest: Sha256) {
        self.failed.insert(digest);
    }

    /// Whether bundle `digest` failed since the last new generation (a shadow version is
    /// not tried again until the assignment changes).
    pub fn has_failed(&self, digest: &Sha256) -> bool {
        self.failed.contains(digest)
    }
}

/// What the control plane's `Date` header says about this device's clock, for the
/// refusal of an expired assignment: a device clock running ahead expires every
/// assignment (Raspberry Pi class boards have no RTC). The header is not trusted for
/// the decision itself (without TLS it is as forgeable as a withheld assignment), only
/// to tell the operator where to look.
pub fn clock_skew(now_ms: u64, date: Option<&str>) -> String {
    let Some(server) = date
        .and_then(|v| httpdate::parse_http_date(v).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    else {
        return String::new();
    };
    let skew_s = (now_ms as i64 - server.as_millis() as i64) / 1000;
    if skew_s.abs() < 60 {
        return " (the device clock agrees with the control plane's within a minute)".into();
    }
    format!(
        " (the device clock is {} s {} the control plane's: check its time source)",
        skew_s.abs(),
        if skew_s > 0 { "ahead of" } else { "behind" }
    )
}

/// The start of a reply body, as text for an error.
pub fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)])
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use fleetml_protocol::assignment::FORMAT;
    use fleetml_protocol::crypto::{SigningKey, sha256};
    use fleetml_protocol::trust::TrustedKey;

    use super::*;

    const MIN: u64 = 60_000;

    struct Plane {
        key: SigningKey,
        policy: TrustPolicy,
        device: DeviceId,
    }

    impl Plane {
        fn new() -> Plane {
            let (key, _) = SigningKey::generate().expect("key");
            let policy = TrustPolicy {
                threshold: 1,
                keys: vec![],
                assignment_keys: vec![TrustedKey {
                    name: Some("control plane".into()),
                    public: key.public_key(),
                    id: None,
                }],
            };
            Plane {
                key,
                policy,
                device: DeviceId::new("pi-1").expect("id"),
            }
        }

        /// Generation `g` pinning claims to version `v`, issued at `at` for ten minutes.
        fn signed(&self, g: u64, v: u64, at: u64) -> Vec<u8> {
            Assignment {
                format: FORMAT,
                device: self.device.clone(),
                generation: g,
                issued_ms: at,
                expires_ms: at + 10 * MIN,
                models: BTreeMap::from([("claims".to_string(), model(v))]),
            }
            .sign(&self.key)
            .to_cbor()
        }
    }

    fn model(v: u64) -> AssignedModel {
        AssignedModel {
            shadow: None,
            version: v,
            digest: sha256(&v.to_be_bytes()),
            size: 10,
            rollout: None,
        }
    }

    /// Simulated time, one row per pull: (minute, generation answered, generation held,
    /// what the answer must be). Replays, expiry and repeated refusals.
    #[test]
    fn pulls_on_simulated_time_accept_newer_refuse_replays_and_report_each_refusal_once() {
        let p = Plane::new();
        let mut state = PullState::default();
        let at = |m: u64| m * MIN;
        let mut held: Option<Vec<u8>> = None;
        let answer = |state: &mut PullState, held: &Option<Vec<u8>>, body: &[u8], now| {
            state.answer(200, body, None, held.as_deref(), &p.policy, &p.device, now)
        };
        let g1 = p.signed(1, 1, at(0));
        assert!(
            matches!(answer(&mut state, &held, &g1, at(1)), Answer::Newer(a) if a.generation == 1)
        );
        held = Some(g1.clone());
        assert!(matches!(
            answer(&mut state, &held, &g1, at(2)),
            Answer::Unchanged(_)
        ));
        let g2 = p.signed(2, 2, at(3));
        assert!(
            matches!(answer(&mut state, &held, &g2, at(4)), Answer::Newer(a) if a.generation == 2)
        );
        held = Some(g2.clone());
        // A replay of generation 1 is refused, reported once, then not again.
        let first = answer(&mut state, &held, &g1, at(5));
        assert!(
            matches!(&first, Answer::Refused { report: true, .. }),
            "{first:?}"
        );
        let again = answer(&mut state, &held, &g1, at(6));
        assert!(
            matches!(&again, Answer::Refused { report: false, .. }),
            "{again:?}"
        );
        // Generation 2 expires at minute 13: refused then, with the clock compared.
        let expired = state.answer(
            200,
            &g2,
            Some("Thu, 03 Dec 2026 00:00:00 GMT"),
            held.as_deref(),
            &p.policy,
            &p.device,
            at(14),
        );
        let Answer::Refused { reason, report } = expired else {
            panic!("{expired:?}")
        };
        assert!(report && reason.contains("the device clock is"), "{reason}");
        // Another device's assignment, and bytes that are no assignment.
        let other = Plane::new();
        assert!(matches!(
            answer(&mut state, &held, &other.signed(3, 3, at(14)), at(15)),
            Answer::Refused { report: true, .. }
        ));
        assert!(matches!(
            answer(&mut state, &held, b"garbage", at(15)),
            Answer::Refused { .. }
        ));
        assert_eq!(
            state.answer(404, b"", None, None, &p.policy, &p.device, 0),
            Answer::NoAssignment
        );
        assert!(matches!(
            state.answer(503, b"busy", None, None, &p.policy, &p.device, 0),
            Answer::Failed(e) if e.contains("503") && e.contains("busy")
        ));
    }

    #[test]
    fn a_failed_bundle_waits_for_a_new_generation() {
        let p = Plane::new();
        let mut state = PullState::default();
        let v2 = model(2);
        let active_v1 = model(1).digest.to_string();
        assert_eq!(
            state.step(&v2, Some(&active_v1), false, false),
            Step::Download
        );
        assert_eq!(
            state.step(&v2, Some(&active_v1), false, true),
            Step::InstallStored
        );
        assert_eq!(
            state.step(&v2, Some(&v2.digest.to_string()), false, false),
            Step::Active
        );
        assert_eq!(
            state.step(&v2, None, true, false),
            Step::Failed,
            "the store says so"
        );
        state.failed(v2.digest);
        assert_eq!(
            state.step(&v2, Some(&active_v1), false, false),
            Step::Failed
        );
        // The same generation again changes nothing; a new one tries again.
        let g1 = p.signed(1, 2, 0);
        state.answer(200, &g1, None, None, &p.policy, &p.device, MIN);
        assert_eq!(
            state.step(&v2, Some(&active_v1), false, false),
            Step::Download
        );
    }
}
