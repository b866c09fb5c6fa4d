//! Console sessions: sign-in with an API token, a signed session cookie, the CSRF token
//! of every form, sign-out.
//!
//! The cookie names the token (its id, never the token), when the session ends and a
//! random nonce, MACed with a key derived from the audit key: every replica that shares
//! the audit key (docs/DEPLOY.md) accepts it, and nothing about the session is stored.
//! Each request looks the token up again, so revoking it ends its sessions at once on
//! every replica. Sign-out clears the cookie and remembers the nonce on the replica that
//! served it until the session would have ended. The CSRF token of a session is a MAC of
//! its nonce under another derived key; a form posted without it, or from another
//! origin, is refused.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderMap;

use crate::plane::same;
use crate::records::TokenRecord;

/// How long a session lasts after sign-in.
pub const SESSION_MS: u64 = 8 * 3600 * 1000;

/// Signed-out nonces a replica remembers at most (beyond, the oldest are forgotten
/// first; their cookies still expire on time).
const SIGNED_OUT_MAX: usize = 100_000;

/// The keys and the signed-out nonces of this replica.
pub struct Sessions {
    cookie_key: ring::hmac::Key,
    csrf_key: ring::hmac::Key,
    /// `Secure` and the `__Host-` prefix: the API is reached over HTTPS.
    pub secure: bool,
    signed_out: Mutex<HashMap<String, u64>>,
}

/// A verified session cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub token_id: String,
    pub expires_ms: u64,
    pub nonce: String,
}

impl Sessions {
    pub fn new(audit: &crate::auth::AuditKey, secure: bool) -> Sessions {
        Sessions {
            cookie_key: audit.derive("fleetml console session cookie v1"),
            csrf_key: audit.derive("fleetml console csrf v1"),
            secure,
            signed_out: Mutex::new(HashMap::new()),
        }
    }

    /// The cookie's name: `__Host-` (HTTPS only, this host only, path `/`) when secure.
    pub fn cookie_name(&self) -> &'static str {
        if self.secure {
            "__Host-fleetml-session"
        } else {
            "fleetml-session"
        }
    }

    fn mac(&self, body: &str) -> String {
        hex::encode(ring::hmac::sign(&self.cookie_key, body.as_bytes()).as_ref())
    }

    /// A new session's cookie value for `token`, ending at `now_ms + SESSION_MS`.
    pub fn issue(&self, token: &TokenRecord, now_ms: u64) -> anyhow::Result<String> {
        let nonce = hex::encode(crate::plane::random_bytes(16)?);
        let body = format!("{}.{}.{nonce}", token.id, now_ms + SESSION_MS);
        Ok(format!("{body}.{}", self.mac(&body)))
    }

    /// The `Set-Cookie` value that stores `value`.
    pub fn set_cookie(&self, value: &str) -> String {
        format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
            self.cookie_name(),
            SESSION_MS / 1000,
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The `Set-Cookie` value that removes the cookie.
    pub fn clear_cookie(&self) -> String {
        format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
            self.cookie_name(),
            if self.secure { "; Secure" } else { "" }
        )
    }

    /// The session cookie of a request, if it carries one that verifies, has not ended
    /// and was not signed out here.
    pub fn verify(&self, headers: &HeaderMap, now_ms: u64) -> Option<Cookie> {
        let value = cookie_value(headers, self.cookie_name())?;
        let (body, mac) = value.rsplit_once('.')?;
        if !same(mac.as_bytes(), self.mac(body).as_bytes()) {
            return None;
        }
        let mut parts = body.splitn(3, '.');
        let (token_id, expires, nonce) = (parts.next()?, parts.next()?, parts.next()?);
        let expires_ms: u64 = expires.parse().ok()?;
        if expires_ms <= now_ms || self.is_signed_out(nonce) {
            return None;
        }
        Some(Cookie {
            token_id: token_id.to_string(),
            expires_ms,
            nonce: nonce.to_string(),
        })
    }

    /// The CSRF token of a session: every form carries it, every post must.
    pub fn csrf(&self, cookie: &Cookie) -> String {
        hex::encode(ring::hmac::sign(&self.csrf_key, cookie.nonce.as_bytes()).as_ref())
    }

    /// Whether `given` is the session's CSRF token (compared in constant time).
    pub fn csrf_ok(&self, cookie: &Cookie, given: Option<&str>) -> bool {
        given.is_some_and(|g| same(g.as_bytes(), self.csrf(cookie).as_bytes()))
    }

    /// Ends a session on this replica.
    pub fn sign_out(&self, cookie: &Cookie, now_ms: u64) {
        let mut out = self.signed_out.lock().unwrap_or_else(|p| p.into_inner());
        out.retain(|_, until| *until > now_ms);
        if out.len() >= SIGNED_OUT_MAX
            && let Some(oldest) = out.iter().min_by_key(|(_, u)| **u).map(|(n, _)| n.clone())
        {
            out.remove(&oldest);
        }
        out.insert(cookie.nonce.clone(), cookie.expires_ms);
    }

    fn is_signed_out(&self, nonce: &str) -> bool {
        self.signed_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(nonce)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a posted form comes from the console's own pages: a browser sends `Origin`
/// with every POST (and `Sec-Fetch-Site` where it knows it); either naming another site
/// refuses the post. A request with neither (not a browser) still needs the CSRF token.
/// The host is the `Host` header, or over HTTP/2 the request's `:authority`; the origin
/// of `--public-url` is accepted too (a proxy in front may rewrite `Host`).
pub fn same_origin(
    headers: &HeaderMap,
    authority: Option<&str>,
    public_url: Option<&str>,
) -> Result<(), String> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(format!(
            "the browser says it came from a {site} page (Sec-Fetch-Site)"
        ));
    }
    let public_origin = public_url.map(|u| match u.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or("")),
        None => u.to_string(),
    });
    match (header("origin"), header("host").or(authority)) {
        (None, _) => Ok(()),
        (Some(origin), _)
            if public_origin
                .as_deref()
                .is_some_and(|p| p.eq_ignore_ascii_case(origin)) =>
        {
            Ok(())
        }
        (Some(origin), Some(host))
            if origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)) =>
        {
            Ok(())
        }
        (Some(origin), host) => Err(format!(
            "its Origin `{origin}` is not this console's host `{}`",
            host.unwrap_or("(none)")
        )),
    }
}

/// Whether the request is a post from the console's own origin ([`same_origin`]).
pub struct SameOrigin(pub Result<(), String>);

impl axum::extract::FromRequestParts<super::Shared> for SameOrigin {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        console: &super::Shared,
    ) -> Result<SameOrigin, Self::Rejection> {
        Ok(SameOrigin(same_origin(
            &parts.headers,
            parts.uri.authority().map(|a| a.as_str()),
            Some(console.plane.public_url.as_str()),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Role;
    use axum::http::HeaderValue;

    fn sessions(secure: bool) -> Sessions {
        Sessions::new(&crate::auth::AuditKey::new(&[7; 32], 1), secure)
    }

    fn token() -> TokenRecord {
        TokenRecord {
            id: "t0123456789ab".into(),
            name: "ops".into(),
            role: Role::Operator,
            hash: "h".into(),
            created_ms: 0,
            created_by: "admin".into(),
        }
    }

    fn with_cookie(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            HeaderValue::from_str(&format!("other=1; {name}={value}")).expect("header"),
        );
        h
    }

    /// A cookie verifies until it ends; an edited one (another token id, a later end,
    /// another nonce), one MACed under another audit key and a signed-out one do not.
    #[test]
    fn only_an_unedited_unexpired_cookie_of_this_key_verifies() {
        let s = sessions(false);
        let value = s.issue(&token(), 1_000).expect("issue");
        let ok = s
            .verify(&with_cookie(s.cookie_name(), &value), 2_000)
            .expect("verifies");
        assert_eq!(ok.token_id, "t0123456789ab");
        assert_eq!(ok.expires_ms, 1_000 + SESSION_MS);
        assert!(
            s.verify(&with_cookie(s.cookie_name(), &value), 1_000 + SESSION_MS)
                .is_none(),
            "ended"
        );
        let (body, mac) = value.rsplit_once('.').expect("mac");
        let parts: Vec<&str> = body.split('.').collect();
        for edited in [
            format!("tadmin.{}.{}.{mac}", parts[1], parts[2]),
            format!("{}.{}.{}.{mac}", parts[0], u64::MAX, parts[2]),
            format!("{}.{}.00.{mac}", parts[0], parts[1]),
            format!("{body}.{}", "0".repeat(64)),
            body.to_string(),
        ] {
            assert!(
                s.verify(&with_cookie(s.cookie_name(), &edited), 2_000)
                    .is_none(),
                "{edited}"
            );
        }
        let other = Sessions::new(&crate::auth::AuditKey::new(&[8; 32], 1), false);
        assert!(
            other
                .verify(&with_cookie(s.cookie_name(), &value), 2_000)
                .is_none()
        );
        s.sign_out(&ok, 2_000);
        assert!(
            s.verify(&with_cookie(s.cookie_name(), &value), 2_000)
                .is_none()
        );
    }

    /// The CSRF token belongs to one session; the cookie is HttpOnly and SameSite=Strict
    /// always, Secure with the `__Host-` prefix under TLS.
    #[test]
    fn csrf_tokens_are_per_session_and_cookies_are_locked_down() {
        let s = sessions(true);
        let a = s
            .verify(
                &with_cookie(s.cookie_name(), &s.issue(&token(), 0).expect("issue")),
                1,
            )
            .expect("a");
        let b = s
            .verify(
                &with_cookie(s.cookie_name(), &s.issue(&token(), 0).expect("issue")),
                1,
            )
            .expect("b");
        assert!(s.csrf_ok(&a, Some(&s.csrf(&a))));
        assert!(!s.csrf_ok(&a, Some(&s.csrf(&b))));
        assert!(!s.csrf_ok(&a, None));
        let set = s.set_cookie("v");
        assert!(set.starts_with("__Host-fleetml-session=v; Path=/; HttpOnly; SameSite=Strict"));
        assert!(set.ends_with("; Secure"), "{set}");
        assert!(!sessions(false).set_cookie("v").contains("Secure"));
    }

    #[test]
    fn posts_from_another_origin_are_told_apart() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        let ok = |h: &HeaderMap, a: Option<&str>| same_origin(h, a, None).is_ok();
        assert!(ok(
            &h(&[("host", "fleet:8443"), ("origin", "https://fleet:8443")]),
            None
        ));
        // HTTP/2: no Host header, the authority instead.
        assert!(ok(
            &h(&[("origin", "https://fleet:8443")]),
            Some("fleet:8443")
        ));
        assert!(!ok(&h(&[("origin", "https://fleet:8443")]), None));
        // Behind a proxy that rewrites Host: the public URL's origin.
        let proxied = h(&[
            ("host", "10.0.0.5:7080"),
            ("origin", "https://fleet.example.com"),
        ]);
        assert!(same_origin(&proxied, None, Some("https://fleet.example.com/")).is_ok());
        assert!(same_origin(&proxied, None, Some("https://other.example.com")).is_err());
        assert!(ok(&h(&[("host", "fleet:8443")]), None));
        assert!(!ok(
            &h(&[("host", "fleet:8443"), ("origin", "https://evil.example")]),
            Some("fleet:8443")
        ));
        assert!(!ok(&h(&[("host", "fleet:8443"), ("origin", "null")]), None));
        assert!(!ok(
            &h(&[("host", "fleet:8443"), ("sec-fetch-site", "cross-site")]),
            None
        ));
    }
}
