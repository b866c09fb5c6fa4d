//! The fleet page (every device: state, last seen, board, models and backends, agent,
//! outbox backlog, open alerts, tags; filtered by tag, board, state and model) and a
//! device's page (its summary, assignment, windows, events, and charts of its drift and
//! missing predictions over its recent windows).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use fleetml_protocol::telemetry::{Body, WindowReport};
use maud::{Markup, html};

use super::html::{self as h, PageResult};
use super::svg::{self, Series};
use super::{Shared, User, read};
use crate::api::ApiError;
use crate::plane::{Plane, now_ms};
use crate::records::{DeviceRecord, DeviceState};

/// Every enrolled device with its state.
pub(crate) fn fleet_states(plane: &Plane) -> Result<Vec<(DeviceRecord, DeviceState)>, ApiError> {
    let store = &plane.ingest.store;
    let mut out = Vec::new();
    for d in store.devices()? {
        let state = store.state(&d.id)?.unwrap_or_default();
        out.push((d, state));
    }
    Ok(out)
}

/// A device's state in one word: revoked, offline, alerting or online.
pub(crate) fn state_word(d: &DeviceRecord, s: &DeviceState) -> &'static str {
    if d.revoked_ms.is_some() {
        "revoked"
    } else if !s.online {
        "offline"
    } else if s.alerts.values().any(|a| !a.is_empty()) {
        "alerting"
    } else {
        "online"
    }
}

pub(crate) fn board_of(d: &DeviceRecord, s: &DeviceState) -> String {
    d.board
        .clone()
        .or_else(|| s.status.as_ref().map(|(_, st)| st.board.clone()))
        .unwrap_or_default()
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct Filter {
    #[serde(default)]
    tag: String,
    #[serde(default)]
    board: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    model: String,
}

impl Filter {
    fn keeps(&self, d: &DeviceRecord, s: &DeviceState) -> bool {
        let tag_ok = match self.tag.split_once('=') {
            _ if self.tag.is_empty() => true,
            Some((k, v)) => d.tags.get(k.trim()).is_some_and(|x| x == v.trim()),
            None => d.tags.contains_key(self.tag.trim()),
        };
        let model_ok = self.model.is_empty()
            || s.status
                .as_ref()
                .is_some_and(|(_, st)| st.models.iter().any(|m| m.name == self.model));
        tag_ok
            && model_ok
            && (self.board.is_empty() || board_of(d, s) == self.board)
            && (self.state.is_empty() || state_word(d, s) == self.state)
    }
}

/// `GET /ui/`: the fleet.
pub async fn fleet(State(c): State<Shared>, user: User, Query(f): Query<Filter>) -> PageResult {
    let plane = c.plane.clone();
    let all = read(move || fleet_states(&plane))
        .await
        .map_err(h::fail(&user))?;
    let now = now_ms();
    let boards: std::collections::BTreeSet<String> =
        all.iter().map(|(d, s)| board_of(d, s)).collect();
    let models: std::collections::BTreeSet<String> = all
        .iter()
        .filter_map(|(_, s)| s.status.as_ref())
        .flat_map(|(_, st)| st.models.iter().map(|m| m.name.clone()))
        .collect();
    let shown: Vec<&(DeviceRecord, DeviceState)> =
        all.iter().filter(|(d, s)| f.keeps(d, s)).collect();
    let count = |w: &str| all.iter().filter(|(d, s)| state_word(d, s) == w).count();
    let body = html! {
        h1 { "Fleet" }
        form.filters method="get" action="/ui/" aria-label="Filter devices" {
            label { "Tag " input type="text" name="tag" value=(f.tag) placeholder="site=lab"; }
            label { "Board "
                select name="board" {
                    option value="" { "any" }
                    @for b in &boards { option value=(b) selected[*b == f.board] { (b) } }
                }
            }
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in ["online", "alerting", "offline", "revoked"] {
                        option value=(s) selected[s == f.state] { (s) }
                    }
                }
            }
            label { "Model "
                select name="model" {
                    option value="" { "any" }
                    @for m in &models { option value=(m) selected[*m == f.model] { (m) } }
                }
            }
            button type="submit" { "Filter" }
            " " a href="/ui/" { "Clear" }
        }
        (h::live("fleet-live", 5, html! {
            p.summary {
                strong { (all.len()) } " devices: "
                (h::badge("online")) " " (count("online")) " · "
                (h::badge("alerting")) " " (count("alerting")) " · "
                (h::badge("offline")) " " (count("offline")) " · "
                (h::badge("revoked")) " " (count("revoked"))
                " · as of " (h::at(Some(now)))
            }
            (devices_table(&shown, now))
        }))
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Fleet", Some(&user), "/ui/", body),
    ))
}

fn devices_table(rows: &[&(DeviceRecord, DeviceState)], now: u64) -> Markup {
    html! {
        div.scroll {
            table #devices {
                caption.visually-hidden { "Devices" }
                thead { tr {
                    th scope="col" { "Device" } th scope="col" { "State" } th scope="col" { "Last seen" }
                    th scope="col" { "Board" } th scope="col" { "Models (backend)" } th scope="col" { "Agent" }
                    th scope="col" { "Outbox" } th scope="col" { "Open alerts" } th scope="col" { "Tags" }
                } }
                tbody {
                    @for (d, s) in rows {
                        @let status = s.status.as_ref().map(|(_, st)| st);
                        tr data-device=(d.id) {
                            th scope="row" { a href=(format!("/ui/devices/{}", d.id)) { (d.id) } }
                            td { (h::badge(state_word(d, s))) }
                            td { (h::ago(s.last_seen_ms, now)) }
                            td { (board_of(d, s)) }
                            td { @if let Some(st) = status {
                                @for m in &st.models { span.model { (m.name) " v" (m.version) " (" (m.backend) ")" } " " }
                            } }
                            td { (status.map(|st| st.agent_version.clone()).unwrap_or_default()) }
                            td.num { (status.map(|st| st.outbox_depth.to_string()).unwrap_or_default()) }
                            td { @for (model, subjects) in &s.alerts { @for subject in subjects {
                                span.badge.b-alerting { (model) ":" (subject) } " "
                            } } }
                            td { @for (k, v) in &d.tags { span.tag { (k) "=" (v) } " " } }
                        }
                    }
                    @if rows.is_empty() {
                        tr { td colspan="9" { "No device matches." } }
                    }
                }
            }
        }
    }
}

/// What a device's page shows of its history: its windows and statuses among its most
/// recent messages, oldest first.
#[derive(Default)]
struct History {
    windows: Vec<(u64, WindowReport)>,
    statuses: Vec<(u64, u64, fleetml_protocol::telemetry::Status)>,
    /// The rollouts and rollbacks that assigned it a version, oldest first.
    assignments: Vec<crate::rollout::Rollout>,
}

/// Messages a device page reads back.
const HISTORY_MESSAGES: u64 = 500;

fn history(plane: &Plane, d: &DeviceRecord, last_seq: u64) -> Result<History, ApiError> {
    let messages = plane.ingest.store.messages(
        &d.id,
        last_seq.saturating_sub(HISTORY_MESSAGES - 1),
        HISTORY_MESSAGES as usize,
    )?;
    let mut h = History::default();
    for e in messages {
        match e.body {
            Body::Window(w) => h.windows.push((e.seq, *w)),
            Body::Status(s) => h.statuses.push((e.seq, e.ts_ms, s)),
            _ => {}
        }
    }
    h.assignments = plane
        .rollouts
        .rollouts()?
        .into_iter()
        .filter(|r| r.targets.iter().any(|t| t.device == d.id))
        .collect();
    h.assignments.sort_by_key(|r| r.created_ms);
    Ok(h)
}

/// The PSI threshold a chart draws: the agent's default (bundles and agents may set
/// their own, and features with calibrated thresholds use theirs; the device's own
/// verdict is the marked points).
pub(crate) fn default_psi() -> f64 {
    fleetml_monitor::Thresholds::default().psi
}

/// `GET /ui/devices/{id}`.
pub async fn device(State(c): State<Shared>, user: User, Path(id): Path<String>) -> PageResult {
    let plane: Arc<Plane> = c.plane.clone();
    let detail = crate::api::devices::show_device(State(plane.clone()), Path(id.clone()))
        .await
        .map_err(h::fail(&user))?
        .0;
    let p2 = plane.clone();
    let History {
        windows,
        statuses,
        assignments,
    } = read(move || {
        let d = crate::api::devices::enrolled(&p2, &id)?;
        let last = p2.ingest.store.state(&d.id)?.map_or(0, |s| s.last_seq);
        history(&p2, &d, last)
    })
    .await
    .map_err(h::fail(&user))?;
    let now = now_ms();
    let id = detail["id"].as_str().unwrap_or_default().to_string();
    let models: std::collections::BTreeSet<&str> =
        windows.iter().map(|(_, w)| w.model.as_str()).collect();
    let body = html! {
        h1 { "Device " (id) }
        (h::live("device-live", 5, html! {
            dl.facts {
                dt { "State" } dd { (h::badge(if detail["revoked_ms"].is_u64() { "revoked" } else if detail["online"] == true {
                    if detail["open_alerts"].as_array().is_some_and(|a| !a.is_empty()) { "alerting" } else { "online" } } else { "offline" })) }
                dt { "Last seen" } dd { (h::ago(detail["last_seen_ms"].as_u64(), now)) }
                dt { "Board" } dd { (detail["board"].as_str().unwrap_or("—")) }
                dt { "Agent" } dd { (detail["agent_version"].as_str().unwrap_or("—")) }
                dt { "Outbox backlog" } dd { (detail["outbox_depth"].as_u64().map_or("—".into(), |n| n.to_string())) }
                dt { "Messages stored" } dd { (detail["messages"]) " (duplicates " (detail["duplicates"]) ", gaps " (detail["gaps"]) ")" }
                dt { "Enrolled" } dd { (h::at(detail["enrolled_ms"].as_u64())) }
                dt { "Tags" } dd { @for (k, v) in detail["tags"].as_object().into_iter().flatten() { span.tag { (k) "=" (v.as_str().unwrap_or_default()) } " " } }
                dt { "Open alerts" } dd { @for a in detail["open_alerts"].as_array().into_iter().flatten() { span.badge.b-alerting { (a.as_str().unwrap_or_default()) } " " } }
            }
            h2 { "Models" }
            div.scroll { table {
                thead { tr { th scope="col" { "Model" } th scope="col" { "Running" } th scope="col" { "Backend" } th scope="col" { "Assigned" } } }
                tbody {
                    @for m in detail["models"].as_array().into_iter().flatten() {
                        @let name = m["name"].as_str().unwrap_or_default();
                        @let assigned = detail["assignment"]["models"].as_array().and_then(|a| a.iter().find(|x| x["name"] == name)).and_then(|x| x["version"].as_u64());
                        tr {
                            th scope="row" { a href=(format!("/ui/models/{}", h::segment(name))) { (name) } }
                            td { "v" (m["version"]) }
                            td { (m["backend"].as_str().unwrap_or_default()) }
                            td { (assigned.map_or("—".into(), |v| format!("v{v} (generation {})", detail["assignment"]["generation"]))) }
                        }
                    }
                }
            } }
            h2 { "Latest windows" }
            div.scroll { table {
                thead { tr { th scope="col" { "Model" } th scope="col" { "Window" } th scope="col" { "Ended" } th scope="col" { "Predictions" }
                    th scope="col" { "Missing predictions" } th scope="col" { "Alerts" } } }
                tbody {
                    @for w in detail["windows"].as_array().into_iter().flatten() {
                        tr {
                            th scope="row" { (w["model"].as_str().unwrap_or_default()) " v" (w["version"]) }
                            td.num { (w["window"]) }
                            td { (h::ago(w["end_ms"].as_u64(), now)) }
                            td.num { (w["predictions"]) }
                            td.num { (h::pct(w["missing_prediction_rate"].as_f64())) }
                            td { @for a in w["alerts"].as_array().into_iter().flatten() { span.badge.b-alerting { (a.as_str().unwrap_or_default()) } " " } }
                        }
                    }
                }
            } }
        }))
        @for model in &models {
            @let ws: Vec<&(u64, WindowReport)> = windows.iter().filter(|(_, w)| w.model == *model).collect();
            h2 { (model) ": drift over its last " (ws.len()) " windows" }
            (svg::line_chart(&format!("{model}: PSI per feature on {id}"), "PSI per feature", &psi_series(&ws), Some(default_psi())))
            h2 { (model) ": missing predictions" }
            (svg::line_chart(&format!("{model}: missing-prediction rate on {id}"), "share of inputs without a prediction",
                &[Series { name: "missing-prediction rate".into(), points: ws.iter().map(|(_, w)| (w.end_ms, w.missing_prediction_rate, false)).collect() }], None))
        }
        h2 { "Window history" }
        div.scroll { table #window-history {
            thead { tr { th scope="col" { "Seq" } th scope="col" { "Model" } th scope="col" { "Window" } th scope="col" { "Ended" }
                th scope="col" { "Predictions" } th scope="col" { "Missing" } th scope="col" { "p50 / p95 latency" } th scope="col" { "Alerting" } } }
            tbody { @for (seq, w) in windows.iter().rev().take(50) { tr {
                td.num { (seq) } th scope="row" { (w.model) " v" (w.version) } td.num { (w.window) } td { (h::at(Some(w.end_ms))) }
                td.num { (w.predictions) } td.num { (h::pct(Some(w.missing_prediction_rate))) }
                td.num { (w.latency_us.p50.map_or("—".into(), |v| format!("{:.2} ms", v as f64 / 1000.0))) " / "
                    (w.latency_us.p95.map_or("—".into(), |v| format!("{:.2} ms", v as f64 / 1000.0))) }
                td { (w.alerts.join(", ")) }
            } } }
        } }
        h2 { "Assignment history" }
        div.scroll { table #assignment-history {
            thead { tr { th scope="col" { "Rollout" } th scope="col" { "Kind" } th scope="col" { "Model" } th scope="col" { "From" }
                th scope="col" { "To" } th scope="col" { "Generation" } th scope="col" { "Assigned" } th scope="col" { "Rollout state" } } }
            tbody { @for r in assignments.iter().rev() {
                @if let Some(t) = r.targets.iter().find(|t| t.device.as_str() == id) { tr {
                    th scope="row" { a href=(format!("/ui/rollouts/{}", h::segment(&r.id))) { (r.id) } }
                    td { (r.kind.as_str()) } td { (r.model) }
                    td { (t.from.as_ref().map_or("—".into(), |f| format!("v{}", f.version))) }
                    td { "v" (t.to.version) }
                    td.num { (t.generation.map_or("—".into(), |g| g.to_string())) }
                    td { (h::at(t.assigned_ms)) }
                    td { (h::badge(r.state.as_str())) }
                } }
            } }
        } }
        h2 { "Status history" }
        div.scroll { table #status-history {
            thead { tr { th scope="col" { "Seq" } th scope="col" { "Reported" } th scope="col" { "Agent" } th scope="col" { "Uptime" }
                th scope="col" { "Outbox" } th scope="col" { "Models" } } }
            tbody { @for (seq, at, st) in statuses.iter().rev().take(20) { tr {
                td.num { (seq) } td { (h::at(Some(*at))) } td { (st.agent_version) } td.num { (st.uptime_s) " s" }
                td.num { (st.outbox_depth) }
                td { @for m in &st.models { span.model { (m.name) " v" (m.version) " (" (m.backend) ")" } " " } }
            } } }
        } }
        h2 { "Recent events" }
        div.scroll { table #events {
            thead { tr { th scope="col" { "Seq" } th scope="col" { "Time" } th scope="col" { "Kind" } th scope="col" { "What" } } }
            tbody {
                @for e in detail["recent"].as_array().into_iter().flatten() {
                    tr { td.num { (e["seq"]) } td { (h::at(e["ts_ms"].as_u64())) } td { (e["kind"].as_str().unwrap_or_default()) } td { (e["summary"].as_str().unwrap_or_default()) } }
                }
                @for n in detail["noticed"].as_array().into_iter().flatten() {
                    tr { td { "—" } td { (h::at(n["at_ms"].as_u64())) } td { "noticed" } td { (n["kind"].as_str().unwrap_or_default()) " " (n["detail"].as_str().unwrap_or_default()) } }
                }
            }
        } }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page(&format!("Device {id}"), Some(&user), "/ui/", body),
    ))
}

/// One series per feature (and the prediction): its PSI per window, marked where the
/// device judged it drifting.
pub(crate) fn psi_series(windows: &[&(u64, WindowReport)]) -> Vec<Series> {
    let mut by: std::collections::BTreeMap<String, Vec<(u64, f64, bool)>> = Default::default();
    for (_, w) in windows {
        for f in w.features.iter().chain(w.prediction.iter()) {
            by.entry(f.name.clone())
                .or_default()
                .push((w.end_ms, f.psi, f.drifting));
        }
    }
    by.into_iter()
        .map(|(name, points)| Series { name, points })
        .collect()
}
