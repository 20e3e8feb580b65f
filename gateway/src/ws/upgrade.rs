//! The WebSocket handshake (RFC 6455 §4.2) on top of hyper's upgrade.
//!
//! Ours rather than warp's `ws()` because warp does not let the gateway set
//! tungstenite's buffer sizes, and the default read buffer (128 KiB, zeroed
//! before every read attempt) was most of a connection's memory and a third
//! of the gateway's CPU per delivered frame (docs/benchmarks.md). This module
//! checks the handshake headers, answers 101 and turns the upgraded
//! connection into a [`Socket`]; it knows nothing of sessions or the hub.

use std::future::Future;
use std::sync::{Arc, Mutex};

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection};

/// An upgraded client connection.
pub type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Bytes read from a socket per attempt. Client frames are small (a send is
/// well under 1 KiB), and tungstenite zero-fills this much before every read
/// attempt; a larger frame grows the buffer for itself.
const READ_BUFFER: usize = 2 * 1024;

/// The tungstenite settings of every client socket: a small read buffer and
/// `max_frame` as the limit of a frame and of a message.
pub fn socket_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_frame_size(Some(max_frame))
        .max_message_size(Some(max_frame))
}

/// A request's pending upgrade, which the server loop moves from hyper's
/// extension into this cloneable one so a warp filter can take it.
#[derive(Clone)]
pub struct PendingUpgrade(Arc<Mutex<Option<OnUpgrade>>>);

impl PendingUpgrade {
    pub fn new(on_upgrade: OnUpgrade) -> PendingUpgrade {
        PendingUpgrade(Arc::new(Mutex::new(Some(on_upgrade))))
    }

    fn take(&self) -> Option<OnUpgrade> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// A request that is not a valid WebSocket handshake; answered 400.
#[derive(Debug)]
pub struct NotWebSocket(pub &'static str);
impl warp::reject::Reject for NotWebSocket {}

/// A valid handshake, not answered yet.
#[derive(Debug)]
pub struct Handshake {
    accept: HeaderValue,
    on_upgrade: OnUpgrade,
}

/// Extracts a valid handshake from a `GET`, or rejects with [`NotWebSocket`].
pub fn handshake() -> impl Filter<Extract = (Handshake,), Error = Rejection> + Clone {
    warp::header::headers_cloned()
        .and(warp::ext::optional::<PendingUpgrade>())
        .and_then(|headers: HeaderMap, pending: Option<PendingUpgrade>| async move {
            check(&headers, pending).map_err(|e| warp::reject::custom(NotWebSocket(e)))
        })
}

fn check(headers: &HeaderMap, pending: Option<PendingUpgrade>) -> Result<Handshake, &'static str> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .map(|v| v.split(',').any(|part| part.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err("expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err("unsupported Sec-WebSocket-Version; 13 is required");
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or("missing Sec-WebSocket-Key")?;
    let accept = HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| "bad Sec-WebSocket-Key")?;
    let on_upgrade = pending
        .and_then(|p| p.take())
        .ok_or("this connection cannot be upgraded (HTTP/1.1 is required)")?;
    Ok(Handshake { accept, on_upgrade })
}

impl Handshake {
    /// Answers 101 and, once hyper has handed the connection over, runs
    /// `serve` on it as a WebSocket with `config`.
    pub fn accept<F, Fut>(self, config: WebSocketConfig, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Handshake { accept, on_upgrade } = self;
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let socket =
                        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    serve(socket).await;
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let mut response = Response::default();
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (header::HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_request_without_the_upgrade_headers_is_not_a_handshake() {
        let plain = headers(&[("sec-websocket-version", "13"), ("sec-websocket-key", "x")]);
        assert!(check(&plain, None).unwrap_err().contains("Upgrade"));
    }

    #[test]
    fn only_version_13_is_spoken() {
        let old = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-version", "8"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(check(&old, None).unwrap_err().contains("13"));
    }

    #[test]
    fn a_handshake_needs_a_key_and_an_upgradable_connection() {
        let no_key = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
        ]);
        assert!(check(&no_key, None).unwrap_err().contains("Key"));
        let http2 = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        assert!(check(&http2, None).unwrap_err().contains("cannot be upgraded"));
    }

    #[test]
    fn a_valid_handshake_is_answered_with_the_rfc_6455_accept_value() {
        let request = headers(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let pending = PendingUpgrade::new(hyper::upgrade::on(warp::http::Request::new(())));
        let handshake = check(&request, Some(pending)).expect("a valid handshake");
        // RFC 6455 §1.3: this key is answered with this value.
        assert_eq!(handshake.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }
}
