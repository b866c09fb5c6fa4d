//! Prediction sinks: besides answering the caller, the agent forwards each prediction
//! (request id, model, version, ids, outputs and, if asked, the raw inputs) to
//! configured consumers — an MQTT topic, an HTTP webhook, a rotating JSON-lines file.
//!
//! Each sink has its own bounded queue and its own worker: the request path only tries
//! to enqueue (never waits), so a slow or dead consumer costs inference nothing. A
//! record that finds its sink's queue full, or that the worker could not deliver, is
//! counted (`fleetml_agent_sink_dropped_total{sink,reason}`), never retried forever.
//!
//! ```toml
//! [[prediction_sink]]
//! kind = "jsonl"                     # jsonl | webhook | mqtt
//! path = "/var/lib/fleetml/predictions.jsonl"
//! max_bytes = 10485760               # rotate beyond this (default 10 MiB)
//! keep = 5                           # rotated files kept: .1 … .5 (default 5)
//! models = ["claims"]                # default: every model
//! include_inputs = true              # default false
//! queue = 1024                       # records waiting (default 1024)
//!
//! [[prediction_sink]]
//! kind = "webhook"
//! url = "http://accounting.local:8080/predictions"   # http:// only in this release
//! timeout_ms = 2000
//!
//! [[prediction_sink]]
//! kind = "mqtt"
//! url = "mqtt://localhost:1883"
//! topic = "plant/claims/predictions"
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fleetml_protocol::features::RawValue;
use fleetml_protocol::telemetry::BrokerUrl;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One `[[prediction_sink]]` of the agent configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `jsonl`, `webhook` or `mqtt`.
    pub kind: String,
    /// Models forwarded (default: all).
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub include_inputs: bool,
    pub queue: Option<usize>,
    /// jsonl: the file.
    pub path: Option<PathBuf>,
    pub max_bytes: Option<u64>,
    pub keep: Option<u32>,
    /// webhook: `http://…`; mqtt: `mqtt://…`.
    pub url: Option<String>,
    pub timeout_ms: Option<u64>,
    /// mqtt: the topic.
    pub topic: Option<String>,
}

/// Counters of one sink.
#[derive(Debug, Default)]
pub struct SinkCounters {
    pub delivered: AtomicU64,
    /// Records refused because the queue was full.
    pub queue_full: AtomicU64,
    /// Records the worker could not deliver.
    pub failed: AtomicU64,
}

#[derive(Debug)]
struct Sink {
    name: String,
    models: Vec<String>,
    include_inputs: bool,
    queue: mpsc::Sender<Arc<Value>>,
    counters: Arc<SinkCounters>,
}

/// The configured sinks.
#[derive(Debug, Default)]
pub struct Sinks {
    sinks: Vec<Sink>,
}

/// One prediction request as the sinks see it.
#[derive(Debug)]
pub struct Record<'a> {
    pub request_id: &'a str,
    pub model: &'a str,
    pub version: u64,
    pub ids: &'a [String],
    pub predictions: &'a Value,
    pub inputs: &'a [Vec<RawValue>],
}

fn raw_json(v: &RawValue) -> Value {
    match v {
        RawValue::Missing => Value::Null,
        RawValue::Number(n) => json!(n),
        RawValue::Text(t) => json!(t),
    }
}

impl Sinks {
    /// Validates the configuration and starts a worker per sink (needs a tokio runtime).
    pub fn start(configs: &[SinkConfig]) -> Result<Sinks, String> {
        let mut sinks = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let name = format!("{}#{}", c.kind, i + 1);
            let (tx, rx) = mpsc::channel(c.queue.unwrap_or(1024).max(1));
            let counters = Arc::new(SinkCounters::default());
            let bad = |what: &str| format!("prediction_sink {name}: {what}");
            match c.kind.as_str() {
                "jsonl" => {
                    let path = c.path.clone().ok_or_else(|| bad("`path` is required"))?;
                    let file = JsonLines::open(
                        &path,
                        c.max_bytes.unwrap_or(10 << 20).max(1024),
                        c.keep.unwrap_or(5),
                    )
                    .map_err(|e| bad(&format!("opening {}: {e}", path.display())))?;
                    let (counters, name) = (counters.clone(), name.clone());
                    std::thread::Builder::new()
                        .name(format!("sink-{name}"))
                        .spawn(move || file.run(rx, &counters, &name))
                        .map_err(|e| bad(&e.to_string()))?;
                }
                "webhook" => {
                    let url = c.url.clone().ok_or_else(|| bad("`url` is required"))?;
                    let target = Webhook::parse(&url).map_err(|e| bad(&e))?;
                    let timeout = Duration::from_millis(c.timeout_ms.unwrap_or(2000).max(1));
                    tokio::spawn(target.run(rx, timeout, counters.clone(), name.clone()));
                }
                "mqtt" => {
                    let url: BrokerUrl = c
                        .url
                        .as_deref()
                        .ok_or_else(|| bad("`url` is required"))?
                        .parse()
                        .map_err(|e: String| bad(&e))?;
                    if url.tls {
                        return Err(bad(
                            "prediction sinks publish plain MQTT to a broker on this device or its network; use mqtt://",
                        ));
                    }
                    let topic = c.topic.clone().ok_or_else(|| bad("`topic` is required"))?;
                    if topic.is_empty() || topic.contains(['+', '#']) {
                        return Err(bad("`topic` must be a topic name without wildcards"));
                    }
                    tokio::spawn(mqtt(rx, url, topic, counters.clone(), name.clone()));
                }
                other => {
                    return Err(bad(&format!(
                        "unknown kind `{other}` (expected jsonl, webhook or mqtt)"
                    )));
                }
            }
            sinks.push(Sink {
                name,
                models: c.models.clone(),
                include_inputs: c.include_inputs,
                queue: tx,
                counters,
            });
        }
        Ok(Sinks { sinks })
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    /// The counters of each sink, by name.
    pub fn counters(&self) -> Vec<(String, Arc<SinkCounters>)> {
        self.sinks
            .iter()
            .map(|s| (s.name.clone(), s.counters.clone()))
            .collect()
    }

    /// Offers a prediction to every sink that wants its model; never waits.
    pub fn offer(&self, r: &Record<'_>) {
        let wanted = |s: &&Sink| s.models.is_empty() || s.models.iter().any(|m| m == r.model);
        let mut plain: Option<Arc<Value>> = None;
        let mut with_inputs: Option<Arc<Value>> = None;
        for sink in self.sinks.iter().filter(wanted) {
            let slot = if sink.include_inputs {
                &mut with_inputs
            } else {
                &mut plain
            };
            let value = slot
                .get_or_insert_with(|| {
                    let mut v = json!({
                        "ts_ms": crate::clock::now_ms(),
                        "request_id": r.request_id,
                        "model": r.model,
                        "version": r.version,
                        "predictions": r.predictions,
                    });
                    if !r.ids.is_empty() {
                        v["ids"] = json!(r.ids);
                    }
                    if sink.include_inputs && !r.inputs.is_empty() {
                        v["inputs"] = Value::Array(
                            r.inputs
                                .iter()
                                .map(|row| Value::Array(row.iter().map(raw_json).collect()))
                                .collect(),
                        );
                    }
                    Arc::new(v)
                })
                .clone();
            if sink.queue.try_send(value).is_err() {
                sink.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("fleetml_agent_sink_dropped_total", "sink" => sink.name.clone(), "reason" => "queue_full").increment(1);
            }
        }
    }
}

fn failed(counters: &SinkCounters, name: &str) {
    counters.failed.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("fleetml_agent_sink_dropped_total", "sink" => name.to_string(), "reason" => "delivery_failed").increment(1);
}

fn delivered(counters: &SinkCounters, name: &str) {
    counters.delivered.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("fleetml_agent_sink_delivered_total", "sink" => name.to_string())
        .increment(1);
}

/// A JSON-lines file rotated by size: `path` → `path.1` → … → `path.{keep}`.
#[derive(Debug)]
struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl JsonLines {
    fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<JsonLines> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = Self::append(path)?;
        let size = file.metadata()?.len();
        Ok(JsonLines {
            path: path.to_path_buf(),
            file,
            size,
            max_bytes,
            keep,
        })
    }

    fn append(path: &Path) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        // Predictions (and inputs) may be personal data: owner-only.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for n in (1..self.keep).rev() {
                let from = self.rotated(n);
                if from.exists() {
                    std::fs::rename(&from, self.rotated(n + 1))?;
                }
            }
            std::fs::rename(&self.path, self.rotated(1))?;
        }
        self.file = Self::append(&self.path)?;
        self.size = 0;
        Ok(())
    }

    fn write(&mut self, value: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(value)?;
        line.push(b'\n');
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn run(mut self, mut rx: mpsc::Receiver<Arc<Value>>, counters: &SinkCounters, name: &str) {
        while let Some(v) = rx.blocking_recv() {
            match self.write(&v) {
                Ok(()) => delivered(counters, name),
                Err(e) => {
                    tracing::warn!(sink = name, error = %e, "prediction sink write failed");
                    failed(counters, name);
                }
            }
        }
    }
}

/// An `http://host[:port]/path` webhook, posted one JSON record at a time.
#[derive(Debug, Clone)]
struct Webhook {
    url: crate::http::HttpUrl,
}

impl Webhook {
    fn parse(url: &str) -> Result<Webhook, String> {
        let url = crate::http::HttpUrl::parse(url, "webhook")?;
        if url.tls {
            return Err(format!(
                "`url = \"{url}\"`: prediction sinks post plain HTTP to an application on this device or its network; use http://"
            ));
        }
        Ok(Webhook { url })
    }

    async fn post(&self, body: Vec<u8>, timeout: Duration) -> Result<(), String> {
        // Only the status matters: the body is never read (the connection is not reused).
        let r = tokio::time::timeout(
            timeout,
            crate::http::Request::post(&self.url, "", "application/json", body).send(),
        )
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))??;
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }

    async fn run(
        self,
        mut rx: mpsc::Receiver<Arc<Value>>,
        timeout: Duration,
        counters: Arc<SinkCounters>,
        name: String,
    ) {
        while let Some(v) = rx.recv().await {
            let body = serde_json::to_vec(&*v).unwrap_or_default();
            match self.post(body, timeout).await {
                Ok(()) => delivered(&counters, &name),
                Err(e) => {
                    tracing::debug!(sink = %name, error = %e, "webhook delivery failed");
                    failed(&counters, &name);
                }
            }
        }
    }
}

async fn mqtt(
    mut rx: mpsc::Receiver<Arc<Value>>,
    url: BrokerUrl,
    topic: String,
    counters: Arc<SinkCounters>,
    name: String,
) {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    let id = format!(
        "fleetml-sink-{}-{}",
        std::process::id(),
        name.replace('#', "-")
    );
    let mut options = MqttOptions::new(id, url.host.clone(), url.port);
    options.set_keep_alive(Duration::from_secs(30));
    if let (Some(u), Some(p)) = (&url.username, &url.password) {
        options.set_credentials(u.clone(), p.clone());
    }
    let (client, mut events) = AsyncClient::new(options, 64);
    // The event loop runs on its own; publishes queue in the client (bounded) while the
    // broker is away and fail (counted) when that is full.
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match events.poll().await {
                Ok(_) => failures = 0,
                Err(_) => {
                    failures = failures.saturating_add(1);
                    tokio::time::sleep(crate::publisher::backoff(failures)).await;
                }
            }
        }
    });
    while let Some(v) = rx.recv().await {
        let body = serde_json::to_vec(&*v).unwrap_or_default();
        match client.try_publish(topic.clone(), QoS::AtLeastOnce, false, body) {
            Ok(()) => delivered(&counters, &name),
            Err(_) => failed(&counters, &name),
        }
    }
}
