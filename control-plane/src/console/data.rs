//! Data and training: datasets with their profile reports (the HTML `fleetctl data
//! profile --html` writes), retraining jobs with their trials and live logs, the
//! champion/challenger report, and each model's drift policy with its state.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use maud::html;
use serde_json::Value;

use super::html::{self as h, PageResult};
use super::{Shared, User, read};
use crate::jobs::spec::{Job, JobState};
use crate::plane::now_ms;

fn job_state(s: JobState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `GET /ui/data`.
pub async fn overview(State(c): State<Shared>, user: User) -> PageResult {
    let plane = c.plane.clone();
    let (datasets, mut jobs, policies) = read(move || {
        Ok((
            plane.datasets.list()?,
            plane.jobs.all()?,
            plane.policies.policies()?,
        ))
    })
    .await
    .map_err(h::fail(&user))?;
    jobs.sort_by_key(|j| std::cmp::Reverse(j.created_ms));
    let now = now_ms();
    let body = html! {
        h1 { "Data and training" }
        h2 { "Datasets" }
        div.scroll { table #datasets {
            thead { tr { th scope="col" { "Dataset" } th scope="col" { "Name" } th scope="col" { "Rows" } th scope="col" { "Size" }
                th scope="col" { "Devices" } th scope="col" { "Sources" } th scope="col" { "Created" } th scope="col" { "Profile" } } }
            tbody {
                @for d in &datasets { tr {
                    th scope="row" { (d.id) }
                    td { (d.name) }
                    td.num { (d.rows) }
                    td.num { (format!("{:.1} KiB", d.bytes as f64 / 1024.0)) }
                    td.num { (d.devices.len()) }
                    td { (d.sources.join(", ")) }
                    td { (h::ago(Some(d.created_ms), now)) }
                    td { a href=(format!("/ui/data/datasets/{}/profile", d.id)) { "report" } }
                } }
                @if datasets.is_empty() { tr { td colspan="8" { "No datasets: " code { "fleetctl data import FILE" } " or " code { "fleetctl data from-captures" } } } }
            }
        } }
        h2 { "Retraining jobs" }
        (h::live("jobs-live", 3, html! {
            div.scroll { table #jobs {
                thead { tr { th scope="col" { "Job" } th scope="col" { "Model" } th scope="col" { "Kind" } th scope="col" { "State" }
                    th scope="col" { "Trigger" } th scope="col" { "Trials" } th scope="col" { "Best metric" } th scope="col" { "Candidate" } th scope="col" { "Created" } } }
                tbody {
                    @for j in &jobs { tr {
                        th scope="row" { a href=(format!("/ui/data/jobs/{}", j.id)) { (j.id) } }
                        td { (j.model) } td { (j.kind) } td { (h::badge(&job_state(j.state))) } td { (j.trigger) }
                        td.num { (j.trials.len()) }
                        td.num { (h::num(j.best.and_then(|b| j.trials.get(b)).and_then(|t| t.metric), 4)) }
                        td { (j.candidate.as_ref().map_or("—".into(), |(n, v, _)| format!("{n} v{v}"))) }
                        td { (h::ago(Some(j.created_ms), now)) }
                    } }
                    @if jobs.is_empty() { tr { td colspan="9" { "No jobs: " code { "fleetctl retrain start MODEL --spec job.toml" } } } }
                }
            } }
        }))
        h2 { "Drift policies" }
        @if policies.is_empty() { p.muted { "No model has a retraining policy (" code { "fleetctl policy set MODEL --file policy.toml" } ")." } }
        @for (policy, state) in &policies {
            @let p = serde_json::to_value(policy).unwrap_or(Value::Null);
            @let s = serde_json::to_value(state).unwrap_or(Value::Null);
            h3 { (p["model"].as_str().unwrap_or_default()) }
            div.two {
                div { h4 { "Policy" } pre { (serde_json::to_string_pretty(&p).unwrap_or_default()) } }
                div { h4 { "State and events" } pre { (serde_json::to_string_pretty(&s).unwrap_or_default()) } }
            }
        }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Data and training", Some(&user), "/ui/data", body),
    ))
}

/// `GET /ui/data/datasets/{id}/profile`: the dataset's profile report, audited as the
/// API's read of it is. The report carries its own styles and no script; it is served
/// sandboxed.
pub async fn profile(State(c): State<Shared>, user: User, Path(id): Path<String>) -> PageResult {
    let report = crate::api::data::profile(
        State(c.plane.clone()),
        Path(id.clone()),
        axum::extract::Query(
            serde_json::from_value(serde_json::json!({}))
                .map_err(|e| h::error_page(Some(&user), &crate::api::ApiError::internal(e)))?,
        ),
    )
    .await;
    let status = match &report {
        Ok(_) => 200,
        Err(e) => e.0.as_u16(),
    };
    super::audit(
        &c,
        &user.principal(),
        "GET /ui/data/datasets/{id}/profile",
        &format!("/ui/data/datasets/{id}/profile"),
        status,
    )
    .await;
    let report = report.map_err(h::fail(&user))?.0;
    let page = crate::profile::html(&report, &format!("Dataset {id}"));
    let mut response = (StatusCode::OK, axum::response::Html(page)).into_response();
    response.headers_mut().insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox",
        ),
    );
    Ok(response)
}

/// The last this many bytes of a trial's log are shown.
const LOG_TAIL: usize = 64 << 10;

/// The last [`LOG_TAIL`] bytes of a log (read from there, not whole), or nothing.
fn log_tail(path: &std::path::Path) -> String {
    use std::io::{Read as _, Seek as _};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(LOG_TAIL as u64);
    let mut bytes = Vec::new();
    if f.seek(std::io::SeekFrom::Start(from)).is_err()
        || f.take(LOG_TAIL as u64).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `GET /ui/data/jobs/{id}`: a job's trials, its best trial's log (live while it runs)
/// and its champion/challenger report.
pub async fn job(State(c): State<Shared>, user: User, Path(id): Path<String>) -> PageResult {
    let plane = c.plane.clone();
    let (job, log): (Job, String) = read(move || {
        let job = plane.jobs.get(&id)?.ok_or_else(|| {
            crate::api::ApiError::not_found(format!("no job `{id}` (fleetctl retrain list)"))
        })?;
        let n = job.best.unwrap_or(0);
        Ok((job, log_tail(&plane.jobs.trial_dir(&id, n).join("log"))))
    })
    .await
    .map_err(h::fail(&user))?;
    let now = now_ms();
    let body = html! {
        h1 { "Job " (job.id) ": " (job.model) }
        (h::live("job-live", 2, html! {
            p.summary { (h::badge(&job_state(job.state))) " · " (job.kind) " · trigger " (job.trigger) " · created " (h::ago(Some(job.created_ms), now))
                @if let Some(e) = &job.error { " · " span.error { (e) } } }
            h2 { "Trials" }
            div.scroll { table #trials {
                thead { tr { th scope="col" { "Trial" } th scope="col" { "Parameters" } th scope="col" { "State" } th scope="col" { "Metric" } th scope="col" { "Seconds" } th scope="col" { "Error" } } }
                tbody { @for t in &job.trials { tr {
                    th scope="row" { (t.n) @if job.best == Some(t.n) { " " span.badge.b-pass { "best" } } }
                    td { @for (k, v) in &t.params { code { (k) "=" (v) } " " } }
                    td { (h::badge(&job_state(t.state))) }
                    td.num { (h::num(t.metric, 4)) }
                    td.num { (h::num(t.seconds, 1)) }
                    td { (t.error.clone().unwrap_or_default()) }
                } } }
            } }
            h2 { "Log of trial " (job.best.unwrap_or(0)) }
            pre.log tabindex="0" aria-label="trial log" { (log) }
            @if let Some(report) = &job.report {
                h2 { "Champion against challenger" }
                pre { (serde_json::to_string_pretty(report).unwrap_or_default()) }
            }
        }))
        p { a href="/ui/data" { "Back to data and training" } }
    };
    let mut response = h::respond(
        StatusCode::OK,
        h::page(&format!("Job {}", job.id), Some(&user), "/ui/data", body),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
