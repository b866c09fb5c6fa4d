//! The embedded broker's guard: every device connection passes through
//! [`fleetml_net::relay`] with a [`DeviceAcl`], which lets through only what
//! [`fleetml_protocol::broker_acl`] allows a device (its own topics, its own retained
//! status, no anonymous login). rumqttd itself listens on loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::broker_acl::{Acl, MAX_PACKET, frame_len};
use fleetml_protocol::telemetry::DeviceId;

/// Whether a device is revoked (or no longer enrolled).
pub type Revoked = Arc<dyn Fn(&DeviceId) -> bool + Send + Sync>;

/// One device connection's judge.
pub struct DeviceAcl {
    acl: Acl,
    /// The ingest's count of refused logins (a refused CONNECT is one).
    logins_refused: Arc<AtomicU64>,
    /// Checked on every packet: a device revoked while connected is cut at its next
    /// packet (at most its keep-alive, 30 s).
    revoked: Revoked,
}

impl std::fmt::Debug for DeviceAcl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAcl")
            .field("acl", &self.acl)
            .finish_non_exhaustive()
    }
}

impl DeviceAcl {
    pub fn new(logins_refused: Arc<AtomicU64>, revoked: Revoked) -> DeviceAcl {
        DeviceAcl {
            acl: Acl::new(),
            logins_refused,
            revoked,
        }
    }
}

impl fleetml_net::Inspect for DeviceAcl {
    fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        frame_len(buf, MAX_PACKET).map_err(|e| self.refused(e.to_string()))
    }

    fn check(&mut self, packet: &[u8]) -> Result<(), String> {
        self.acl
            .check(packet)
            .map_err(|e| self.refused(e.to_string()))?;
        match self.acl.device() {
            Some(d) if (self.revoked)(d) => Err(self.refused("it is revoked".into())),
            _ => Ok(()),
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
