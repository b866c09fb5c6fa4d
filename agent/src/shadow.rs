//! Shadow deployments on the device: a candidate version runs beside the served one on a
//! sampled share of the requests, after each has been answered from the served version,
//! and only its outputs' agreement with the answer, its latency and its own drift are
//! reported (with the served model's window: `monitoring::Comparison`).
//!
//! Serving always wins. A sampled request is run in shadow only when every check passes,
//! otherwise it is shed (counted): not while all prediction workers are busy, not while
//! another shadow run is going (one at a time), and not once shadow runs used their
//! share of one core in the current second (`shadow_cpu_percent` in agent.toml, 50 by
//! default). The run happens on the blocking pool after the answer was built, so the
//! answer is neither delayed nor changed; a panic in the shadow's backend is caught and
//! counted as a failed run.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetml_protocol::features::RawValue;
use fleetml_protocol::golden::Tensor;

use crate::backend::Backend;
use crate::monitoring::Comparison;
use crate::runtime::RuntimeError;

/// A shadow version being run beside a served model.
#[derive(Debug)]
pub struct Shadow {
    pub version: u64,
    pub backend: Arc<dyn Backend>,
    pub comparison: Arc<Comparison>,
    pub sample_permille: u16,
    /// Requests offered so far times the sample, in thousandths: a request is run each
    /// time this crosses a whole thousand.
    tally: AtomicU64,
    /// Whether a shadow run is going.
    running: Arc<AtomicBool>,
    /// CPU time the shadow used in the current second, and when that second began.
    spent: Arc<Mutex<(Instant, Duration)>>,
    /// What it may use per second.
    budget: Duration,
}

/// Leave to run one request in shadow; the next may start once it is dropped.
#[derive(Debug)]
pub struct Admitted(Arc<AtomicBool>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Shadow {
    /// `cpu_percent`: the share of one core shadow runs may use (1 to 100).
    pub fn new(
        version: u64,
        backend: Arc<dyn Backend>,
        comparison: Arc<Comparison>,
        sample_permille: u16,
        cpu_percent: u8,
    ) -> Shadow {
        Shadow {
            version,
            backend,
            comparison,
            sample_permille: sample_permille.clamp(1, 1000),
            tally: AtomicU64::new(0),
            running: Arc::new(AtomicBool::new(false)),
            spent: Arc::new(Mutex::new((Instant::now(), Duration::ZERO))),
            budget: Duration::from_millis(10 * u64::from(cpu_percent.clamp(1, 100))),
        }
    }

    /// Whether the request just answered is run in shadow: `None` when it is not in the
    /// sample, or (counted as shed) when serving is `busy`, a shadow run is going, or
    /// this second's budget is spent.
    pub fn admit(&self, busy: bool) -> Option<Admitted> {
        let p = u64::from(self.sample_permille);
        let before = self.tally.fetch_add(p, Ordering::Relaxed);
        if (before + p) / 1000 == before / 1000 {
            return None;
        }
        let over_budget = {
            let mut spent = self.spent.lock().unwrap_or_else(|e| e.into_inner());
            if spent.0.elapsed() >= Duration::from_secs(1) {
                *spent = (Instant::now(), Duration::ZERO);
            }
            spent.1 >= self.budget
        };
        if busy
            || over_budget
            || self
                .running
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            self.comparison.shed();
            metrics::counter!("fleetml_agent_shadow_shed_total").increment(1);
            return None;
        }
        Some(Admitted(self.running.clone()))
    }

    /// Runs `inputs` on the shadow on the blocking pool and compares its first output
    /// with `answered` (the served version's first output, per row); `rows` are the raw
    /// feature rows for the shadow's own monitor.
    pub fn run(
        self: &Arc<Self>,
        admitted: Admitted,
        inputs: Vec<Tensor>,
        answered: Vec<Vec<f32>>,
        rows: Vec<Vec<RawValue>>,
    ) {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let _admitted = admitted;
            let began = Instant::now();
            // The latency is the run's: serving optimized its plan for this input shape
            // long ago, and the shadow's first run of a shape would otherwise weigh a
            // one-off optimization against warm runs. The CPU budget counts both.
            let outcome =
                std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<_, RuntimeError> {
                    me.backend.prepare(&inputs)?;
                    let started = Instant::now();
                    let outputs = me.backend.run(&inputs)?;
                    Ok((outputs, started.elapsed()))
                }));
            {
                let mut spent = me.spent.lock().unwrap_or_else(|e| e.into_inner());
                spent.1 += began.elapsed();
            }
            metrics::counter!("fleetml_agent_shadow_runs_total").increment(1);
            match outcome {
                Ok(Ok((outputs, took))) => {
                    let latency_us = took.as_micros().min(u128::from(u64::MAX)) as u64;
                    let n = answered.len().max(1);
                    let first: Vec<Vec<f32>> = outputs
                        .first()
                        .map(|t| {
                            let per_row = t.data.len() / n;
                            t.data
                                .to_f32()
                                .chunks(per_row.max(1))
                                .map(<[f32]>::to_vec)
                                .collect()
                        })
                        .unwrap_or_default();
                    me.comparison.ran(&answered, &first, latency_us);
                    if let Some(m) = me.comparison.monitor() {
                        m.predicted(crate::clock::now_ms(), &rows, &first, latency_us, None, &[]);
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(version = me.version, error = %e, "a shadow run failed");
                    me.comparison.failed();
                }
                Err(_) => {
                    tracing::warn!(
                        version = me.version,
                        "the shadow's backend panicked on a request"
                    );
                    me.comparison.failed();
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Echo;
    impl Backend for Echo {
        fn kind(&self) -> fleetml_protocol::board::Backend {
            fleetml_protocol::board::Backend::Cpu
        }
        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
            Ok(inputs.to_vec())
        }
    }

    fn shadow(sample: u16, percent: u8) -> Shadow {
        Shadow::new(
            2,
            Arc::new(Echo),
            Arc::new(Comparison::new(2, None)),
            sample,
            percent,
        )
    }

    #[test]
    fn a_sample_runs_that_share_of_requests() {
        let s = shadow(250, 100);
        let mut admitted = 0;
        for _ in 0..1000 {
            if let Some(a) = s.admit(false) {
                admitted += 1;
                drop(a);
            }
        }
        assert_eq!(admitted, 250);
    }

    /// The latency a shadow run reports is its run's, not the one-off work for a new
    /// input shape before it (tract optimizes a plan on a shape's first run, which the
    /// served version did long ago); the CPU budget counts both.
    #[tokio::test]
    async fn a_runs_latency_leaves_out_preparing_its_input_shape() {
        #[derive(Debug)]
        struct Cold;
        impl Backend for Cold {
            fn kind(&self) -> fleetml_protocol::board::Backend {
                fleetml_protocol::board::Backend::Cpu
            }
            fn prepare(&self, _: &[Tensor]) -> Result<(), RuntimeError> {
                std::thread::sleep(Duration::from_millis(200));
                Ok(())
            }
            fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
                Ok(inputs.to_vec())
            }
        }
        let s = Arc::new(Shadow::new(
            2,
            Arc::new(Cold),
            Arc::new(Comparison::new(2, None)),
            1000,
            100,
        ));
        let admitted = s.admit(false).expect("admitted");
        let x = Tensor::f32("x", vec![1, 1], vec![1.0]);
        s.run(admitted, vec![x], vec![vec![1.0]], vec![Vec::new()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.running.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "the shadow run never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = s.comparison.take(0);
        assert_eq!((report.runs, report.failed), (1, 0));
        let p95 = report.latency_us.p95.expect("a latency");
        assert!(p95 < 100_000, "{p95} µs: the preparation was counted");
        let spent = s.spent.lock().expect("lock").1;
        assert!(spent >= Duration::from_millis(200), "{spent:?}");
    }

    #[test]
    fn busy_serving_a_running_shadow_and_a_spent_budget_shed() {
        let s = shadow(1000, 10);
        assert!(s.admit(true).is_none(), "serving busy");
        let first = s.admit(false).expect("admitted");
        assert!(s.admit(false).is_none(), "one shadow run at a time");
        drop(first);
        assert!(s.admit(false).is_some());
        s.spent.lock().expect("lock").1 = Duration::from_millis(100);
        assert!(s.admit(false).is_none(), "10 % of a core used this second");
        let report = format!("{:?}", s.comparison);
        assert!(report.contains("shed: 3"), "{report}");
    }
}
