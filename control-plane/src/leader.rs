//! Which replica runs the loops that must run once: the rollout engine and the drift
//! policy engine. Everything else (the API, the ingest, receipts for what a replica
//! stored) runs on every replica.
//!
//! With the embedded store (sled, one process holds its file lock) the only process
//! leads. With PostgreSQL the replicas elect through a session-level advisory lock held
//! on a connection of its own: whoever holds it leads; PostgreSQL releases it when that
//! session ends (the process died, its host or link went away), and the other replicas
//! try to take it every [`POLL`]. A leader that loses its connection stops leading at its
//! next check — before it could reconnect — so two replicas lead at once only for the
//! moments between the server ending a session and its old holder noticing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a replica checks its lock (leading) or tries to take it (following).
pub const POLL: Duration = Duration::from_secs(1);
/// The advisory lock key of leadership (any constant shared by every replica).
const LEADER_LOCK: i64 = 0x666c_6565_746d_6c03;

/// Whether this replica leads now, and its name.
#[derive(Debug)]
pub struct Leadership {
    leads: AtomicBool,
    /// `--replica-id`, or the host's name.
    pub replica: String,
}

impl Leadership {
    /// The only process: it always leads.
    pub fn sole(replica: String) -> Arc<Leadership> {
        Arc::new(Leadership {
            leads: AtomicBool::new(true),
            replica,
        })
    }

    pub fn leads(&self) -> bool {
        self.leads.load(Ordering::Relaxed)
    }

    fn set(&self, leads: bool) {
        if self.leads.swap(leads, Ordering::Relaxed) != leads {
            metrics::gauge!("fleetml_control_leader").set(if leads { 1.0 } else { 0.0 });
            if leads {
                tracing::info!(replica = %self.replica, "this replica leads: it runs the rollout and policy engines");
            } else {
                tracing::warn!(replica = %self.replica, "this replica no longer leads");
            }
        }
    }

    /// Elects among the replicas on the PostgreSQL database at `url` (a thread of its
    /// own, with its own connection: the lock lives as long as that session).
    pub fn elect(url: &str, replica: String) -> anyhow::Result<Arc<Leadership>> {
        let mut config: postgres::Config = url.parse()?;
        // A dead link ends the session on both sides within about 20 s.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            .connect_timeout(Duration::from_secs(5));
        let tls = crate::pg::tls_for(&config, None)?;
        let me = Arc::new(Leadership {
            leads: AtomicBool::new(false),
            replica,
        });
        metrics::gauge!("fleetml_control_leader").set(0.0);
        let held = me.clone();
        std::thread::Builder::new()
            .name("leader-election".into())
            .spawn(move || {
                let mut session: Option<postgres::Client> = None;
                loop {
                    let outcome = match session.as_mut() {
                        None => {
                            let connected = match &tls {
                                Some(tls) => config.connect(tls.clone()),
                                None => config.connect(postgres::NoTls),
                            };
                            match connected {
                                Ok(c) => {
                                    session = Some(c);
                                    continue;
                                }
                                Err(e) => Err(e),
                            }
                        }
                        Some(c) if held.leads() => c.simple_query("SELECT 1").map(|_| true),
                        Some(c) => c
                            .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                            .map(|row| row.get::<_, bool>(0)),
                    };
                    match outcome {
                        Ok(leads) => held.set(leads),
                        Err(e) => {
                            // The session (and the lock with it) is gone or going.
                            tracing::warn!(error = %e, "leader election: lost the database session");
                            held.set(false);
                            session = None;
                        }
                    }
                    std::thread::sleep(POLL);
                }
            })?;
        Ok(me)
    }
}
