//! Models: the registry by name and version (stage, tags, signatures, where each runs),
//! a model's page with its lineage and a health matrix version × board (p50/p95
//! latency, missing-prediction rate by reason, drift alerts), and the diff of two
//! versions (the same comparison as `fleetctl models diff`).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use maud::html;
use serde_json::Value;

use super::fleet::{board_of, fleet_states};
use super::html::{self as h, PageResult};
use super::{Shared, User, read};
use crate::plane::now_ms;
use crate::records::ModelRecord;

/// Devices running each (name, version), from their latest status.
fn running_counts(
    states: &[(crate::records::DeviceRecord, crate::records::DeviceState)],
) -> BTreeMap<(String, u64), usize> {
    let mut out = BTreeMap::new();
    for (_, s) in states {
        for m in s.status.iter().flat_map(|(_, st)| st.models.iter()) {
            *out.entry((m.name.clone(), m.version)).or_default() += 1;
        }
    }
    out
}

/// `GET /ui/models`.
pub async fn list(State(c): State<Shared>, user: User) -> PageResult {
    let plane = c.plane.clone();
    let (records, states) = read(move || Ok((plane.registry.list(None)?, fleet_states(&plane)?)))
        .await
        .map_err(h::fail(&user))?;
    let running = running_counts(&states);
    let now = now_ms();
    let body = html! {
        h1 { "Models" }
        div.scroll { table #models {
            thead { tr {
                th scope="col" { "Model" } th scope="col" { "Version" } th scope="col" { "Label" } th scope="col" { "Stage" }
                th scope="col" { "Tags" } th scope="col" { "Signed by" } th scope="col" { "Running on" } th scope="col" { "Pushed" }
            } }
            tbody {
                @for r in &records {
                    tr {
                        th scope="row" { a href=(format!("/ui/models/{}", h::segment(&r.name))) { (r.name) } }
                        td { "v" (r.version) }
                        td { (r.label) }
                        td { (h::badge(&r.stage)) }
                        td { @for (k, v) in &r.tags { span.tag { (k) "=" (v) } " " } }
                        td { (r.signed_by.join(", ")) }
                        td.num { (running.get(&(r.name.clone(), r.version)).copied().unwrap_or(0)) " devices" }
                        td { (h::ago(Some(r.pushed_ms), now)) }
                    }
                }
                @if records.is_empty() { tr { td colspan="8" { "The registry is empty: " code { "fleetctl models push BUNDLE.fmb" } } } }
            }
        } }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Models", Some(&user), "/ui/models", body),
    ))
}

/// One cell of the health matrix.
#[derive(Default)]
struct Health {
    devices: usize,
    p50_us: Vec<u64>,
    p95_us: Vec<u64>,
    predictions: u64,
    missed: BTreeMap<String, u64>,
    alerting_devices: usize,
}

/// `GET /ui/models/{name}`.
pub async fn show(State(c): State<Shared>, user: User, Path(name): Path<String>) -> PageResult {
    let plane = c.plane.clone();
    let n2 = name.clone();
    let (records, states) =
        read(move || Ok((plane.registry.list(Some(&n2))?, fleet_states(&plane)?)))
            .await
            .map_err(h::fail(&user))?;
    let Some(latest) = records.iter().max_by_key(|r| r.version) else {
        return Err(h::error_page(
            Some(&user),
            &crate::api::ApiError::not_found(format!("no model `{name}` in the registry")),
        ));
    };
    let detail = crate::api::models::show_model(
        State(c.plane.clone()),
        Path((name.clone(), latest.version)),
    )
    .await
    .map_err(h::fail(&user))?
    .0;
    let mut matrix: BTreeMap<(u64, String), Health> = BTreeMap::new();
    for (d, s) in &states {
        let Some((_, w)) = s.windows.get(&name) else {
            continue;
        };
        let cell = matrix.entry((w.version, board_of(d, s))).or_default();
        cell.devices += 1;
        cell.p50_us.extend(w.latency_us.p50);
        cell.p95_us.extend(w.latency_us.p95);
        cell.predictions += u64::from(w.predictions);
        for (reason, n) in &w.missed {
            *cell.missed.entry(reason.clone()).or_default() += u64::from(*n);
        }
        if s.alerts.get(&name).is_some_and(|a| !a.is_empty()) {
            cell.alerting_devices += 1;
        }
    }
    let running = running_counts(&states);
    let lineage = &detail["bundle"]["manifest"]["lineage"];
    let versions: Vec<u64> = records.iter().map(|r| r.version).collect();
    let body = html! {
        h1 { "Model " (name) }
        h2 { "Versions" }
        (versions_table(&records, &running))
        h2 { "Health by version and board" }
        p.hint { "From each device's latest window: p50 is the median of the devices' medians, p95 the worst device's p95; the missing-prediction rate counts inputs without a prediction among all inputs." }
        div.scroll { table #health {
            thead { tr {
                th scope="col" { "Version" } th scope="col" { "Board" } th scope="col" { "Devices" } th scope="col" { "p50 latency" }
                th scope="col" { "p95 latency" } th scope="col" { "Missing predictions" } th scope="col" { "By reason" } th scope="col" { "Drift alerts" }
            } }
            tbody {
                @for ((version, board), cell) in &matrix {
                    @let missed: u64 = cell.missed.values().sum();
                    @let total = cell.predictions + missed;
                    tr {
                        th scope="row" { "v" (version) } td { (board) } td.num { (cell.devices) }
                        td.num { (median(&cell.p50_us).map_or("—".into(), |v| format!("{:.2} ms", v as f64 / 1000.0))) }
                        td.num { (cell.p95_us.iter().max().map_or("—".into(), |v| format!("{:.2} ms", *v as f64 / 1000.0))) }
                        td.num { (h::pct((total > 0).then(|| missed as f64 / total as f64))) }
                        td { @for (reason, n) in &cell.missed { (reason) ": " (n) " " } }
                        td.num { (cell.alerting_devices) " devices" }
                    }
                }
                @if matrix.is_empty() { tr { td colspan="8" { "No device has reported a window of this model yet." } } }
            }
        } }
        h2 { "Lineage of v" (latest.version) }
        (json_facts(lineage))
        h2 { "Compare two versions" }
        form.filters method="get" action=(format!("/ui/models/{}/diff", h::segment(&name))) {
            label { "From " select name="a" { @for v in &versions { option value=(v) selected[Some(v) == versions.iter().rev().nth(1)] { "v" (v) } } } }
            label { "To " select name="b" { @for v in &versions { option value=(v) selected[*v == latest.version] { "v" (v) } } } }
            button type="submit" { "Diff" }
        }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page(&format!("Model {name}"), Some(&user), "/ui/models", body),
    ))
}

fn versions_table(
    records: &[ModelRecord],
    running: &BTreeMap<(String, u64), usize>,
) -> maud::Markup {
    html! {
        div.scroll { table {
            thead { tr { th scope="col" { "Version" } th scope="col" { "Stage" } th scope="col" { "Tags" } th scope="col" { "Signed by" }
                th scope="col" { "Digest" } th scope="col" { "Size" } th scope="col" { "Running on" } } }
            tbody { @for r in records.iter().rev() { tr {
                th scope="row" { "v" (r.version) }
                td { (h::badge(&r.stage)) }
                td { @for (k, v) in &r.tags { span.tag { (k) "=" (v) } " " } }
                td { (r.signed_by.join(", ")) }
                td { code { (r.digest.get(..16).unwrap_or(&r.digest)) "…" } }
                td.num { (format!("{:.1} KiB", r.size as f64 / 1024.0)) }
                td.num { (running.get(&(r.name.clone(), r.version)).copied().unwrap_or(0)) " devices" }
            } } }
        } }
    }
}

fn median(v: &[u64]) -> Option<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

/// A JSON object as a definition list, its leaves flattened to `a.b[2].c` keys as
/// `fleetctl models diff` names them.
fn json_facts(v: &Value) -> maud::Markup {
    let mut leaves = BTreeMap::new();
    if !v.is_null() {
        crate::views::flatten("", v, &mut leaves);
    }
    html! {
        @if leaves.is_empty() { p.muted { "No lineage recorded." } }
        @else { dl.facts { @for (k, x) in &leaves { dt { (k) } dd { (x) } } } }
    }
}

#[derive(serde::Deserialize)]
pub struct DiffQuery {
    a: u64,
    b: u64,
}

/// `GET /ui/models/{name}/diff?a=V&b=W`.
pub async fn diff(
    State(c): State<Shared>,
    user: User,
    Path(name): Path<String>,
    Query(q): Query<DiffQuery>,
) -> PageResult {
    let show =
        |v: u64| crate::api::models::show_model(State(c.plane.clone()), Path((name.clone(), v)));
    let a = show(q.a).await.map_err(h::fail(&user))?.0;
    let b = show(q.b).await.map_err(h::fail(&user))?.0;
    let (count, text) =
        crate::views::model_diff(&a, &b, &format!("v{}", q.a), &format!("v{}", q.b));
    let body = html! {
        h1 { (name) ": v" (q.a) " against v" (q.b) }
        p { (count) " differences in lineage, features, inputs, monitoring settings and reference profile." }
        pre.diff { (text) }
        p { a href=(format!("/ui/models/{}", h::segment(&name))) { "Back to " (name) } }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page(&format!("{name} diff"), Some(&user), "/ui/models", body),
    ))
}
