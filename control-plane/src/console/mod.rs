//! The operator console: HTML pages at `/ui/` on the API's own listener (TLS when the API
//! has it), rendered on the server with maud, charts as inline SVG, one small script
//! (`static/console.js`, embedded) that refreshes the live parts of a page. Every page
//! reads without JavaScript.
//!
//! Sign-in takes an API token and gives a session cookie (`session`); what a page offers
//! follows the token's role, and every action is checked against the same access rule
//! as the API route it stands for ([`crate::api::access`]), rate-limited and audited like
//! that route. Pages read through the same functions the JSON API answers with, so the
//! console never shows what `fleetctl` would not.
//!
//! Modules: `session` (cookies, CSRF), `html` (layout, tables, times), `svg` (charts),
//! and one per page group: `fleet`, `rollouts`, `models`, `drift`, `data`, `audit`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::ApiError;
use crate::auth::Principal;
use crate::plane::{Plane, now_ms};
use crate::records::TokenRecord;

mod audit;
mod data;
mod drift;
mod fleet;
mod html;
mod models;
mod rollouts;
pub(crate) mod session;
mod svg;

/// What every console handler holds.
pub(crate) struct Console {
    pub plane: Arc<Plane>,
    pub sessions: session::Sessions,
}

pub(crate) type Shared = Arc<Console>;

/// The console's routes, for the API router to merge.
pub fn router<S>(plane: Arc<Plane>) -> Router<S> {
    let secure = plane.public_url.starts_with("https://");
    let console = Arc::new(Console {
        sessions: session::Sessions::new(plane.audit.key(), secure),
        plane,
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(fleet::fleet))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/static/console.css", get(css))
        .route("/ui/static/console.js", get(js))
        .route("/ui/devices/{id}", get(fleet::device))
        .route("/ui/rollouts", get(rollouts::list))
        .route("/ui/rollouts/{id}", get(rollouts::show))
        .route("/ui/rollouts/{id}/{action}", post(rollouts::act))
        .route("/ui/models", get(models::list))
        .route("/ui/models/{name}", get(models::show))
        .route("/ui/models/{name}/diff", get(models::diff))
        .route("/ui/drift", get(drift::heatmap))
        .route("/ui/drift/{model}/{feature}", get(drift::feature))
        .route("/ui/data", get(data::overview))
        .route("/ui/data/datasets/{id}/profile", get(data::profile))
        .route("/ui/data/jobs/{id}", get(data::job))
        .route("/ui/audit", get(audit::log))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// No page may be framed, run another origin's scripts or styles, or be cached.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    if !h.contains_key("content-security-policy") {
        set(
            h,
            "content-security-policy",
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        );
    }
    set(h, "x-content-type-options", "nosniff");
    // `same-origin`, not `no-referrer`: under `no-referrer` browsers send `Origin: null` with
    // a form post, and the same-origin check could not tell the console's own forms.
    set(h, "referrer-policy", "same-origin");
    set(h, "x-frame-options", "DENY");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    response
}

async fn css() -> Response {
    static_file(
        "text/css; charset=utf-8",
        include_str!("static/console.css"),
    )
}

async fn js() -> Response {
    static_file(
        "text/javascript; charset=utf-8",
        include_str!("static/console.js"),
    )
}

fn static_file(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// The signed-in operator of a request: a console session whose token still exists.
/// Without one, pages redirect to the sign-in page (and back after it).
pub(crate) struct User {
    pub token: TokenRecord,
    pub cookie: session::Cookie,
    pub csrf: String,
}

impl User {
    /// Whether the token's role may call the API route that an action stands for.
    pub fn may(&self, method: &Method, route: &str) -> bool {
        self.token.role >= crate::api::access_role(crate::api::access(method, route))
    }

    pub fn principal(&self) -> Principal {
        Principal::Operator(self.token.clone())
    }
}

impl FromRequestParts<Shared> for User {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        console: &Shared,
    ) -> Result<User, Response> {
        let back = || {
            let next = parts
                .uri
                .path_and_query()
                .map_or("/ui/", |p| p.as_str())
                .to_string();
            Redirect::to(&format!("/ui/login?next={}", html::url_escape(&next))).into_response()
        };
        let Some(cookie) = console.sessions.verify(&parts.headers, now_ms()) else {
            return Err(back());
        };
        let plane = console.plane.clone();
        let id = cookie.token_id.clone();
        let token = tokio::task::spawn_blocking(move || plane.tokens.list())
            .await
            .map_err(|e| html::error_page(None, &ApiError::internal(e)))?
            .map_err(|e| html::error_page(None, &ApiError::from(e)))?
            .into_iter()
            .find(|t| t.id == id);
        match token {
            Some(token) => Ok(User {
                csrf: console.sessions.csrf(&cookie),
                token,
                cookie,
            }),
            // Revoked since sign-in: the session ends with it.
            None => Err(back()),
        }
    }
}

#[derive(serde::Deserialize)]
struct Next {
    next: Option<String>,
}

/// Only a path of this console is a place to go back to after sign-in.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with("/ui/")
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control) =>
        {
            n.to_string()
        }
        _ => "/ui/".into(),
    }
}

async fn login_page(axum::extract::Query(q): axum::extract::Query<Next>) -> Response {
    html::login(&safe_next(q.next.as_deref()), None, StatusCode::OK)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    next: Option<String>,
}

/// `POST /ui/login`: the API token becomes a session cookie. Limited per address like
/// every API change; a failed sign-in is counted and audited as the API's
/// unauthenticated calls are.
async fn login(
    State(console): State<Shared>,
    connect: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    origin: session::SameOrigin,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    let plane = &console.plane;
    let next = safe_next(form.next.as_deref());
    if let Some(ip) = connect.map(|c| c.0.0.ip())
        && plane.rate.per_address.check(&ip).is_err()
    {
        return html::login(
            &next,
            Some("Too many attempts from this address; wait a minute and try again."),
            StatusCode::TOO_MANY_REQUESTS,
        );
    }
    if let Err(why) = &origin.0 {
        metrics::counter!("fleetml_control_console_refused_posts_total").increment(1);
        return html::login(
            &next,
            Some(&format!("This sign-in was refused: {why}.")),
            StatusCode::FORBIDDEN,
        );
    }
    let given = form.token.trim().to_string();
    let p = plane.clone();
    let found = tokio::task::spawn_blocking(move || {
        if given.is_empty() {
            Ok(None)
        } else {
            p.tokens.find(&given)
        }
    })
    .await;
    let token = match found {
        Ok(Ok(Some(t))) => t,
        Ok(Ok(None)) => {
            metrics::counter!("fleetml_control_unauthenticated_requests_total").increment(1);
            plane
                .audit
                .refused_unauthenticated(now_ms(), "POST /ui/login");
            return html::login(
                &next,
                Some(
                    "Unknown or revoked API token. Use a token from `fleetctl tokens create` (the bootstrap admin token is in DATA_DIR/admin.token).",
                ),
                StatusCode::UNAUTHORIZED,
            );
        }
        Ok(Err(e)) => return html::error_page(None, &ApiError::from(e)),
        Err(e) => return html::error_page(None, &ApiError::internal(e)),
    };
    let value = match console.sessions.issue(&token, now_ms()) {
        Ok(v) => v,
        Err(e) => return html::error_page(None, &ApiError::internal(e)),
    };
    audit(
        &console,
        &Principal::Operator(token),
        "POST /ui/login",
        "/ui/login",
        303,
    )
    .await;
    let mut response = Redirect::to(&next).into_response();
    if let Ok(v) = HeaderValue::from_str(&console.sessions.set_cookie(&value)) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

/// `POST /ui/logout`: ends the session (CSRF-checked, so no other site can sign an
/// operator out).
async fn logout(
    State(console): State<Shared>,
    user: User,
    origin: session::SameOrigin,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Err(refused) = check_post(&console, &user, &origin, form.csrf.as_deref()) {
        let status = refused.status().as_u16();
        audit(
            &console,
            &user.principal(),
            "POST /ui/logout",
            "/ui/logout",
            status,
        )
        .await;
        return *refused;
    }
    console.sessions.sign_out(&user.cookie, now_ms());
    audit(
        &console,
        &user.principal(),
        "POST /ui/logout",
        "/ui/logout",
        303,
    )
    .await;
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&console.sessions.clear_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// Refuses a post from another origin or without the session's CSRF token (403, with
/// the reason on the page), or over the token's rate limit (429).
pub(crate) fn check_post(
    console: &Console,
    user: &User,
    origin: &session::SameOrigin,
    csrf: Option<&str>,
) -> Result<(), Box<Response>> {
    let refuse = |why: &str| {
        metrics::counter!("fleetml_control_console_refused_posts_total").increment(1);
        html::error_page(Some(user), &ApiError(StatusCode::FORBIDDEN, why.into()))
    };
    if let Err(why) = &origin.0 {
        return Err(Box::new(refuse(&format!(
            "refused: this form was posted from another site: {why}"
        ))));
    }
    if !console.sessions.csrf_ok(&user.cookie, csrf) {
        return Err(Box::new(refuse(
            "refused: the form's CSRF token is missing or not this session's; reload the page and try again",
        )));
    }
    if console
        .plane
        .rate
        .per_principal
        .check(&user.principal().who())
        .is_err()
    {
        return Err(Box::new(html::error_page(
            Some(user),
            &ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "too many changes by this token; retry in a few seconds".into(),
            ),
        )));
    }
    Ok(())
}

/// Appends an audit entry for a console action, as `authorize` does for API calls.
pub(crate) async fn audit(
    console: &Console,
    who: &Principal,
    action: &str,
    target: &str,
    status: u16,
) {
    let (who, role, action, target) = (
        who.who(),
        who.role(),
        action.to_string(),
        target.to_string(),
    );
    let plane = console.plane.clone();
    let written = tokio::task::spawn_blocking(move || {
        plane
            .audit
            .append(now_ms(), who, role, action, target, status)
    })
    .await;
    if !matches!(written, Ok(Ok(_))) {
        tracing::error!("could not write the audit log entry of a console action ({status})");
    }
}

/// Runs a store read off the async threads, as a console page.
pub(crate) async fn read<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::api::blocking(f).await
}
