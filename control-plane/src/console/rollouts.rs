//! Rollouts: the list, and a rollout's page with a progress bar per wave (waiting,
//! pending, downloading, active, failed), each gate's limit, value and verdict, why it
//! paused or rolled back, its timeline and its devices; pause, resume, abort and
//! rollback buttons for a token whose role may (each asks for confirmation first, and
//! is audited).

use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect};
use maud::{Markup, html};

use super::html::{self as h, PageResult};
use super::svg::{self, Segment};
use super::{Shared, User, check_post};
use crate::api::ApiError;
use crate::api::types::{RolloutSummary, RolloutView};
use crate::plane::now_ms;
use crate::rollout::State as RState;

const PROGRESS: [&str; 5] = ["waiting", "pending", "downloading", "active", "failed"];

/// `GET /ui/rollouts`.
pub async fn list(State(c): State<Shared>, user: User) -> PageResult {
    let list = crate::api::rollouts::list_rollouts(State(c.plane.clone()))
        .await
        .map_err(h::fail(&user))?
        .0;
    let mut list: Vec<RolloutSummary> = list;
    list.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    let now = now_ms();
    let body = html! {
        h1 { "Rollouts" }
        p.hint { "Start one with " code { "fleetctl rollout start MODEL@VERSION --to SELECTOR" } "." }
        (h::live("rollouts-live", 3, html! {
            div.scroll { table #rollouts {
                thead { tr {
                    th scope="col" { "Rollout" } th scope="col" { "Kind" } th scope="col" { "Model" }
                    th scope="col" { "State" } th scope="col" { "Active" } th scope="col" { "Selector" }
                    th scope="col" { "Started" } th scope="col" { "By" } th scope="col" { "Why" }
                } }
                tbody {
                    @for r in &list {
                        tr data-rollout=(r.id) {
                            th scope="row" { a href=(format!("/ui/rollouts/{}", r.id)) { (r.id) } }
                            td { (r.kind.as_str()) }
                            td { (r.model) (r.version.map_or(String::new(), |v| format!(" v{v}"))) }
                            td { (h::badge(r.state.as_str())) }
                            td.num { (r.devices_active) " / " (r.devices_total) }
                            td { code { (r.selector) } }
                            td { (h::ago(Some(r.created_ms), now)) }
                            td { (r.by) }
                            td { (r.reason.clone().unwrap_or_default()) }
                        }
                    }
                    @if list.is_empty() { tr { td colspan="9" { "No rollouts yet." } } }
                }
            } }
        }))
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Rollouts", Some(&user), "/ui/rollouts", body),
    ))
}

async fn view(c: &Shared, user: &User, id: &str) -> Result<RolloutView, axum::response::Response> {
    Ok(
        crate::api::rollouts::show_rollout(State(c.plane.clone()), Path(id.to_string()))
            .await
            .map_err(h::fail(user))?
            .0,
    )
}

/// The actions a rollout in `state` offers: (action, label, the API route it is).
fn actions(v: &RolloutView) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    match v.state {
        RState::Running => out.push(("pause", "Pause", "/v1/rollouts/{id}/pause")),
        RState::Paused => out.push(("resume", "Resume", "/v1/rollouts/{id}/resume")),
        _ => {}
    }
    if !v.state.is_final() {
        out.push(("abort", "Abort", "/v1/rollouts/{id}/abort"));
    }
    if v.shadow.is_some()
        && !matches!(v.state, RState::Aborted | RState::RolledBack)
        && !v
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("promoted"))
    {
        out.push(("promote", "Promote", "/v1/rollouts/{id}/promote"));
    }
    if v.kind == crate::rollout::Kind::Rollout {
        out.push(("rollback", "Roll back", "/v1/rollbacks"));
    }
    out
}

/// A shadow rollout's comparison: per board, then per device.
fn shadow_table(v: &RolloutView) -> Markup {
    let Some(sh) = &v.shadow else {
        return html! {};
    };
    let pct = |x: Option<f64>| x.map_or("—".to_string(), |a| format!("{:.1} %", a * 100.0));
    let ms = |x: Option<f64>| x.map_or("—".to_string(), |u| format!("{:.2} ms", u / 1000.0));
    html! {
        h2 { "Shadow v" (sh.version) }
        p { "Runs beside what each device serves on " (f64::from(sh.sample_permille) / 10.0)
            " % of requests, after they are answered; it never answers. From each device's newest window." }
        div.scroll { table #shadow {
            thead { tr { th scope="col" { "Board / device" } th scope="col" { "Rows" } th scope="col" { "Shed" }
                th scope="col" { "Agreement" } th scope="col" { "Mean |difference|" } th scope="col" { "p95 shadow" }
                th scope="col" { "p95 served" } th scope="col" { "Shadow alerts" } } }
            tbody {
                @for (rows, device) in [(&sh.boards, false), (&sh.devices, true)] {
                    @for r in rows { tr {
                        th scope="row" {
                            @if device { a href=(format!("/ui/devices/{}", r.name)) { (r.name) } } @else { "board " (r.name) }
                        }
                        td.num { (r.rows) }
                        td.num { (r.shed) }
                        td.num { (pct(r.agreement)) }
                        td.num { (h::num(r.mean_abs_error, 4)) }
                        td.num { (ms(r.shadow_p95_us)) }
                        td.num { (ms(r.served_p95_us)) }
                        td { (r.alerts.join(", ")) }
                    } }
                }
            }
        } }
    }
}

fn wave_bars(v: &RolloutView) -> Markup {
    html! {
        ol.waves {
            @for w in &v.waves {
                li.wave data-wave=(w.wave) {
                    div.wave-head {
                        strong { "Wave " (w.wave) } " · " (w.percent) " % of the selection · " (w.devices) " devices · "
                        @match (w.started_ms, w.passed_ms) {
                            (_, Some(p)) => { "passed " (h::at(Some(p))) }
                            (Some(s), None) => { "started " (h::at(Some(s))) }
                            (None, None) => { "not started" }
                        }
                    }
                    (svg::stacked_bar(&format!("wave {}", w.wave), &PROGRESS.map(|k| Segment {
                        class: k, label: k, count: w.counts.get(k).copied().unwrap_or(0),
                    })))
                    p.counts {
                        @for k in PROGRESS {
                            span class=(format!("key seg-{k}")) { "■ " } (k) " " span data-count-of=(k) { (w.counts.get(k).copied().unwrap_or(0)) } " "
                        }
                    }
                }
            }
        }
    }
}

/// `GET /ui/rollouts/{id}`.
pub async fn show(State(c): State<Shared>, user: User, Path(id): Path<String>) -> PageResult {
    let v = view(&c, &user, &id).await?;
    let now = now_ms();
    let body = html! {
        h1 { (v.kind.as_str()) " " (v.id) ": " (v.model) (v.version.map_or(String::new(), |x| format!(" v{x}"))) }
        // Outside the live region: a refresh never takes a button from under the
        // pointer or the keyboard focus (a stale button is refused by the server).
        div.actions {
            @for (action, label, route) in actions(&v) {
                @if user.may(&Method::POST, route) {
                    (h::action_button(&user, &format!("/ui/rollouts/{}/{action}", v.id), label, &[]))
                }
            }
        }
        (h::live("rollout-live", 2, html! {
            p.summary {
                (h::badge(v.state.as_str())) " "
                strong #active-count { (v.devices_active) " / " (v.devices_total) } " devices active · selector "
                code { (v.selector) } " · by " (v.by) " · updated " (h::ago(Some(v.updated_ms), now))
            }
            @if let Some(reason) = &v.reason {
                p.reason role="status" { strong { "Why: " } (reason) }
            }
            h2 { "Waves" }
            (wave_bars(&v))
            @if !v.gates.is_empty() {
                h2 { "Gates" }
                div.scroll { table #gates {
                    thead { tr { th scope="col" { "Gate" } th scope="col" { "Limit" } th scope="col" { "Now" } th scope="col" { "Verdict" } } }
                    tbody { @for g in &v.gates { tr {
                        th scope="row" { (g.gate) }
                        td.num { (h::num(g.threshold, 3)) }
                        td.num { (h::num(g.value, 3)) }
                        td { (h::badge(if g.ok { "pass" } else { "fail" })) }
                    } } }
                } }
            }
            (shadow_table(&v))
            h2 { "Timeline" }
            ol.timeline {
                li { (h::at(Some(v.created_ms))) " created by " (v.by) }
                @for w in &v.waves {
                    @if let Some(s) = w.started_ms { li { (h::at(Some(s))) " wave " (w.wave) " started" } }
                    @if let Some(p) = w.passed_ms { li { (h::at(Some(p))) " wave " (w.wave) " passed its gates" } }
                }
                @if v.updated_ms > v.created_ms { li { (h::at(Some(v.updated_ms))) " " (v.state.as_str()) (v.reason.as_ref().map_or(String::new(), |r| format!(": {r}"))) } }
            }
            h2 { "Devices" }
            div.scroll { table #rollout-devices {
                thead { tr { th scope="col" { "Device" } th scope="col" { "Wave" } th scope="col" { "From" } th scope="col" { "To" }
                    th scope="col" { "Progress" } th scope="col" { "Online" } th scope="col" { "Detail" } } }
                tbody { @for d in &v.devices { tr {
                    th scope="row" { a href=(format!("/ui/devices/{}", d.device)) { (d.device) } }
                    td.num { (d.wave) }
                    td { (d.from.map_or("—".into(), |f| format!("v{f}"))) }
                    td { "v" (d.to) }
                    td { (h::badge(&d.state)) }
                    td { (if d.online { "yes" } else { "no" }) }
                    td { (d.detail) }
                } } }
            } }
        }))
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page(
            &format!("Rollout {}", v.id),
            Some(&user),
            "/ui/rollouts",
            body,
        ),
    ))
}

#[derive(serde::Deserialize)]
pub struct ActForm {
    csrf: Option<String>,
    #[serde(default)]
    confirm: String,
}

/// `POST /ui/rollouts/{id}/{action}`: pause, resume, abort or rollback. Without
/// `confirm=yes` it answers the confirmation page (a rollback's shows what would move);
/// with it, it acts as the API route would, for a role that may call that route, and
/// audits the action.
pub async fn act(
    State(c): State<Shared>,
    user: User,
    origin: super::session::SameOrigin,
    Path((id, action)): Path<(String, String)>,
    axum::Form(form): axum::Form<ActForm>,
) -> PageResult {
    let audit_action = format!("POST /ui/rollouts/{{id}}/{action}");
    let target = format!("/ui/rollouts/{id}/{action}");
    // A refused post (another origin, no CSRF token, over the rate) is audited like the
    // API's refused changes.
    if let Err(refused) = check_post(&c, &user, &origin, form.csrf.as_deref()) {
        let status = refused.status().as_u16();
        super::audit(&c, &user.principal(), &audit_action, &target, status).await;
        return Err(*refused);
    }
    let route = match action.as_str() {
        "pause" => "/v1/rollouts/{id}/pause",
        "resume" => "/v1/rollouts/{id}/resume",
        "abort" => "/v1/rollouts/{id}/abort",
        "promote" => "/v1/rollouts/{id}/promote",
        "rollback" => "/v1/rollbacks",
        other => {
            return Err(h::error_page(
                Some(&user),
                &ApiError::not_found(format!(
                    "no console action `{other}`: pause, resume, abort or rollback"
                )),
            ));
        }
    };
    if !user.may(&Method::POST, route) {
        super::audit(&c, &user.principal(), &audit_action, &target, 403).await;
        return Err(h::error_page(
            Some(&user),
            &ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "token `{}` has role {}; {action} needs {} (POST {route})",
                    user.token.name,
                    user.token.role.as_str(),
                    crate::api::access_role(crate::api::access(&Method::POST, route)).as_str()
                ),
            ),
        ));
    }
    let v = view(&c, &user, &id).await?;
    let rollback = crate::rollout::start::RollbackRequest {
        model: v.model.clone(),
        to: None,
        devices: Some(v.selector.clone()),
        dry_run: form.confirm != "yes",
    };
    if form.confirm != "yes" {
        let plan = if action == "rollback" {
            Some(
                crate::api::rollouts::start_rollback(
                    State(c.plane.clone()),
                    axum::Extension(user.principal()),
                    axum::Json(rollback),
                )
                .await
                .map_err(h::fail(&user))?
                .1
                .0,
            )
        } else {
            None
        };
        return Ok(confirm_page(&user, &v, &action, plan.as_ref()));
    }
    let plane = c.plane.clone();
    let done: Result<String, ApiError> = match action.as_str() {
        "rollback" => crate::api::rollouts::start_rollback(
            State(plane),
            axum::Extension(user.principal()),
            axum::Json(rollback),
        )
        .await
        .map(|(_, body)| body.0["id"].as_str().unwrap_or(&id).to_string()),
        "promote" => {
            let (p, id2, by) = (plane.clone(), id.clone(), user.principal().who());
            crate::api::blocking(move || Ok(crate::rollout::start::promote(&p, &id2, by)?))
                .await
                .map(|r| r.id)
        }
        a => {
            let to = match a {
                "pause" => RState::Paused,
                "resume" => RState::Running,
                _ => RState::Aborted,
            };
            let (p, id2) = (plane.clone(), id.clone());
            crate::api::blocking(move || Ok(crate::rollout::start::control(&p, &id2, to)?))
                .await
                .map(|_| id.clone())
        }
    };
    let status = match &done {
        Ok(_) => 303,
        Err(e) => e.0.as_u16(),
    };
    super::audit(&c, &user.principal(), &audit_action, &target, status).await;
    match done {
        Ok(to) => {
            tracing::info!(rollout = %id, action, by = %user.token.name, "console action");
            Ok(Redirect::to(&format!("/ui/rollouts/{to}")).into_response())
        }
        Err(e) => Err(h::error_page(Some(&user), &e)),
    }
}

fn confirm_page(
    user: &User,
    v: &RolloutView,
    action: &str,
    plan: Option<&serde_json::Value>,
) -> axum::response::Response {
    let what = match action {
        "pause" => "Pause: no further devices are assigned until it is resumed; devices already assigned keep what they have.".to_string(),
        "resume" => "Resume: the rollout continues with its waves and gates.".to_string(),
        "abort" => "Abort: the rollout stops for good; devices already assigned keep what they have (roll back to return them).".to_string(),
        "promote" => format!("Promote: v{} becomes what the devices this shadow reached serve, as a new rollout with the same waves and gates. Refused while a gate fails or a shadow gate has no comparison yet.", v.version.unwrap_or_default()),
        _ => format!("Roll back {}: each device of selector `{}` returns to its previous version as a new assignment generation.", v.model, v.selector),
    };
    let body = html! {
        h1 { "Confirm: " (action) " " (v.id) }
        p { (what) }
        @if let Some(plan) = plan {
            h2 { "What would move" }
            div.scroll { table #plan {
                thead { tr { th scope="col" { "Device" } th scope="col" { "From" } th scope="col" { "To" } } }
                tbody {
                    @for m in plan["devices"].as_array().into_iter().flatten() {
                        tr { th scope="row" { (m["device"].as_str().unwrap_or_default()) } td { (m["from"]) } td { (m["to"]) } }
                    }
                    @for s in plan["skipped"].as_array().into_iter().flatten() {
                        tr { th scope="row" { (s["device"].as_str().unwrap_or_default()) } td colspan="2" { "skipped: " (s["reason"].as_str().unwrap_or_default()) } }
                    }
                }
            } }
        }
        div.actions {
            (h::action_button(user, &format!("/ui/rollouts/{}/{action}", v.id), &format!("Yes, {action}"), &[("confirm", "yes")]))
            " " a.button href=(format!("/ui/rollouts/{}", v.id)) { "Cancel" }
        }
    };
    h::respond(
        StatusCode::OK,
        h::page(
            &format!("Confirm {action}"),
            Some(user),
            "/ui/rollouts",
            body,
        ),
    )
}
