//! The running control plane's shared state ([`Plane`]: the stores, the registry, the
//! trust policy, the assignment key, the command session) and the small helpers every
//! room uses with it. `server` builds it; the API handlers and the background tasks
//! take it. It knows no HTTP and no broker task.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fleetml_protocol::trust::TrustPolicy;
use rumqttc::AsyncClient;

use crate::ingest::Ingest;
use crate::store::{AssignmentStore, RolloutStore};

/// Shared state of the running control plane.
pub struct Plane {
    /// Whether this replica runs the rollout and policy engines now.
    pub leader: Arc<crate::leader::Leadership>,
    pub ingest: Ingest<Arc<dyn crate::store::FleetStore>>,
    pub registry: crate::registry::Registry,
    pub assignments: Arc<dyn AssignmentStore>,
    pub captures: crate::captures::Captures,
    pub datasets: crate::datasets::Datasets,
    pub jobs: crate::jobs::Jobs,
    /// The commands training jobs may run, registered by an admin.
    pub trainers: crate::jobs::trainers::Trainers,
    pub policies: Arc<dyn crate::store::PolicyStore>,
    pub(crate) running: crate::jobs::Running,
    pub(crate) signing_key: Option<PathBuf>,
    pub rollouts: Arc<dyn RolloutStore>,
    pub tokens: crate::auth::Tokens,
    pub audit: crate::auth::Audit,
    pub(crate) assignment_key: fleetml_protocol::crypto::SigningKey,
    pub(crate) assignment_ttl_ms: u64,
    /// How long a running wave's device may stay silent after its assignment before the
    /// engine tells it again (0: never; `Rollout::remind`).
    pub(crate) rollout_remind_ms: u64,
    /// One rollout change at a time (the engine and the API both make them).
    pub(crate) rollout_lock: std::sync::Mutex<()>,
    /// The trust policy bundles are verified with and devices are given; an admin may
    /// replace it (`PUT /v1/trust`), kept in `DATA_DIR/trust.toml`.
    pub(crate) trust: std::sync::RwLock<Option<TrustPolicy>>,
    pub(crate) data_dir: PathBuf,
    pub(crate) public_url: String,
    pub(crate) public_mqtt_url: String,
    /// The CA enrolled devices trust for the API and the broker.
    pub(crate) device_ca: crate::tls::DeviceCa,
    /// The ingest's user name on the broker, and its password when an external broker's
    /// `--mqtt-url` gave one.
    pub(crate) broker_login: (String, Option<String>),
    /// When the replicas pull from a NATS ingest queue (`--ingest-queue`): the user and
    /// password it logs in with, `None` when it connects anonymously.
    pub(crate) queue_login: Option<Option<(String, String)>>,
    /// The session commands to devices are published on; the ingest has its own.
    pub(crate) client: AsyncClient,
    pub(crate) metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Rate limits on mutating calls.
    pub(crate) rate: CallLimits,
    /// The notifier's rules and receivers (`--alerts`).
    pub alerts: crate::alerts::config::Config,
    /// The notifier's alerts and the operators' silences.
    pub alert_store: Arc<dyn crate::store::AlertStore>,
    /// The fleet-level series `/metrics` adds to the process's own.
    pub fleet_metrics: crate::fleet_metrics::FleetMetrics,
    /// The fleet read whole for the notifier and the fleet metrics, one at a time.
    pub snapshots: crate::snapshot::Shared,
}

/// Mutating API calls admitted per second (0: no limit), each limit bursting to ten
/// times its rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimits {
    /// Per operator token or device.
    pub per_token: u32,
    /// Per client IP address, checked before the token (so guessing tokens is limited
    /// too). Behind a proxy every call comes from its address: raise or turn it off
    /// there and let the proxy limit.
    pub per_address: u32,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_token: 20,
            per_address: 50,
        }
    }
}

/// The rate limits of mutating API calls, per principal and per client address.
#[derive(Debug)]
pub(crate) struct CallLimits {
    pub(crate) per_principal: fleetml_net::rate::RateLimiter<String>,
    pub(crate) per_address: fleetml_net::rate::RateLimiter<std::net::IpAddr>,
    pub(crate) rates: RateLimits,
}

/// Keys each limit remembers at most (beyond, rotating keys share one bucket).
const RATE_KEYS: usize = 65_536;

impl CallLimits {
    pub(crate) fn new(rates: RateLimits) -> CallLimits {
        let burst = |r: u32| r.saturating_mul(10);
        CallLimits {
            per_principal: fleetml_net::rate::RateLimiter::new(
                rates.per_token,
                burst(rates.per_token),
                RATE_KEYS,
            ),
            per_address: fleetml_net::rate::RateLimiter::new(
                rates.per_address,
                burst(rates.per_address),
                RATE_KEYS,
            ),
            rates,
        }
    }
}

impl Plane {
    /// The trust policy now.
    pub fn policy(&self) -> Option<TrustPolicy> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The trust policy devices are given: the bundle keys, and this control plane's
    /// assignment key.
    pub fn device_policy(&self) -> Option<TrustPolicy> {
        let mut policy = self.policy()?;
        policy.assignment_keys = vec![fleetml_protocol::trust::TrustedKey {
            name: Some("control-plane assignments".into()),
            public: self.assignment_key.public_key(),
            id: None,
        }];
        Some(policy)
    }
}

/// Writes `policy` to `path` atomically (mode 0644: it holds public keys only).
pub(crate) fn keep_policy(path: &Path, policy: &TrustPolicy) -> anyhow::Result<()> {
    let text = policy.to_toml();
    crate::output::write_atomic(path, crate::output::PUBLIC_FILE, |f| {
        use std::io::Write;
        f.write_all(text.as_bytes())?;
        Ok(())
    })
}

impl std::fmt::Debug for Plane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token stays out of logs.
        f.debug_struct("Plane")
            .field("public_url", &self.public_url)
            .field("public_mqtt_url", &self.public_mqtt_url)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch.
/// How long a session to the broker or the ingest queue waits before its next try
/// after `failures` failed ones: 0.5 s, 1 s, 2 s, … 5 s.
pub fn reconnect_wait(failures: u32) -> std::time::Duration {
    std::time::Duration::from_millis((250u64 << failures.min(5)).min(5_000))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn random_bytes(n: usize) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(b)
}

/// Equal in time independent of where they differ.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Raises this process's open-file limit towards `want` (children inherit it): the soft
/// limit up to the hard one, and the hard one too where the process may (root). Returns
/// the soft limit now in force.
///
/// `libc` is a direct dependency for this call (std has none; `memory` uses it too); the unsafe
/// blocks only pass a struct owned here to the two system calls.
#[allow(unsafe_code)]
pub(crate) fn raise_open_file_limit(want: u64) -> anyhow::Result<u64> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into `now`, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        anyhow::bail!(
            "reading the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if now.rlim_cur >= want {
        return Ok(now.rlim_cur);
    }
    for wanted in [
        libc::rlimit {
            rlim_cur: want,
            rlim_max: now.rlim_max.max(want),
        },
        libc::rlimit {
            rlim_cur: now.rlim_max.min(want),
            rlim_max: now.rlim_max,
        },
    ] {
        // SAFETY: setrlimit reads one `rlimit` from `wanted`, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0 {
            return Ok(wanted.rlim_cur);
        }
    }
    Ok(now.rlim_cur)
}
