//! The console's page frame and the small pieces every page uses: navigation, the
//! sign-in and error pages, times ("3m ago" with the UTC time beside), badges, forms
//! that carry the CSRF token.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::User;
use crate::api::ApiError;

/// The page groups, as the navigation lists them: (path, label).
pub const SECTIONS: [(&str, &str); 6] = [
    ("/ui/", "Fleet"),
    ("/ui/rollouts", "Rollouts"),
    ("/ui/models", "Models"),
    ("/ui/drift", "Drift"),
    ("/ui/data", "Data and training"),
    ("/ui/audit", "Audit"),
];

/// A whole page: header with navigation and the signed-in token, then `body`.
pub fn page(title: &str, user: Option<&User>, section: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · fleetml" }
                link rel="stylesheet" href="/ui/static/console.css";
                script src="/ui/static/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/" { "fleetml" }
                    @if let Some(u) = user {
                        nav aria-label="Sections" {
                            ul {
                                @for (href, label) in SECTIONS {
                                    li {
                                        @if href == section {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        div.who {
                            span #signed-in { (u.token.name) " · " (u.token.role.as_str()) }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(u.csrf);
                                button #sign-out type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

pub fn respond(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

/// The sign-in page; `error` says why the last try failed.
pub fn login(next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(e) = error {
            p.error role="alert" { (e) }
        }
        form.login method="post" action="/ui/login" {
            input type="hidden" name="next" value=(next);
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="off" required;
            p.hint {
                "A token from " code { "fleetctl tokens create NAME --role viewer|operator|admin" }
                ". What the console offers follows its role; the session ends after 8 hours, on sign-out, or when the token is revoked."
            }
            button type="submit" { "Sign in" }
        }
    };
    respond(status, page("Sign in", None, "", body))
}

/// An error as a page: the status, and the message naming what was wrong.
pub fn error_page(user: Option<&User>, e: &ApiError) -> Response {
    let body = html! {
        h1 { (e.0.as_u16()) " " (e.0.canonical_reason().unwrap_or("")) }
        p.error role="alert" { (e.1) }
        p { a href="/ui/" { "Back to the fleet" } }
    };
    respond(e.0, page("Error", user, "", body))
}

/// A console page or the error page.
pub type PageResult = Result<Response, Response>;

/// Turns an API error into its page.
pub fn fail(user: &User) -> impl Fn(ApiError) -> Response + '_ {
    move |e| error_page(Some(user), &e)
}

/// "12s ago", "3m ago", … or "never"; the exact UTC time in the title.
pub fn ago(ms: Option<u64>, now_ms: u64) -> Markup {
    match ms {
        None => html! { span.muted { "never" } },
        Some(t) => {
            let s = now_ms.saturating_sub(t) / 1000;
            let text = match s {
                0..60 => format!("{s}s ago"),
                60..3600 => format!("{}m ago", s / 60),
                3600..86400 => format!("{}h {}m ago", s / 3600, s % 3600 / 60),
                _ => format!("{}d ago", s / 86400),
            };
            html! { time datetime=(crate::views::utc(t)) title=(crate::views::utc(t)) { (text) } }
        }
    }
}

/// A UTC time.
pub fn at(ms: Option<u64>) -> Markup {
    match ms {
        None => html! { span.muted { "—" } },
        Some(t) => html! { time datetime=(crate::views::utc(t)) { (crate::views::utc(t)) } },
    }
}

/// A state word as a coloured badge; the word is always shown (colour is never the only
/// sign).
pub fn badge(word: &str) -> Markup {
    let class = format!("badge b-{}", word.replace([' ', '_'], "-"));
    html! { span class=(class) { (word) } }
}

/// A form that posts `fields` to `action` with the session's CSRF token: one button.
pub fn action_button(user: &User, action: &str, label: &str, fields: &[(&str, &str)]) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            input type="hidden" name="csrf" value=(user.csrf);
            @for (k, v) in fields {
                input type="hidden" name=(k) value=(v);
            }
            button type="submit" { (label) }
        }
    }
}

/// Marks a region refreshed every `seconds` by console.js (the page reads the same
/// without it).
pub fn live(id: &str, seconds: u32, inner: Markup) -> Markup {
    html! {
        div id=(id) data-live=(seconds) aria-live="polite" {
            (inner)
        }
    }
}

/// Percent-encodes a query value (`/` kept: a path given as `?next=` stays readable).
pub fn url_escape(s: &str) -> String {
    percent_encode(s, b"-_.~/")
}

/// Percent-encodes one path segment (a model or feature name): everything but
/// unreserved characters, so `/`, `?`, `#`, `%` and `..` cannot change the path.
pub fn segment(s: &str) -> String {
    percent_encode(s, b"-_~")
}

/// Every byte but ASCII letters, digits and `keep` as `%XX`.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A number with at most `digits` decimals, or "—".
pub fn num(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "—".into(),
    }
}

/// A share as a percentage, or "—".
pub fn pct(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{:.1} %", x * 100.0),
        _ => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_escaped_and_times_read_as_ages() {
        assert_eq!(url_escape("/ui/x?a=b c"), "/ui/x%3Fa%3Db%20c");
        assert_eq!(segment("../a/b?c#d%"), "%2E%2E%2Fa%2Fb%3Fc%23d%25");
        let now = 10_000_000;
        let s = |ms| ago(Some(ms), now).into_string();
        assert!(s(now - 5_000).contains(">5s ago<"));
        assert!(s(now - 120_000).contains(">2m ago<"));
        assert!(s(now - 3_720_000).contains(">1h 2m ago<"));
        assert!(ago(None, now).into_string().contains("never"));
        assert_eq!(pct(Some(0.0125)), "1.2 %");
        assert_eq!(num(Some(f64::NAN), 2), "—");
    }

    /// Text from the fleet (a device name, a tag, an error) is escaped: a device whose
    /// tags hold markup shows it as text.
    #[test]
    fn what_the_fleet_reports_is_escaped() {
        let out = badge("<script>alert(1)</script>").into_string();
        assert!(!out.contains("<script>"), "{out}");
        assert!(out.contains("&lt;script&gt;"), "{out}");
    }
}
