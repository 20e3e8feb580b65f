//! The browser client's files and, in development only, a sign-in endpoint.
//!
//! - `GET /` is `index.html` and `GET /assets/...` the files under
//!   `assets/` of `GATEWAY_WEB_DIR` (default: `gateway/web/public` of this
//!   source tree). A missing directory just answers 404.
//! - `POST /v1/dev/login` `{"name": str}` answers
//!   `{"token", "user", "name", "exp"}`: an HS256 token for 12 hours, for the
//!   user whose id is the UUIDv5 (URL namespace) of `chat-dev-user:<name in
//!   lower case>`, so signing in again under the same name is the same user.
//!   Only with `CHAT_DEV_LOGIN=1`: anyone who can reach the endpoint can be
//!   anyone, so it is 404 otherwise, and production never sets it.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use uuid::Uuid;
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::{Filter, Rejection};

use crate::config::Config;

/// How long a development token lasts.
pub const DEV_TOKEN_TTL_SECS: i64 = 12 * 3600;
/// The longest display name, in characters.
pub const MAX_NAME_CHARS: usize = 40;

/// Pages may load scripts, styles and images only from this origin and talk
/// to it alone (the WebSocket included); nothing may frame them.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The static files and the development sign-in.
pub fn routes(config: &Config) -> impl Filter<Extract = (Response,), Error = Rejection> + Clone {
    let dir = config.web_dir.clone();
    if !dir.join("index.html").is_file() {
        tracing::warn!(dir = %dir.display(), "GATEWAY_WEB_DIR has no index.html: the web client is not served");
    }
    if config.dev_login {
        tracing::warn!("CHAT_DEV_LOGIN is on: POST /v1/dev/login issues a token for any name (development only)");
    }

    let index = warp::path::end()
        .and(warp::get().or(warp::head()).unify())
        .and(warp::fs::file(dir.join("index.html")))
        .map(|file: warp::fs::File| static_headers(file.into_response()));
    let assets = warp::path("assets")
        .and(warp::get().or(warp::head()).unify())
        .and(warp::fs::dir(dir.join("assets")))
        .map(|file: warp::fs::File| static_headers(file.into_response()));

    let enabled = config.dev_login;
    let secret = config.jwt_secret.clone();
    // Off: 404 whatever the method, as for any unknown path.
    let login = warp::path!("v1" / "dev" / "login")
        .and_then(move || async move {
            if enabled {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one()
        .and(warp::post())
        .and(warp::body::content_length_limit(4096))
        .and(warp::body::bytes())
        .map(move |body: Bytes| dev_login(secret.expose(), &body, now_secs()));

    index.or(assets).unify().or(login).unify()
}

/// No stale client after an upgrade: browsers revalidate every file (warp
/// answers `If-Modified-Since` with 304).
fn static_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert("cache-control", warp::http::HeaderValue::from_static("no-cache"));
    headers.insert(
        "x-content-type-options",
        warp::http::HeaderValue::from_static("nosniff"),
    );
    headers.insert("content-security-policy", warp::http::HeaderValue::from_static(CSP));
    headers.insert("referrer-policy", warp::http::HeaderValue::from_static("no-referrer"));
    response
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The user id of a development display name: case does not matter.
pub fn dev_user_id(name: &str) -> Uuid {
    Uuid::new_v5(
        &Uuid::NAMESPACE_URL,
        format!("chat-dev-user:{}", name.trim().to_lowercase()).as_bytes(),
    )
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    warp::reply::with_status(warp::reply::json(&json!({"code": code, "message": message})), status).into_response()
}

fn dev_login(secret: &str, body: &[u8], now: i64) -> Response {
    match issue(secret, body, now) {
        Ok(answer) => warp::reply::json(&answer).into_response(),
        Err(Refused::BadRequest(message)) => error(StatusCode::BAD_REQUEST, "bad_request", &message),
        Err(Refused::Internal(message)) => error(StatusCode::INTERNAL_SERVER_ERROR, "unavailable", &message),
    }
}

#[derive(Debug)]
enum Refused {
    BadRequest(String),
    Internal(String),
}

/// `{"token", "user", "name", "exp"}` for the name in `body`.
fn issue(secret: &str, body: &[u8], now: i64) -> Result<serde_json::Value, Refused> {
    let name = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(|n| n.trim().to_string()))
        .ok_or_else(|| Refused::BadRequest("body must be {\"name\": <display name>}".into()))?;
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS || name.chars().any(char::is_control) {
        return Err(Refused::BadRequest(format!(
            "name must be 1 to {MAX_NAME_CHARS} printable characters"
        )));
    }
    let user = dev_user_id(&name);
    let exp = now + DEV_TOKEN_TTL_SECS;
    let claims = json!({"sub": user, "iat": now, "exp": exp});
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| Refused::Internal(e.to_string()))?;
    Ok(json!({"token": token, "user": user, "name": name, "exp": exp}))
}

/// Where the client's files are unless `GATEWAY_WEB_DIR` says otherwise.
pub fn default_web_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/web/public"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;

    const SECRET: &str = "0123456789abcdef";

    fn login(body: &str) -> Result<serde_json::Value, Refused> {
        issue(SECRET, body.as_bytes(), now_secs())
    }

    #[test]
    fn the_same_name_is_the_same_user_and_the_token_verifies() {
        let a = login(r#"{"name":"Alice"}"#).unwrap();
        let b = login(r#"{"name":" alice "}"#).unwrap();
        assert_eq!(a["user"], b["user"]);
        assert_eq!(a["name"], "Alice");
        let id = Verifier::new(SECRET).verify(a["token"].as_str().unwrap()).unwrap();
        assert_eq!(id.user.to_string(), a["user"].as_str().unwrap());
        assert!(id.exp > now_secs() + DEV_TOKEN_TTL_SECS - 60);
        assert_eq!(id.user, dev_user_id("ALICE"));
        let bob = login(r#"{"name":"bob"}"#).unwrap();
        assert_ne!(bob["user"], a["user"]);
    }

    #[test]
    fn bad_names_are_refused() {
        for body in [
            "",
            "{}",
            r#"{"name":""}"#,
            r#"{"name":"   "}"#,
            r#"{"name":7}"#,
            r#"{"name":"a\u0007b"}"#,
        ] {
            assert!(matches!(login(body), Err(Refused::BadRequest(_))), "{body}");
        }
        let long = format!(r#"{{"name":"{}"}}"#, "x".repeat(MAX_NAME_CHARS + 1));
        assert!(matches!(login(&long), Err(Refused::BadRequest(_))));
        let ok = format!(r#"{{"name":"{}"}}"#, "é".repeat(MAX_NAME_CHARS));
        assert!(login(&ok).is_ok());
    }
}
