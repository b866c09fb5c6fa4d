//! Audit: the newest entries of the audit log with filters (who, action, refused only)
//! and the state of the chain's verification (checked here with the key, as
//! `GET /v1/audit/verify` does). Needs the role `GET /v1/audit` needs.

use axum::extract::{Query, State};
use axum::http::{Method, StatusCode};
use maud::html;

use super::html::{self as h, PageResult};
use super::{Shared, User};
use crate::api::ApiError;
use crate::plane::now_ms;

/// Entries searched by the filters, newest first.
const SEARCHED: u64 = 5_000;
/// Entries shown at most.
const SHOWN: usize = 200;

#[derive(Debug, Default, serde::Deserialize)]
pub struct AuditFilter {
    #[serde(default)]
    who: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    refused: Option<String>,
}

/// `GET /ui/audit`.
pub async fn log(State(c): State<Shared>, user: User, Query(f): Query<AuditFilter>) -> PageResult {
    if !user.may(&Method::GET, "/v1/audit") {
        return Err(h::error_page(
            Some(&user),
            &ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "token `{}` has role {}; the audit log needs operator",
                    user.token.name,
                    user.token.role.as_str()
                ),
            ),
        ));
    }
    let audit = c.plane.audit.clone();
    let keyed_from = audit.key().keyed_from();
    let (verdict, entries) = tokio::task::spawn_blocking(move || {
        let verdict = audit.verify_all(Vec::new())?;
        let last = match &verdict {
            Ok(chain) => chain.checked,
            // A broken chain still lists: page to its end.
            Err(_) => {
                let mut last = 0;
                loop {
                    let page = audit.entries(last + 1, 10_000)?;
                    match page.last() {
                        Some(e) => last = e.seq,
                        None => break last,
                    }
                }
            }
        };
        let entries = audit.entries(last.saturating_sub(SEARCHED - 1).max(1), SEARCHED as usize)?;
        Ok::<_, crate::store::StoreError>((
            verdict.map(|c| (c.checked, c.head().to_string())),
            entries,
        ))
    })
    .await
    .map_err(|e| h::error_page(Some(&user), &ApiError::internal(e)))?
    .map_err(|e| h::error_page(Some(&user), &ApiError::from(e)))?;
    let refused_only = f.refused.is_some();
    let shown: Vec<_> = entries
        .iter()
        .rev()
        .filter(|e| f.who.is_empty() || e.who.contains(&f.who))
        .filter(|e| {
            f.action.is_empty() || e.action.contains(&f.action) || e.target.contains(&f.action)
        })
        .filter(|e| !refused_only || e.outcome >= 400)
        .take(SHOWN)
        .collect();
    let now = now_ms();
    let body = html! {
        h1 { "Audit" }
        @match &verdict {
            Ok((checked, head)) => {
                p.verdict.ok #chain role="status" { (h::badge("intact")) " The chain of " (checked) " entries verifies with the audit key (keyed from entry " (keyed_from) "). Head: " code { (head) } }
            }
            Err(e) => {
                p.verdict.bad #chain role="alert" { (h::badge("broken")) " The chain does not verify: " (e) }
            }
        }
        form.filters method="get" action="/ui/audit" {
            label { "Who " input type="text" name="who" value=(f.who) placeholder="token name or device"; }
            label { "Action or path " input type="text" name="action" value=(f.action) placeholder="rollouts"; }
            label { input type="checkbox" name="refused" value="1" checked[refused_only]; " refused only" }
            button type="submit" { "Filter" }
        }
        p.hint { "The newest " (SHOWN) " matching entries among the last " (SEARCHED) "; the whole log: " code { "fleetctl audit log" } "." }
        div.scroll { table #audit {
            thead { tr { th scope="col" { "#" } th scope="col" { "When" } th scope="col" { "Who" } th scope="col" { "Role" } th scope="col" { "Action" } th scope="col" { "Path" } th scope="col" { "Outcome" } } }
            tbody {
                @for e in &shown { tr {
                    td.num { (e.seq) } td { (h::ago(Some(e.at_ms), now)) } td { (e.who) } td { (e.role) }
                    td { code { (e.action) } } td { code { (e.target) } }
                    td { @if e.outcome >= 400 { (h::badge("refused")) " " } (e.outcome) }
                } }
                @if shown.is_empty() { tr { td colspan="7" { "No entry matches." } } }
            }
        } }
    };
    Ok(h::respond(
        StatusCode::OK,
        h::page("Audit", Some(&user), "/ui/audit", body),
    ))
}
