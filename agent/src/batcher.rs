//! Dynamic batching, as Triton's dynamic batcher does it: requests for one model that
//! arrive close together run as one batch, up to `max_batch` rows, waiting at most
//! `max_queue_delay` for the batch to fill after its first request arrived.
//!
//! Each batched model has one batching thread. A request hands its inputs over and
//! awaits its own rows of the outputs. Requests whose inputs differ beyond the leading
//! (batch) dimension — two image sizes, say — never share a batch: the later one starts
//! the next. A backend error or panic fails every request of that batch, and only them.
//! Batch sizes go to the `fleetml_agent_batch_rows` histogram and the batches to
//! `fleetml_agent_batches_total`, per model, and to the model's monitoring windows
//! (`batch_rows`).
//!
//! A model is batched when agent.toml has a `[[batching]]` entry for it or, failing
//! that, when its bundle's serving section sets `max_batch` (`fleetctl bundle build
//! --max-batch N --max-queue-delay-us US`).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use fleetml_protocol::golden::Tensor;
use fleetml_protocol::manifest::{Dim, TensorSpec};
use tokio::sync::oneshot;

use crate::backend::Backend;

/// How a model's requests are batched (`[[batching]]` in agent.toml).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// The model's name.
    pub model: String,
    /// Most rows in one batch.
    pub max_batch: usize,
    /// Longest the first request of a batch waits for others, microseconds.
    #[serde(default = "default_delay_us")]
    pub max_queue_delay_us: u64,
}

fn default_delay_us() -> u64 {
    1000
}

impl BatchingConfig {
    /// The batching of `model`: agent.toml's entry, else the bundle's serving section.
    pub fn choose(
        model: &str,
        configured: &[BatchingConfig],
        serving: &fleetml_protocol::manifest::ServingPolicy,
    ) -> Option<BatchingConfig> {
        configured
            .iter()
            .find(|b| b.model == model)
            .cloned()
            .or_else(|| {
                serving.max_batch.map(|max_batch| BatchingConfig {
                    model: model.to_string(),
                    max_batch: max_batch as usize,
                    max_queue_delay_us: serving.max_queue_delay_us.unwrap_or_else(default_delay_us),
                })
            })
    }
}

/// What a batched request gets back: its outputs, or why the batch failed.
pub type Outcome = Result<Vec<Tensor>, String>;

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    reply: oneshot::Sender<Outcome>,
}

/// The batching queue of one model.
#[derive(Debug)]
pub struct Batcher {
    tx: SyncSender<JobBox>,
}

/// A queued job (boxed so the channel stays small).
struct JobBox(Box<Job>);

impl std::fmt::Debug for JobBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} rows)", self.0.rows)
    }
}

impl Batcher {
    /// Starts the batching thread of `model` on `backend`, or says why the model cannot
    /// be batched (an input without a symbolic leading dimension).
    pub fn start(
        model: &str,
        inputs: &[TensorSpec],
        backend: Arc<dyn Backend>,
        config: &BatchingConfig,
        queue: usize,
        on_batch: Box<dyn Fn(usize) + Send>,
    ) -> Result<Batcher, String> {
        if config.max_batch < 2 {
            return Err(format!(
                "model `{model}`: max_batch {} does not batch anything (2 or more)",
                config.max_batch
            ));
        }
        if let Some(fixed) = inputs
            .iter()
            .find(|s| !matches!(s.shape.first(), Some(Dim::Symbol(_))))
        {
            return Err(format!(
                "model `{model}` cannot be batched: input `{}` has no symbolic leading (batch) dimension",
                fixed.name
            ));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(queue.max(1));
        let max_batch = config.max_batch;
        let delay = Duration::from_micros(config.max_queue_delay_us);
        let name = model.to_string();
        std::thread::Builder::new()
            .name(format!("batch-{model}"))
            .spawn(move || run(&name, backend.as_ref(), &rx, max_batch, delay, &*on_batch))
            .map_err(|e| format!("starting the batching thread of `{model}`: {e}"))?;
        Ok(Batcher { tx })
    }

    /// Queues `inputs` (`rows` rows) and waits for this request's outputs. A full queue
    /// is refused at once.
    pub async fn submit(&self, inputs: Vec<Tensor>, rows: usize) -> Result<Outcome, Full> {
        let (reply, answer) = oneshot::channel();
        let job = JobBox(Box::new(Job {
            inputs,
            rows,
            reply,
        }));
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => return Err(Full),
        }
        Ok(answer
            .await
            .unwrap_or_else(|_| Err("the batching thread stopped".into())))
    }
}

/// The batching queue is full (or stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Whether two requests' inputs can share a batch: same names, types and shapes but for
/// the leading dimension.
fn compatible(a: &[Tensor], b: &[Tensor]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.name == y.name
                && x.dtype() == y.dtype()
                && x.shape.len() == y.shape.len()
                && x.shape.get(1..) == y.shape.get(1..)
        })
}

fn run(
    model: &str,
    backend: &dyn Backend,
    rx: &Receiver<JobBox>,
    max_batch: usize,
    delay: Duration,
    on_batch: &dyn Fn(usize),
) {
    let mut carried: Option<Box<Job>> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(JobBox(job)) => job,
                Err(_) => return,
            },
        };
        let deadline = Instant::now() + delay;
        let mut rows = first.rows;
        let mut jobs = vec![*first];
        while rows < max_batch {
            let wait = deadline.saturating_duration_since(Instant::now());
            let next = if wait.is_zero() {
                rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
            } else {
                rx.recv_timeout(wait)
            };
            match next {
                Ok(JobBox(job)) => {
                    if rows + job.rows > max_batch || !compatible(&jobs[0].inputs, &job.inputs) {
                        carried = Some(job);
                        break;
                    }
                    rows += job.rows;
                    jobs.push(*job);
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    if jobs.is_empty() {
                        return;
                    }
                    break;
                }
            }
        }
        metrics::histogram!("fleetml_agent_batch_rows", "model" => model.to_string())
            .record(rows as f64);
        metrics::counter!("fleetml_agent_batches_total", "model" => model.to_string()).increment(1);
        on_batch(rows);
        run_batch(backend, jobs, rows);
    }
}

/// Runs `jobs` as one batch of `rows` rows and answers each with its own rows.
fn run_batch(backend: &dyn Backend, jobs: Vec<Job>, rows: usize) {
    if jobs.len() == 1 {
        let job = jobs.into_iter().next().expect("one job");
        let out = guarded(backend, &job.inputs);
        let _ = job.reply.send(out);
        return;
    }
    let mut merged: Vec<Tensor> = jobs[0].inputs.clone();
    for job in &jobs[1..] {
        for (acc, t) in merged.iter_mut().zip(&job.inputs) {
            acc.data.extend(&t.data);
            if let Some(first) = acc.shape.first_mut() {
                *first += t.shape.first().copied().unwrap_or(1);
            }
        }
    }
    let outputs = match guarded(backend, &merged) {
        Ok(o) => o,
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    // Every output must have the batch as its leading dimension to be split back.
    if let Some(bad) = outputs
        .iter()
        .find(|t| t.shape.first().copied() != Some(rows as u64))
    {
        let e = format!(
            "output `{}` has shape {:?}, not {rows} rows: the model cannot be batched",
            bad.name, bad.shape
        );
        for job in jobs {
            let _ = job.reply.send(Err(e.clone()));
        }
        return;
    }
    let mut start = 0u64;
    for job in jobs {
        let end = start + job.rows as u64;
        let mine = outputs.iter().map(|t| t.rows(start, end)).collect();
        let _ = job.reply.send(Ok(mine));
        start = end;
    }
}

fn guarded(backend: &dyn Backend, inputs: &[Tensor]) -> Outcome {
    match std::panic::catch_unwind(AssertUnwindSafe(|| backend.run(inputs))) {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the backend panicked on this batch; the prediction was not made".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::RuntimeError;
    use fleetml_protocol::board::Backend as Kind;
    use fleetml_protocol::manifest::DType;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Doubles its input and counts the batches it ran.
    #[derive(Debug, Default)]
    struct Double {
        calls: AtomicUsize,
    }

    impl Backend for Double {
        fn kind(&self) -> Kind {
            Kind::Cpu
        }

        fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RuntimeError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let x = &inputs[0];
            let data = x.data.to_f32().iter().map(|v| v * 2.0).collect();
            Ok(vec![Tensor::f32("y", x.shape.clone(), data)])
        }
    }

    fn spec() -> Vec<TensorSpec> {
        vec![TensorSpec {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Symbol("N".into()), Dim::Fixed(2)],
        }]
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_a_batch_and_get_their_own_rows() {
        let backend = Arc::new(Double::default());
        let config = BatchingConfig {
            model: "m".into(),
            max_batch: 8,
            max_queue_delay_us: 200_000,
        };
        let rows = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = rows.clone();
        let on_batch = Box::new(move |n| seen.lock().expect("rows").push(n));
        let batcher = Arc::new(
            Batcher::start("m", &spec(), backend.clone(), &config, 64, on_batch).expect("starts"),
        );
        let mut tasks = Vec::new();
        for i in 0..8u32 {
            let b = batcher.clone();
            tasks.push(tokio::spawn(async move {
                let x = Tensor::f32("x", vec![1, 2], vec![i as f32, -(i as f32)]);
                (i, b.submit(vec![x], 1).await)
            }));
        }
        for t in tasks {
            let (i, out) = t.await.expect("task");
            let out = out.expect("queued").expect("ran");
            assert_eq!(out[0].shape, vec![1, 2]);
            assert_eq!(out[0].data.to_f32(), vec![2.0 * i as f32, -2.0 * i as f32]);
        }
        let calls = backend.calls.load(Ordering::SeqCst);
        assert!(calls < 8, "8 requests ran in {calls} batches");
        // Every batch was reported with its rows, for the monitoring window.
        let rows = rows.lock().expect("rows");
        assert_eq!(rows.len(), calls);
        assert_eq!(rows.iter().sum::<usize>(), 8);
    }

    #[tokio::test]
    async fn requests_of_another_shape_start_the_next_batch() {
        let backend = Arc::new(Double::default());
        let config = BatchingConfig {
            model: "m".into(),
            max_batch: 8,
            max_queue_delay_us: 50_000,
        };
        let mut specs = spec();
        specs[0].shape[1] = Dim::Symbol("W".into());
        let batcher = Batcher::start("m", &specs, backend.clone(), &config, 64, Box::new(|_| {}))
            .expect("starts");
        let a = batcher.submit(vec![Tensor::f32("x", vec![1, 2], vec![1.0, 2.0])], 1);
        let b = batcher.submit(vec![Tensor::f32("x", vec![1, 3], vec![1.0, 2.0, 3.0])], 1);
        let (a, b) = tokio::join!(a, b);
        assert_eq!(a.expect("queued").expect("ran")[0].shape, vec![1, 2]);
        assert_eq!(b.expect("queued").expect("ran")[0].shape, vec![1, 3]);
        assert_eq!(backend.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_model_without_a_batch_dimension_is_refused() {
        let mut specs = spec();
        specs[0].shape[0] = Dim::Fixed(1);
        let config = BatchingConfig {
            model: "m".into(),
            max_batch: 8,
            max_queue_delay_us: 100,
        };
        let e = Batcher::start(
            "m",
            &specs,
            Arc::new(Double::default()),
            &config,
            4,
            Box::new(|_| {}),
        )
        .expect_err("refused");
        assert!(e.contains("no symbolic leading"), "{e}");
    }
}
