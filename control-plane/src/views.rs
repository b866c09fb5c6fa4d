//! The fleet views the API serves as JSON (`GET /v1/devices`, `/v1/devices/{id}`,
//! `/v1/drift`) and `fleetctl` prints as tables.

use fleetml_protocol::telemetry::{Body, DeviceId, Envelope, FeatureDrift};
use serde_json::{Value, json};

use crate::api::types::RolloutView;
use crate::records::{DeviceRecord, DeviceState};

fn open_alerts(state: &DeviceState) -> Vec<String> {
    state
        .alerts
        .iter()
        .flat_map(|(model, subjects)| subjects.iter().map(move |s| format!("{model}:{s}")))
        .collect()
}

/// One row of `fleetctl devices list`.
pub fn device_summary(d: &DeviceRecord, state: &DeviceState) -> Value {
    let status = state.status.as_ref().map(|(_, s)| s);
    json!({
        "id": d.id,
        // What the operator declared at enrollment, else what the agent reports.
        "board": d.board.clone().or(status.map(|s| s.board.clone())),
        "tags": d.tags,
        "online": state.online,
        "last_seen_ms": state.last_seen_ms,
        "offline_since_ms": state.offline_since_ms,
        "models": status.map(|s| s.models.iter().map(|m| json!({
            "name": m.name, "version": m.version, "backend": m.backend,
        })).collect::<Vec<_>>()).unwrap_or_default(),
        "open_alerts": open_alerts(state),
        "agent_version": status.map(|s| s.agent_version.clone()),
        "sequence_restarts": state.sequence_restarts,
        "revoked_ms": d.revoked_ms,
        "outbox_depth": status.map(|s| s.outbox_depth),
        "dropped_windows": status.map(|s| s.dropped_windows),
        "messages": state.stored,
        "duplicates": state.duplicates,
        "gaps": state.gaps,
        "last_seq": state.last_seq,
    })
}

/// What kind of message an envelope is, in one word.
pub fn kind(e: &Envelope) -> &'static str {
    e.body.kind()
}

/// A message in a list: sequence number, time, kind and a one-line summary.
pub fn message_summary(e: &Envelope) -> Value {
    let summary = match &e.body {
        Body::Status(s) => format!(
            "{} models, uptime {} s, outbox {}",
            s.models.len(),
            s.uptime_s,
            s.outbox_depth
        ),
        Body::Window(w) => format!(
            "{} v{} window {}: {} predictions",
            w.model, w.version, w.window, w.predictions
        ),
        Body::Alert(a) => format!(
            "{} v{}: {} {}",
            a.model, a.version, a.event.subject, a.event.transition
        ),
        Body::Event(ev) => {
            let kind = serde_json::to_value(ev.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{} v{} {kind} {}", ev.model, ev.version, ev.detail)
                .trim()
                .to_string()
        }
        Body::Ack(a) => format!(
            "command {} {}{}",
            a.command,
            if a.ok { "done" } else { "refused" },
            if a.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", a.detail)
            }
        ),
        Body::Command(c) => format!("command {}", c.id),
        Body::Receipt(r) => format!("receipt of {} ranges", r.stored.len()),
    };
    json!({ "seq": e.seq, "ts_ms": e.ts_ms, "kind": kind(e), "summary": summary, "body": e.body })
}

/// `fleetctl devices show ID`.
pub fn device_detail(d: &DeviceRecord, state: &DeviceState, recent: &[Envelope]) -> Value {
    let mut v = device_summary(d, state);
    v["enrolled_ms"] = json!(d.enrolled_ms);
    v["status"] = json!(state.status.as_ref().map(|(_, s)| s));
    // What the control plane itself noticed about the device (a restarted sequence).
    v["noticed"] = json!(
        state
            .lifecycle
            .iter()
            .filter(|(_, e)| e.kind == fleetml_protocol::telemetry::Lifecycle::SequenceRestarted)
            .map(|(at, e)| json!({"at_ms": at, "kind": e.kind, "detail": e.detail}))
            .collect::<Vec<_>>()
    );
    v["windows"] = json!(
        state
            .windows
            .values()
            .map(|(seq, w)| json!({
                "seq": seq, "model": w.model, "version": w.version, "window": w.window,
                "end_ms": w.end_ms, "predictions": w.predictions,
                "missing_prediction_rate": w.missing_prediction_rate, "alerts": w.alerts,
                "estimated_accuracy": w.estimated_accuracy, "live_accuracy": w.live_accuracy,
            }))
            .collect::<Vec<_>>()
    );
    v["recent"] = json!(
        recent
            .iter()
            .rev()
            .filter(|e| !matches!(e.body, Body::Window(_) | Body::Status(_)))
            .take(20)
            .map(|e| {
                let mut m = message_summary(e);
                if let Some(o) = m.as_object_mut() {
                    o.remove("body");
                }
                m
            })
            .collect::<Vec<_>>()
    );
    v
}

fn drift_row(
    device: &DeviceId,
    seq: u64,
    w: &fleetml_protocol::telemetry::WindowReport,
    f: &FeatureDrift,
    alerting: bool,
) -> Value {
    json!({
        "device": device, "model": w.model, "version": w.version, "window": w.window,
        "seq": seq, "end_ms": w.end_ms, "feature": f.name, "values": f.values,
        "psi": f.psi, "js": f.js, "ks": f.ks, "chi2_p": f.chi2_p,
        "wasserstein": f.wasserstein, "unseen_rate": f.unseen_rate, "moved": f.moved,
        "missing_rate": f.missing_rate, "out_of_range_rate": f.out_of_range_rate,
        "drifting": f.drifting, "alerting": alerting,
    })
}

/// `fleetctl drift`: the latest drift scores per feature (and of the predictions) of
/// each device's newest window per model; alerting rows first, then by PSI.
pub fn drift_rows(states: &[(DeviceId, DeviceState)], model: Option<&str>) -> Vec<Value> {
    let mut rows = Vec::new();
    for (device, state) in states {
        for (name, (seq, w)) in &state.windows {
            if model.is_some_and(|m| m != name) {
                continue;
            }
            let open = state.alerts.get(name);
            let alerting = |s: &str| open.is_some_and(|o| o.contains(s));
            for f in &w.features {
                rows.push(drift_row(device, *seq, w, f, alerting(&f.name)));
            }
            if let Some(p) = &w.prediction {
                rows.push(drift_row(device, *seq, w, p, alerting("prediction")));
            }
            if let Some(m) = &w.multivariate {
                rows.push(drift_row(device, *seq, w, m, alerting(&m.name)));
            }
            if let Some(e) = &w.estimated_accuracy {
                rows.push(json!({
                    "device": device, "model": w.model, "version": w.version,
                    "window": w.window, "seq": seq, "end_ms": w.end_ms,
                    "feature": "estimated_accuracy", "values": e.predictions,
                    "estimated_accuracy": e.accuracy, "limit": e.limit,
                    "live_accuracy": w.live_accuracy, "labels": w.labels,
                    "drifting": e.alerting, "alerting": alerting("estimated_accuracy"),
                }));
            }
        }
    }
    let key = |v: &Value| {
        (
            !v["alerting"].as_bool().unwrap_or(false),
            !v["drifting"].as_bool().unwrap_or(false),
            -(v["psi"].as_f64().unwrap_or(0.0) * 1e6) as i64,
        )
    };
    rows.sort_by_key(key);
    rows
}

fn ago(ms: Option<u64>, now_ms: u64) -> String {
    match ms {
        None => "never".into(),
        Some(t) => {
            let s = now_ms.saturating_sub(t) / 1000;
            match s {
                0..60 => format!("{s}s ago"),
                60..3600 => format!("{}m ago", s / 60),
                3600..86400 => format!("{}h ago", s / 3600),
                _ => format!("{}d ago", s / 86400),
            }
        }
    }
}

fn str_of(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `fleetctl devices list` as a table.
pub fn devices_table(list: &[Value], now_ms: u64) -> String {
    if list.is_empty() {
        return "no devices enrolled; add one with `fleetctl devices enroll NAME --out agent.toml`\n".into();
    }
    let mut out = format!(
        "{:<20} {:<16} {:<8} {:<10} {:<28} {:<24} TAGS\n",
        "DEVICE", "BOARD", "STATE", "LAST SEEN", "MODELS", "OPEN ALERTS"
    );
    for d in list {
        let models: Vec<String> = d["models"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| {
                        format!(
                            "{}@v{}/{}",
                            str_of(&m["name"]),
                            m["version"],
                            str_of(&m["backend"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let alerts: Vec<String> = d["open_alerts"]
            .as_array()
            .map(|a| a.iter().map(str_of).collect())
            .unwrap_or_default();
        let tags: Vec<String> = d["tags"]
            .as_object()
            .map(|t| {
                t.iter()
                    .map(|(k, v)| format!("{k}={}", str_of(v)))
                    .collect()
            })
            .unwrap_or_default();
        let state = if !d["revoked_ms"].is_null() {
            "revoked"
        } else if d["online"].as_bool().unwrap_or(false) {
            "online"
        } else if d["last_seen_ms"].is_null() {
            "never"
        } else {
            "offline"
        };
        out.push_str(&format!(
            "{:<20} {:<16} {:<8} {:<10} {:<28} {:<24} {}\n",
            str_of(&d["id"]),
            str_of(&d["board"]),
            state,
            ago(d["last_seen_ms"].as_u64(), now_ms),
            if models.is_empty() {
                "-".into()
            } else {
                models.join(",")
            },
            if alerts.is_empty() {
                "-".into()
            } else {
                alerts.join(",")
            },
            tags.join(",")
        ));
    }
    out
}

/// `fleetctl devices show ID` as text.
pub fn device_text(d: &Value, now_ms: u64) -> String {
    let mut out = devices_table(std::slice::from_ref(d), now_ms);
    for n in d["noticed"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "\n{} {}: {}\n",
            ago(n["at_ms"].as_u64(), now_ms),
            str_of(&n["kind"]),
            str_of(&n["detail"])
        ));
    }
    out.push_str(&format!(
        "\nagent {}, outbox {} waiting, {} windows dropped; {} messages stored, {} duplicates, {} gaps (highest seq {})\n",
        str_of(&d["agent_version"]),
        str_of(&d["outbox_depth"]),
        str_of(&d["dropped_windows"]),
        d["messages"], d["duplicates"], d["gaps"], d["last_seq"],
    ));
    if let Some(w) = d["windows"].as_array().filter(|w| !w.is_empty()) {
        out.push_str("\nLATEST WINDOWS\n");
        for w in w {
            out.push_str(&format!(
                "  {} v{} window {}: {} predictions, missing rate {:.3}, alerts {}\n",
                str_of(&w["model"]),
                w["version"],
                w["window"],
                w["predictions"],
                w["missing_prediction_rate"].as_f64().unwrap_or(0.0),
                w["alerts"]
            ));
        }
    }
    if let Some(models) = d["assignment"]["models"].as_array() {
        out.push_str(&format!(
            "\nASSIGNMENT generation {}\n",
            d["assignment"]["generation"]
        ));
        for m in models {
            out.push_str(&format!(
                "  {} v{} sha256 {} (from {})\n",
                str_of(&m["name"]),
                m["version"],
                str_of(&m["digest"]).get(..16).unwrap_or("?"),
                str_of(&m["rollout"])
            ));
        }
    }
    if let Some(r) = d["recent"].as_array().filter(|r| !r.is_empty()) {
        out.push_str("\nRECENT EVENTS\n");
        for e in r {
            out.push_str(&format!(
                "  #{:<6} {:<10} {:<6} {}\n",
                e["seq"],
                ago(e["ts_ms"].as_u64(), now_ms),
                str_of(&e["kind"]),
                str_of(&e["summary"])
            ));
        }
    }
    out
}

/// `fleetctl drift` as a table.
pub fn drift_table(rows: &[Value]) -> String {
    if rows.is_empty() {
        return "no window reports yet\n".into();
    }
    let mut out = format!(
        "{:<20} {:<14} {:>7} {:<20} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  STATE\n",
        "DEVICE", "MODEL", "WINDOW", "FEATURE", "PSI", "JS", "KS", "WASSERS", "CHI2 P", "MISSING"
    );
    for r in rows {
        let num = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
        let state = if r["alerting"].as_bool().unwrap_or(false) {
            "ALERT"
        } else if r["drifting"].as_bool().unwrap_or(false) {
            "drifting"
        } else {
            "ok"
        };
        if let Some(estimate) = r["estimated_accuracy"].as_f64() {
            let live = match r["live_accuracy"].as_f64() {
                Some(a) => format!("; live {a:.3} over {} labels", r["labels"]),
                None => String::new(),
            };
            out.push_str(&format!(
                "{:<20} {:<14} {:>7} {:<20} {:>8.3} (limit {}{live})  {state}\n",
                str_of(&r["device"]),
                format!("{}@v{}", str_of(&r["model"]), r["version"]),
                r["window"],
                "estimated_accuracy",
                estimate,
                r["limit"]
                    .as_f64()
                    .map_or("-".into(), |l| format!("{l:.3}")),
            ));
            continue;
        }
        out.push_str(&format!(
            "{:<20} {:<14} {:>7} {:<20} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {state}\n",
            str_of(&r["device"]),
            format!("{}@v{}", str_of(&r["model"]), r["version"]),
            r["window"],
            str_of(&r["feature"]),
            num(&r["psi"]),
            num(&r["js"]),
            num(&r["ks"]),
            num(&r["wasserstein"]),
            num(&r["chi2_p"]),
            num(&r["missing_rate"]),
        ));
        // What moved, under an alerting feature: `online 30% -> 70%`.
        let moved: Vec<String> = r["moved"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|b| {
                        let pct = |v: &Value| {
                            v.as_f64()
                                .map_or("?".into(), |x| format!("{:.0}%", x * 100.0))
                        };
                        format!(
                            "{} {} -> {}",
                            str_of(&b["bin"]),
                            pct(&b["reference"]),
                            pct(&b["current"])
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !moved.is_empty() {
            out.push_str(&format!("{:<20} moved: {}\n", "", moved.join(", ")));
        }
    }
    out
}

/// Flattens JSON into `path → value` leaves (`a.b[2].c`).
pub(crate) fn flatten(
    prefix: &str,
    v: &Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, v, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), str_of(other));
        }
    }
}

/// What `models diff` compares of a version's `GET /v1/models/{name}/{version}`.
const DIFFED: [(&str, &str); 5] = [
    ("lineage", "/bundle/manifest/lineage"),
    ("features", "/bundle/manifest/features"),
    ("inputs", "/bundle/manifest/inputs"),
    ("monitoring", "/bundle/manifest/monitoring"),
    ("reference", "/bundle/reference"),
];

/// `fleetctl models diff A B`: every leaf of lineage, schema, inputs, monitoring
/// settings and reference profile that differs, side by side.
pub fn model_diff(a: &Value, b: &Value, a_name: &str, b_name: &str) -> (usize, String) {
    let mut out = String::new();
    let mut count = 0;
    for (section, pointer) in DIFFED {
        let mut left = std::collections::BTreeMap::new();
        let mut right = std::collections::BTreeMap::new();
        flatten("", a.pointer(pointer).unwrap_or(&Value::Null), &mut left);
        flatten("", b.pointer(pointer).unwrap_or(&Value::Null), &mut right);
        let keys: std::collections::BTreeSet<&String> = left.keys().chain(right.keys()).collect();
        let rows: Vec<(String, String, String)> = keys
            .into_iter()
            .filter_map(|k| {
                let (l, r) = (left.get(k), right.get(k));
                (l != r).then(|| {
                    (
                        k.clone(),
                        l.cloned().unwrap_or_else(|| "(absent)".into()),
                        r.cloned().unwrap_or_else(|| "(absent)".into()),
                    )
                })
            })
            .collect();
        if rows.is_empty() {
            out.push_str(&format!("{section}: same\n"));
            continue;
        }
        count += rows.len();
        out.push_str(&format!(
            "{section}: {} difference(s)\n  {:<44} {:<30} {}\n",
            rows.len(),
            "",
            a_name,
            b_name
        ));
        for (k, l, r) in rows {
            let cut = |s: &str| {
                if s.chars().count() > 30 {
                    format!("{}…", s.chars().take(29).collect::<String>())
                } else {
                    s.to_string()
                }
            };
            out.push_str(&format!("  {:<44} {:<30} {}\n", cut(&k), cut(&l), cut(&r)));
        }
    }
    (count, out)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of milliseconds since the Unix epoch.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        (done as usize * width).div_ceil(total as usize).min(width)
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// One line of a rollout's state, for logs and non-terminal `--watch`.
pub fn rollout_line(v: &RolloutView) -> String {
    let current = v
        .waves
        .iter()
        .position(|w| w.passed_ms.is_none())
        .map_or(v.waves.len(), |i| i + 1);
    format!(
        "{} {}: {} {} active {}/{}, wave {current}/{}{}",
        v.kind.as_str(),
        v.id,
        v.state.as_str(),
        bar(v.devices_active as u64, v.devices_total as u64, 20),
        v.devices_active,
        v.devices_total,
        v.waves.len(),
        v.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}

/// `fleetctl rollout status`: progress bar, waves, gates against thresholds, devices.
pub fn rollout_status(v: &RolloutView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let version = v
        .version
        .map_or("each device's previous version".into(), |n| format!("v{n}"));
    let _ = writeln!(
        out,
        "{} {} of {} to {} ({}), by {}",
        v.kind.as_str(),
        v.id,
        v.model,
        version,
        v.selector,
        v.by
    );
    let _ = writeln!(out, "{}", rollout_line(v));
    let _ = writeln!(
        out,
        "\n{:<6} {:>7} {:>8} {:>8} {:>8} {:>12} {:>7} {:>7}  PASSED",
        "WAVE", "PERCENT", "DEVICES", "WAITING", "PENDING", "DOWNLOADING", "ACTIVE", "FAILED"
    );
    for w in &v.waves {
        let n = |k: &str| w.counts.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{:<6} {:>6}% {:>8} {:>8} {:>8} {:>12} {:>7} {:>7}  {}",
            w.wave,
            w.percent,
            w.devices,
            n("waiting"),
            n("pending"),
            n("downloading"),
            n("active"),
            n("failed"),
            w.passed_ms.map_or_else(|| "-".into(), utc)
        );
    }
    for w in v.waves.iter().filter(|w| w.reminded > 0) {
        let _ = writeln!(
            out,
            "wave {}: devices silent since their assignment were told again {} time(s)",
            w.wave, w.reminded
        );
    }
    if !v.gates.is_empty() {
        let _ = writeln!(out, "\n{:<26} {:>12} {:>12}  OK", "GATE", "VALUE", "LIMIT");
        let num = |x: Option<f64>| {
            x.map_or("-".into(), |f| {
                format!("{f:.4}")
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            })
        };
        for g in &v.gates {
            let _ = writeln!(
                out,
                "{:<26} {:>12} {:>12}  {}",
                g.gate,
                num(g.value),
                num(g.threshold),
                if g.ok { "yes" } else { "NO" }
            );
        }
    }
    if let Some(sh) = &v.shadow {
        let _ = writeln!(
            out,
            "\nshadow v{} on {}% of requests (beside what each device serves; never answers)",
            sh.version,
            f64::from(sh.sample_permille) / 10.0
        );
        let _ = writeln!(
            out,
            "{:<24} {:>4} {:>8} {:>7} {:>8} {:>10} {:>10} {:>10} {:>8}  ALERTS",
            "BOARD / DEVICE",
            "DEVS",
            "ROWS",
            "SHED",
            "AGREE",
            "MEAN|DIFF|",
            "P95 SHADOW",
            "P95 SERVED",
            "RATIO"
        );
        let pct = |x: Option<f64>| x.map_or("-".into(), |a| format!("{:.1}%", a * 100.0));
        let num = |x: Option<f64>, unit: &str| x.map_or("-".into(), |a| format!("{a:.3}{unit}"));
        let ms = |x: Option<f64>| x.map_or("-".into(), |u| format!("{:.2}ms", u / 1000.0));
        for (rows, indent) in [(&sh.boards, ""), (&sh.devices, "  ")] {
            for r in rows {
                let _ = writeln!(
                    out,
                    "{:<24} {:>4} {:>8} {:>7} {:>8} {:>10} {:>10} {:>10} {:>8}  {}",
                    format!("{indent}{}", r.name),
                    r.devices,
                    r.rows,
                    r.shed,
                    pct(r.agreement),
                    num(r.mean_abs_error, ""),
                    ms(r.shadow_p95_us),
                    ms(r.served_p95_us),
                    num(r.latency_ratio, "x"),
                    r.alerts.join(", ")
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:>4} {:>6} {:>6} {:<12} DETAIL",
        "DEVICE", "WAVE", "FROM", "TO", "STATE"
    );
    for d in &v.devices {
        let _ = writeln!(
            out,
            "{:<24} {:>4} {:>6} {:>6} {:<12} {}{}",
            d.device,
            d.wave,
            d.from.map_or("-".into(), |f| format!("v{f}")),
            format!("v{}", d.to),
            d.state,
            if d.online { "" } else { "(offline) " },
            d.detail
        );
    }
    out
}

/// `fleetctl models compare` side by side.
pub fn comparison(r: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let name = |x: &Value| format!("{}@v{}", str_of(&x["model"]), x["version"]);
    let (a, b) = (&r["a"], &r["b"]);
    let _ = writeln!(
        out,
        "on dataset {} (label `{}`)\n",
        str_of(&r["dataset"]).get(..16).unwrap_or("?"),
        str_of(&r["label"])
    );
    let _ = writeln!(out, "{:<28} {:>14} {:>14}", "", name(a), name(b));
    let row = |out: &mut String, label: &str, pa: &Value, pb: &Value| {
        let f = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.4}"));
        let _ = writeln!(out, "{label:<28} {:>14} {:>14}", f(pa), f(pb));
    };
    let (ea, eb) = (&a["evaluation"], &b["evaluation"]);
    let _ = writeln!(
        out,
        "{:<28} {:>14} {:>14}",
        "rows",
        str_of(&ea["overall"]["rows"]),
        str_of(&eb["overall"]["rows"])
    );
    for m in ["accuracy", "auc", "mae"] {
        if ea["overall"][m].is_number() {
            row(&mut out, m, &ea["overall"][m], &eb["overall"][m]);
        }
    }
    row(
        &mut out,
        "latency p50 (us/row)",
        &ea["latency_us"]["p50"],
        &eb["latency_us"]["p50"],
    );
    row(
        &mut out,
        "latency p99 (us/row)",
        &ea["latency_us"]["p99"],
        &eb["latency_us"]["p99"],
    );
    if let Some(slices) = ea["slices"].as_object() {
        for (slice, sa) in slices {
            let sb = &eb["slices"][slice];
            for m in ["accuracy", "auc", "mae"] {
                if sa[m].is_number() {
                    row(&mut out, &format!("{slice} {m}"), &sa[m], &sb[m]);
                }
            }
        }
    }
    let v = &r["verdict"];
    let winner = match v["winner"].as_str() {
        Some("a") => format!("{} wins", name(a)),
        Some("b") => format!("{} wins", name(b)),
        _ => "no winner".into(),
    };
    let _ = writeln!(
        out,
        "\n{winner} on {} ({:+.4} for {}, margin {})",
        str_of(&v["metric"]),
        v["gain_of_b"].as_f64().unwrap_or(0.0),
        name(b),
        v["margin"]
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `fleetctl drift`: a feature row with what moved under it, and the estimated
    /// accuracy on its own line with its limit and the live accuracy.
    #[test]
    fn the_drift_table_shows_what_moved_and_the_estimated_accuracy() {
        let rows = vec![
            json!({"device": "pi-01", "model": "claims", "version": 1, "window": 11,
                   "feature": "channel", "psi": 0.41, "js": 0.3, "ks": null,
                   "wasserstein": null, "chi2_p": 1e-9, "missing_rate": 0.0,
                   "moved": [{"bin": "online", "reference": 0.3, "current": 0.7}],
                   "drifting": true, "alerting": true}),
            json!({"device": "pi-01", "model": "claims", "version": 1, "window": 11,
                   "feature": "estimated_accuracy", "estimated_accuracy": 0.7364,
                   "limit": 0.779, "live_accuracy": 0.69, "labels": 120,
                   "drifting": true, "alerting": true}),
        ];
        let table = drift_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("DEVICE"), "{table}");
        assert!(
            lines[1].contains("channel") && lines[1].ends_with("ALERT"),
            "{table}"
        );
        assert!(lines[2].contains("moved: online 30% -> 70%"), "{table}");
        assert!(
            lines[3].contains("estimated_accuracy")
                && lines[3].contains("0.736 (limit 0.779; live 0.690 over 120 labels)")
                && lines[3].ends_with("ALERT"),
            "{table}"
        );
    }
}
