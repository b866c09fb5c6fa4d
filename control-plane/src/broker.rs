//! The embedded broker's guard: every device connection passes through
//! [`fleetml_net::relay`] with a [`DeviceAcl`], which lets through only what
//! [`fleetml_protocol::broker_acl`] allows a device (its own topics, its own retained
//! status, no anonymous login). rumqttd itself listens on loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::broker_acl::{Acl, frame_len};
use fleetml_protocol::telemetry::DeviceId;

/// A fingerprint of a device's live secret: `None` when it is revoked or not enrolled;
/// another value once its secret was rotated.
pub type Credential = Arc<dyn Fn(&DeviceId) -> Option<[u8; 32]> + Send + Sync>;

/// The [`Credential`] of devices in `store`.
pub fn credential(store: Arc<dyn crate::store::FleetStore>) -> Credential {
    Arc::new(move |id: &DeviceId| {
        let d = store.device(id).ok().flatten()?;
        let digest = ring::digest::digest(&ring::digest::SHA256, d.live_secret()?);
        digest.as_ref().try_into().ok()
    })
}

/// One device connection's judge.
pub struct DeviceAcl {
    acl: Acl,
    /// The ingest's count of refused logins (a refused CONNECT is one).
    logins_refused: Arc<AtomicU64>,
    /// Checked at login, then on a packet at most every `recheck` (not on every message:
    /// the store is read for it): a device revoked or rotated while connected is cut at
    /// its next packet after that (within its keep-alive: at most 120 s, the agent's 30 s).
    credential: Credential,
    /// The credential it logged in with, and when it was last checked.
    bound: Option<([u8; 32], std::time::Instant)>,
    recheck: std::time::Duration,
}

/// How often a connection's credential is checked again.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for DeviceAcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAcl")
            .field("acl", &self.acl)
            .finish_non_exhaustive()
    }
}

impl DeviceAcl {
    pub fn new(logins_refused: Arc<AtomicU64>, credential: Credential) -> DeviceAcl {
        DeviceAcl {
            acl: Acl::new(),
            logins_refused,
            credential,
            bound: None,
            recheck: RECHECK,
        }
    }
}

impl fleetml_net::Inspect for DeviceAcl {
    fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        frame_len(buf, self.acl.max_packet()).map_err(|e| self.refused(e.to_string()))
    }

    fn check(&mut self, packet: &[u8]) -> Result<(), String> {
        self.acl
            .check(packet)
            .map_err(|e| self.refused(e.to_string()))?;
        let Some(device) = self.acl.device() else {
            return Ok(());
        };
        if let Some((_, at)) = self.bound
            && at.elapsed() < self.recheck
        {
            return Ok(());
        }
        let now = (self.credential)(device);
        match (now, self.bound) {
            (None, _) => Err(self.refused("it is revoked".into())),
            (Some(now), Some((bound, _))) if now != bound => {
                Err(self.refused("its secret was rotated".into()))
            }
            (Some(now), _) => {
                self.bound = Some((now, std::time::Instant::now()));
                Ok(())
            }
        }
    }
}

impl DeviceAcl {
    /// Names the device in the reason, and counts a refusal before login as a refused
    /// login.
    fn refused(&self, why: String) -> String {
        match self.acl.device() {
            Some(d) => format!("device {d}: {why}"),
            None => {
                self.logins_refused.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_control_broker_logins_refused_total").increment(1);
                format!("login refused: {why}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetml_net::Inspect;
    use std::sync::Mutex;

    fn connect(device: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x80 | 0x02, 0, 30];
        for s in [device, device] {
            body.extend_from_slice(&(s.len() as u16).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        let mut p = vec![0x10, body.len() as u8];
        p.extend_from_slice(&body);
        p
    }

    /// A connection is bound to the secret it logged in with: revoked or rotated, its
    /// next packet ends it.
    #[test]
    fn a_connection_ends_at_its_next_packet_once_its_secret_is_revoked_or_rotated() {
        let secret = Arc::new(Mutex::new(Some([1u8; 32])));
        let s = secret.clone();
        let credential: Credential =
            Arc::new(move |_: &DeviceId| *s.lock().unwrap_or_else(|p| p.into_inner()));
        let ping = [0xc0u8, 0];
        let mut acl = DeviceAcl::new(Arc::new(AtomicU64::new(0)), credential.clone());
        acl.recheck = std::time::Duration::ZERO;
        acl.check(&connect("pi-1")).expect("login");
        acl.check(&ping).expect("alive");
        *secret.lock().expect("lock") = Some([2u8; 32]);
        let e = acl.check(&ping).expect_err("rotated");
        assert!(e.contains("rotated"), "{e}");
        let mut again = DeviceAcl::new(Arc::new(AtomicU64::new(0)), credential);
        again.recheck = std::time::Duration::ZERO;
        again
            .check(&connect("pi-1"))
            .expect("login with the new secret");
        *secret.lock().expect("lock") = None;
        let e = again.check(&ping).expect_err("revoked");
        assert!(e.contains("revoked"), "{e}");
        // A login larger than a CONNECT may be is refused from its head.
        let big = [0x10u8, 0xff, 0xff, 0x01];
        assert!(
            DeviceAcl::new(Arc::new(AtomicU64::new(0)), Arc::new(|_: &DeviceId| None))
                .frame(&big)
                .is_err()
        );
    }
}
