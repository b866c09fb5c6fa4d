//! The embedded broker's guard: every device connection passes through
//! [`fleetml_net::relay`] with a [`DeviceAcl`], which lets through only what
//! [`fleetml_protocol::broker_acl`] allows a device (its own topics, its own retained
//! status, no anonymous login). rumqttd itself listens on loopback only.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use fleetml_protocol::broker_acl::{Acl, MAX_PACKET, frame_len};

/// One device connection's judge.
#[derive(Debug)]
pub struct DeviceAcl {
    acl: Acl,
    /// The ingest's count of refused logins (a refused CONNECT is one).
    logins_refused: Arc<AtomicU64>,
}

impl DeviceAcl {
    pub fn new(logins_refused: Arc<AtomicU64>) -> DeviceAcl {
        DeviceAcl {
            acl: Acl::new(),
            logins_refused,
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
            .map_err(|e| self.refused(e.to_string()))
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
