//! A WebSocket client that speaks the contract's events as
//! `serde_json::Value`s, with a timeout on every wait.
//!
//! Reading: text frames are JSON, binary frames MessagePack (decoded into
//! the same `Value`); the end of the connection is an event too,
//! `{"type":"__close","code":N,"reason":..}` (1006 when it ended without a
//! Close frame), so tests can expect it like any other. Events that arrive
//! while the client waits for a reply (`request`) or checks that something
//! does not come (`expect_none`) are kept for the next read; `expect` skips
//! (drops) events of other types, as a client that ignores them would.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use super::DEFAULT_TIMEOUT;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a handshake failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The server answered the upgrade request with this HTTP status.
    Status(u16),
    /// No answer: refused, reset, timed out, ...
    Transport(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Status(s) => write!(f, "upgrade refused with HTTP {s}"),
            ConnectError::Transport(e) => write!(f, "{e}"),
        }
    }
}

/// Handshake options beyond the token.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Sent as the `Origin` header, as a browser does.
    pub origin: Option<String>,
    /// The socket's receive buffer in bytes (`SO_RCVBUF`): a small one makes
    /// a client that stops reading back up the server within a few frames.
    pub recv_buffer: Option<u32>,
}

pub struct Client {
    /// The user the token was for, when the harness minted it.
    pub user: Option<Uuid>,
    ws: Ws,
    /// Events read but not yet handed out.
    pending: VecDeque<Value>,
    /// The `__close` event, once the connection has ended.
    closed: Option<Value>,
    /// A failed write, reported with the close event.
    send_error: Option<String>,
    next_ref: u64,
}

impl Client {
    /// Opens a WebSocket to `url`, with `token` as `Authorization: Bearer`
    /// (or, with `in_query`, as `?token=`).
    pub async fn connect(url: &str, token: Option<&str>, in_query: bool) -> Result<Client, ConnectError> {
        Client::connect_with(url, token, in_query, &ConnectOptions::default()).await
    }

    /// `connect`, with an `Origin` header and / or a small socket receive
    /// buffer (`options`).
    pub async fn connect_with(
        url: &str,
        token: Option<&str>,
        in_query: bool,
        options: &ConnectOptions,
    ) -> Result<Client, ConnectError> {
        let url = match (token, in_query) {
            (Some(t), true) => format!("{url}?token={t}"),
            _ => url.to_string(),
        };
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ConnectError::Transport(format!("bad url {url}: {e}")))?;
        if let (Some(t), false) = (token, in_query) {
            let value = HeaderValue::from_str(&format!("Bearer {t}"))
                .map_err(|e| ConnectError::Transport(format!("bad token: {e}")))?;
            request.headers_mut().insert("authorization", value);
        }
        if let Some(origin) = &options.origin {
            let value =
                HeaderValue::from_str(origin).map_err(|e| ConnectError::Transport(format!("bad origin: {e}")))?;
            request.headers_mut().insert("origin", value);
        }
        let connect = async {
            match options.recv_buffer {
                None => tokio_tungstenite::connect_async(request).await,
                Some(bytes) => {
                    // Our own socket, so its receive buffer can be set before
                    // connecting (the kernel's autotuning would grow it to MiBs).
                    let authority = request.uri().authority().map(|a| a.as_str().to_string());
                    let addr: std::net::SocketAddr = authority
                        .as_deref()
                        .and_then(|a| a.parse().ok())
                        .unwrap_or_else(|| panic!("recv_buffer needs an ip:port url, not {url}"));
                    let socket = TcpSocket::new_v4().map_err(WsError::Io)?;
                    socket.set_recv_buffer_size(bytes).map_err(WsError::Io)?;
                    let stream = socket.connect(addr).await.map_err(WsError::Io)?;
                    tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await
                }
            }
        };
        match tokio::time::timeout(DEFAULT_TIMEOUT, connect).await {
            Err(_) => Err(ConnectError::Transport(format!(
                "handshake with {url} took over {DEFAULT_TIMEOUT:?}"
            ))),
            Ok(Err(WsError::Http(response))) => Err(ConnectError::Status(response.status().as_u16())),
            Ok(Err(e)) => Err(ConnectError::Transport(format!("connecting to {url}: {e}"))),
            Ok(Ok((ws, _response))) => Ok(Client {
                user: None,
                ws,
                pending: VecDeque::new(),
                closed: None,
                send_error: None,
                next_ref: 0,
            }),
        }
    }

    /// Sends one JSON text frame.
    pub async fn send_json(&mut self, event: Value) {
        self.send(Message::text(event.to_string())).await;
    }

    /// Sends `event` as MessagePack in a binary frame (string keys).
    pub async fn send_msgpack(&mut self, event: &Value) {
        let bytes = rmp_serde::to_vec_named(event).expect("encoding MessagePack");
        self.send(Message::binary(bytes)).await;
    }

    /// Sends a text frame as is (need not be JSON).
    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text.to_string())).await;
    }

    /// Sends a binary frame as is.
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.send(Message::binary(bytes)).await;
    }

    /// Writes a frame. A failed write does not fail the test (the server may
    /// have closed on purpose, e.g. after a frame over its limit): the error
    /// is reported with the `__close` event that follows.
    async fn send(&mut self, message: Message) {
        if self.closed.is_some() {
            return;
        }
        match tokio::time::timeout(DEFAULT_TIMEOUT, self.ws.send(message)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.send_error = Some(e.to_string()),
            Err(_) => panic!("{}: a write blocked for {DEFAULT_TIMEOUT:?}", self.who()),
        }
    }

    /// The next event; fails the test if none arrives within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Value {
        match self.try_next_event(timeout).await {
            Some(event) => event,
            None => panic!("{}: no event within {timeout:?}", self.who()),
        }
    }

    /// The next event, or `None` after `timeout`.
    pub async fn try_next_event(&mut self, timeout: Duration) -> Option<Value> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        self.read(Instant::now() + timeout).await
    }

    /// Skips events of other types until one of type `ty` arrives and
    /// returns it; fails with the events it saw after `timeout`, or at once
    /// if the connection ends.
    pub async fn expect(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let event = match self.pending.pop_front() {
                Some(event) => Some(event),
                None => self.read(deadline).await,
            };
            let Some(event) = event else {
                panic!(
                    "{}: expected a `{ty}` event within {timeout:?}; saw {}",
                    self.who(),
                    describe(&seen)
                );
            };
            if event["type"] == ty {
                return event;
            }
            if event["type"] == "__close" {
                panic!(
                    "{}: the connection ended ({event}) while expecting `{ty}`; saw {}",
                    self.who(),
                    describe(&seen)
                );
            }
            seen.push(event);
        }
    }

    /// The next `n` events of type `ty`, in arrival order (others are
    /// skipped as by `expect`); each may take up to `timeout`.
    pub async fn expect_n(&mut self, ty: &str, n: usize, timeout: Duration) -> Vec<Value> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            events.push(self.expect(ty, timeout).await);
        }
        events
    }

    /// The next frame exactly as the server sent it (text, binary or close;
    /// the socket's pings and pongs are skipped), for tests of the wire
    /// encoding. Fails if decoded events are waiting to be read (they came
    /// first), or if no frame arrives within `timeout`.
    pub async fn next_frame(&mut self, timeout: Duration) -> Message {
        assert!(
            self.pending.is_empty() && self.closed.is_none(),
            "{}: next_frame with events already read: {:?} {:?}",
            self.who(),
            self.pending,
            self.closed
        );
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline.into(), self.ws.next()).await {
                Err(_) => panic!("{}: no frame within {timeout:?}", self.who()),
                Ok(None) => panic!("{}: the connection ended awaiting a frame", self.who()),
                Ok(Some(Err(e))) => panic!("{}: reading a frame: {e}", self.who()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(Some(Ok(frame))) => return frame,
            }
        }
    }

    /// Fails if an event of type `ty` arrives within `duration`. Other
    /// events are kept for later reads.
    pub async fn expect_none(&mut self, ty: &str, duration: Duration) {
        let deadline = Instant::now() + duration;
        let mut kept: Vec<Value> = self.pending.drain(..).collect();
        if let Some(found) = kept.iter().find(|e| e["type"] == ty) {
            panic!("{}: expected no `{ty}` event, got {found}", self.who());
        }
        while let Some(event) = self.read(deadline).await {
            if event["type"] == ty {
                panic!("{}: expected no `{ty}` event, got {event}", self.who());
            }
            let ended = event["type"] == "__close";
            kept.push(event);
            if ended {
                break;
            }
        }
        self.pending.extend(kept);
    }

    /// Waits for the first event that `matches`, keeping the others for
    /// later reads; fails after `timeout` (or when the connection ends)
    /// saying it waited for `what`.
    pub async fn wait_for(&mut self, what: &str, timeout: Duration, matches: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut kept: Vec<Value> = Vec::new();
        let mut found = None;
        if let Some(i) = self.pending.iter().position(&matches) {
            found = self.pending.remove(i);
        }
        while found.is_none() {
            let Some(event) = self.read(deadline).await else {
                panic!("{}: no {what} within {timeout:?}; saw {}", self.who(), describe(&kept));
            };
            if matches(&event) {
                found = Some(event);
            } else if event["type"] == "__close" {
                panic!(
                    "{}: the connection ended ({event}) while waiting for {what}",
                    self.who()
                );
            } else {
                kept.push(event);
            }
        }
        self.pending.extend(kept);
        found.expect("set above")
    }

    /// Sends `event` with a fresh `ref` (unless it has one) and returns the
    /// reply that echoes it (`ack`, `pong`, `authed` or `error`). Other
    /// events arriving meanwhile are kept for later reads.
    pub async fn request(&mut self, mut event: Value) -> Value {
        if event.get("ref").is_none() {
            self.next_ref += 1;
            event["ref"] = json!(format!("r{}", self.next_ref));
        }
        let reference = event["ref"].clone();
        self.send_json(event.clone()).await;
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        let mut kept = Vec::new();
        let reply = loop {
            let Some(reply) = self.read(deadline).await else {
                panic!(
                    "{}: no reply to {event} within {DEFAULT_TIMEOUT:?}; saw {}",
                    self.who(),
                    describe(&kept)
                );
            };
            if reply["ref"] == reference {
                break reply;
            }
            if reply["type"] == "__close" {
                panic!(
                    "{}: the connection ended ({reply}) awaiting a reply to {event}",
                    self.who()
                );
            }
            kept.push(reply);
        };
        self.pending.extend(kept);
        reply
    }

    /// `ping`; returns the `pong`.
    pub async fn ping(&mut self) -> Value {
        let reply = self.request(json!({ "type": "ping" })).await;
        assert_eq!(reply["type"], "pong", "{}: ping answered with {reply}", self.who());
        reply
    }

    /// A private message to `user`; returns the `ack` (fails on any other reply).
    pub async fn send_message_to(&mut self, user: Uuid, body: &str) -> Value {
        let event = json!({ "type": "send", "to": user.to_string(), "body": body });
        self.acked(event).await
    }

    /// A message to group `chat`; returns the `ack` (fails on any other reply).
    pub async fn send_to_chat(&mut self, chat: Uuid, body: &str) -> Value {
        let event = json!({ "type": "send", "chat": chat.to_string(), "body": body });
        self.acked(event).await
    }

    async fn acked(&mut self, event: Value) -> Value {
        let reply = self.request(event.clone()).await;
        assert_eq!(reply["type"], "ack", "{}: {event} answered with {reply}", self.who());
        reply
    }

    /// `join`; returns the `joined` event for this chat (or the `error`).
    pub async fn join(&mut self, chat: Uuid) -> Value {
        self.membership("join", "joined", chat).await
    }

    /// `leave`; returns the `left` event for this chat (or the `error`).
    pub async fn leave(&mut self, chat: Uuid) -> Value {
        self.membership("leave", "left", chat).await
    }

    async fn membership(&mut self, ty: &str, reply: &str, chat: Uuid) -> Value {
        self.next_ref += 1;
        let reference = json!(format!("r{}", self.next_ref));
        let chat = json!(chat.to_string());
        let user = json!(self.user.map(|u| u.to_string()));
        self.send_json(json!({ "type": ty, "chat": chat, "ref": reference }))
            .await;
        let what = format!("`{reply}` for chat {chat}");
        self.wait_for(&what, DEFAULT_TIMEOUT, |e| {
            (e["type"] == reply && e["chat"] == chat && (user.is_null() || e["user"] == user))
                || (e["type"] == "error" && e["ref"] == reference)
        })
        .await
    }

    /// `typing` to a user.
    pub async fn typing_to(&mut self, user: Uuid) {
        self.send_json(json!({ "type": "typing", "to": user.to_string() }))
            .await;
    }

    /// `typing` in a group chat.
    pub async fn typing_in(&mut self, chat: Uuid) {
        self.send_json(json!({ "type": "typing", "chat": chat.to_string() }))
            .await;
    }

    /// Replaces the connection's token (`auth`); returns the reply.
    pub async fn auth(&mut self, token: &str) -> Value {
        self.request(json!({ "type": "auth", "token": token })).await
    }

    /// Sends a Close frame and waits (briefly) for the server's.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
        let _ = self.read(Instant::now() + Duration::from_secs(2)).await;
    }

    /// Reads the next event from the socket; `None` at `deadline`.
    async fn read(&mut self, deadline: Instant) -> Option<Value> {
        if let Some(closed) = &self.closed {
            return Some(closed.clone());
        }
        loop {
            let next = tokio::time::timeout_at(deadline.into(), self.ws.next()).await;
            let event = match next {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(text.as_str())
                    .unwrap_or_else(|e| panic!("{}: text frame is not JSON ({e}): {text}", self.who())),
                Ok(Some(Ok(Message::Binary(bytes)))) => rmp_serde::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{}: binary frame is not MessagePack ({e}): {bytes:?}", self.who())),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let (code, reason) = frame
                        .map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    self.ended(json!({ "type": "__close", "code": code, "reason": reason }))
                }
                Ok(Some(Ok(_))) => continue, // ping, pong: tungstenite answers pings
                Ok(Some(Err(e))) => self.ended(json!({ "type": "__close", "code": 1006, "error": e.to_string() })),
                Ok(None) => self.ended(json!({ "type": "__close", "code": 1006 })),
            };
            return Some(event);
        }
    }

    fn ended(&mut self, mut event: Value) -> Value {
        if let Some(e) = &self.send_error {
            event["send_error"] = json!(e);
        }
        self.closed = Some(event.clone());
        event
    }

    fn who(&self) -> String {
        match self.user {
            Some(user) => format!("client of {user}"),
            None => "client".to_string(),
        }
    }
}

fn describe(events: &[Value]) -> String {
    if events.is_empty() {
        "nothing".to_string()
    } else {
        let list: Vec<String> = events.iter().map(Value::to_string).collect();
        format!("{} event(s):\n  {}", events.len(), list.join("\n  "))
    }
}
