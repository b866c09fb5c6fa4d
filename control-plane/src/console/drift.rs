//! Drift: per model a heatmap of features × devices of the chosen statistic from each
//! device's latest window (the rows `fleetctl drift` prints), open alerts marked; per
//! feature its score over time on the devices where it is highest, against the
//! threshold, and the reference against the current distribution of the bins that
//! moved most in a chosen window.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use fleetml_protocol::telemetry::{Body, DeviceId};
use maud::html;
use serde_json::Value;

use super::fleet::{default_psi, fleet_states};
use super::html::{self as h, PageResult};
use super::svg::{self, Series};
use super::{Shared, User, read};
use crate::plane::now_ms;

/// The statistics a heatmap can show, with the threshold the agent uses by default
/// (`fleetml_monitor::Thresholds`; none where it judges by another statistic).
fn stats() -> [(&'static str, &'static str, Option<f64>); 6] {
    let t = fleetml_monitor::Thresholds::default();
    [
        ("psi", "PSI", Some(t.psi)),
        ("js", "Jensen–Shannon", Some(t.js)),
        ("ks", "Kolmogorov–Smirnov", None),
        ("wasserstein", "Wasserstein (reference sd)", None),
        // The agent's `missing_rate` judges missing predictions, not a feature's
        // missing values: no threshold to draw.
        ("missing_rate", "missing values", None),
        ("unseen_rate", "unseen categories", Some(t.unseen_rate)),
    ]
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct HeatQuery {
    model: Option<String>,
    stat: Option<String>,
}

/// `GET /ui/drift`.
pub async fn heatmap(
    State(c): State<Shared>,
    user: User,
    Query(q): Query<HeatQuery>,
) -> PageResult {
    let plane = c.plane.clone();
    let (states, registered) = read(move || {
        let states = fleet_states(&plane)?
            .into_iter()
            .map(|(d, s)| (d.id, s))
            .collect::<Vec<_>>();
        Ok((states, plane.registry.list(None)?))
    })
    .await
    .map_err(h::fail(&user))?;
    // The registry's models and any a device reports windows of.
    let models: BTreeSet<String> = states
        .iter()
        .flat_map(|(_, s)| s.windows.keys().cloned())
        .chain(registered.into_iter().map(|r| r.name))
        .collect();
    let model = q
        .model
        .filter(|m| models.contains(m))
        .or_else(|| models.iter().next().cloned());
    let stats = stats();
    let stat = stats
        .iter()
        .find(|(k, _, _)| Some(*k) == q.stat.as_deref())
        .unwrap_or(&stats[0]);
    let rows = crate::views::drift_rows(&states, model.as_deref());
    // feature → device → row
    let mut grid: BTreeMap<String, BTreeMap<String, &Value>> = BTreeMap::new();
    let mut devices = BTreeSet::new();
    for r in &rows {
        if r.get(stat.0).is_none() {
            continue;
        }
        let (f, d) = (
            r["feature"].as_str().unwrap_or_default(),
            r["device"].as_str().unwrap_or_default(),
        );
        devices.insert(d.to_string());
        grid.entry(f.to_string())
            .or_default()
            .insert(d.to_string(), r);
    }
    let max = rows
        .iter()
        .filter_map(|r| r[stat.0].as_f64())
        .fold(0.0f64, f64::max);
    let alerts = rows.iter().filter(|r| r["alerting"] == true).count();
    let body = html! {
        h1 { "Drift" }
        form.filters method="get" action="/ui/drift" {
            label { "Model " select name="model" { @for m in &models { option value=(m) selected[Some(m) == model.as_ref()] { (m) } } } }
            label { "Statistic " select name="stat" { @for (k, label, _) in stats { option value=(k) selected[k == stat.0] { (label) } } } }
            button type="submit" { "Show" }
        }
        (h::live("drift-live", 5, html! {
            @if let Some(model) = &model {
                p.summary { strong #alert-count { (alerts) } " alerting (feature, device) pairs for " (model) " · " (stat.1)
                    @if let Some(t) = stat.2 { " · agent default threshold " (t) } " · as of " (h::at(Some(now_ms()))) }
                div.scroll { table #heatmap.heatmap {
                    caption { (stat.1) " of each feature (rows) on each device (columns), latest window" }
                    thead { tr { th scope="col" { "Feature" } @for d in &devices { th scope="col" { a href=(format!("/ui/devices/{d}")) { (d) } } } } }
                    tbody { @for (feature, by) in &grid { tr {
                        th scope="row" { a href=(format!("/ui/drift/{}/{}", h::segment(model), h::segment(feature))) { (feature) } }
                        @for d in &devices {
                            @match by.get(d) {
                                None => { td.h-none { "—" } }
                                Some(r) => {
                                    @let v = r[stat.0].as_f64();
                                    @let alerting = r["alerting"] == true;
                                    @let level = if alerting { "h-alert".to_string() } else if r["drifting"] == true { "h-drift".into() } else { grade(v, stat.2, max) };
                                    td class=(level) data-device=(d) data-feature=(feature) data-alerting=(alerting) {
                                        (h::num(v, 3)) @if alerting { " " span.flag { "alert" } } @else if r["drifting"] == true { " " span.flag { "drifting" } }
                                    }
                                }
                            }
                        }
                    } } }
                } }
                p.legend { span.h-legend.h-g0 { "low" } " " span.h-legend.h-g2 { "near threshold" } " " span.h-legend.h-drift { "drifting this window" } " " span.h-legend.h-alert { "alert open" } }
            } @else {
                p { "No device has reported a monitoring window yet." }
            }
        }))
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Drift", Some(&user), "/ui/drift", body),
    ))
}

/// The colour step of a value: against the threshold when there is one, else against
/// the largest value shown.
fn grade(v: Option<f64>, threshold: Option<f64>, max: f64) -> String {
    let Some(v) = v.filter(|v| v.is_finite()) else {
        return "h-none".into();
    };
    let scale = threshold.unwrap_or(max).max(1e-12);
    let step = ((v / scale) * 3.0).floor().clamp(0.0, 3.0) as u32;
    format!("h-g{step}")
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct FeatureQuery {
    /// Whose windows the reference-against-current chart takes (default: any).
    device: Option<String>,
    /// Which window (default: the newest with moved bins).
    window: Option<u64>,
}

/// The bins that moved most in one window: (device, window, [(bin, reference, current)]).
type Moved = (String, u64, Vec<(String, f64, f64)>);

/// Devices a feature chart draws at most (those with the highest latest PSI).
const CHART_DEVICES: usize = 8;

/// `GET /ui/drift/{model}/{feature}`.
pub async fn feature(
    State(c): State<Shared>,
    user: User,
    Path((model, feature)): Path<(String, String)>,
    Query(q): Query<FeatureQuery>,
) -> PageResult {
    let plane = c.plane.clone();
    let (m2, f2) = (model.clone(), feature.clone());
    let (series, moved, choices) = read(move || {
        let states: Vec<(DeviceId, crate::records::DeviceState)> = fleet_states(&plane)?
            .into_iter()
            .map(|(d, s)| (d.id, s))
            .collect();
        // The devices where the feature's latest PSI is highest.
        let mut ranked: Vec<(f64, &DeviceId, u64)> = states
            .iter()
            .filter_map(|(id, s)| {
                let (_, w) = s.windows.get(&m2)?;
                let f = w
                    .features
                    .iter()
                    .chain(w.prediction.iter())
                    .find(|f| f.name == f2)?;
                Some((f.psi, id, s.last_seq))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
        ranked.truncate(CHART_DEVICES);
        let mut series = Vec::new();
        let mut moved: Option<Moved> = None;
        // Windows with moved bins to choose from: (device, window).
        let mut choices: Vec<(String, u64)> = Vec::new();
        for (_, id, last) in ranked {
            let messages = plane
                .ingest
                .store
                .messages(id, last.saturating_sub(499), 500)?;
            let mut points = Vec::new();
            for e in messages {
                let Body::Window(w) = e.body else { continue };
                if w.model != m2 {
                    continue;
                }
                if let Some(f) = w
                    .features
                    .iter()
                    .chain(w.prediction.iter())
                    .find(|f| f.name == f2)
                {
                    points.push((w.end_ms, f.psi, f.drifting));
                    if !f.moved.is_empty() {
                        choices.push((id.to_string(), w.window));
                    }
                    let wanted = q.device.as_deref().is_none_or(|d| d == id.as_str())
                        && q.window.is_none_or(|n| n == w.window);
                    if wanted && !f.moved.is_empty() {
                        moved = Some((
                            id.to_string(),
                            w.window,
                            f.moved
                                .iter()
                                .map(|b| (b.bin.clone(), b.reference, b.current))
                                .collect(),
                        ));
                    }
                }
            }
            series.push(Series {
                name: id.to_string(),
                points,
            });
        }
        Ok((series, moved, choices))
    })
    .await
    .map_err(h::fail(&user))?;
    let body = html! {
        h1 { (model) ": " (feature) }
        p.hint { "PSI per window on the " (series.len()) " devices where it is highest now (at most " (CHART_DEVICES) "). The dashed line is the agent's default threshold; a bundle or agent may set another, and features with calibrated thresholds use theirs — the filled dots are the windows the device itself judged drifting." }
        (h::live("feature-live", 5, html! {
            (svg::line_chart(&format!("{model} {feature}: PSI over time"), "PSI", &series, Some(default_psi())))
            h2 { "Reference against current" }
            @match &moved {
                Some((device, window, bins)) => {
                    p { "Bins that moved most in window " (window) " on " a href=(format!("/ui/devices/{device}")) { (device) } ":" }
                    (svg::paired_bars(&format!("{feature}: reference against window {window} on {device}"), bins))
                }
                None => { p.muted { "No recent window of these devices reports moved bins for this feature (the agent reports them while a feature alerts)." } }
            }
            @if !choices.is_empty() {
                p { "Other windows with moved bins: "
                    @for (device, window) in choices.iter().rev().take(20) {
                        a href=(format!("/ui/drift/{}/{}?device={}&window={window}", h::segment(&model), h::segment(&feature), h::url_escape(device))) { (device) " #" (window) } " "
                    }
                }
            }
        }))
        p { a href=(format!("/ui/drift?model={}", h::url_escape(&model))) { "Back to the heatmap" } }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page(
            &format!("{model} {feature}"),
            Some(&user),
            "/ui/drift",
            body,
        ),
    ))
}
