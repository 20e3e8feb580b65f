//! `floor`: the least a chat server can do, to measure what this machine and
//! the load tool reach before the server's own work counts.
//!
//! One process that speaks as much of the client contract as the load tool's
//! scenarios use: `GET /v1/ws` (JWT checked, as the gateway does), `POST
//! /v1/chats`, and over WebSocket `send` (to a user or a chat, acked, with a
//! per-chat `seq`) and `ping`. Everything lives in memory: no Redis, no
//! queue, no PostgreSQL, no cross-node routing, nothing survives a restart.
//! It is built on the gateway's stack (hyper's HTTP/1 server, the same
//! upgrade, tokio-tungstenite with the gateway's 2 KiB read buffer), so the
//! gap between its figures and the cluster's is the cluster's own work:
//! docs/benchmarks.md quotes the cluster as a share of it.
//!
//! A measuring instrument, not a product: never deploy it. It listens on
//! loopback addresses only.
//!
//! ```sh
//! floor --listen 127.0.0.1:9101 --listen 127.0.0.1:9102 --secret "$CHAT_JWT_SECRET"
//! loadgen group --gateway ws://127.0.0.1:9101 --gateway ws://127.0.0.1:9102 ...
//! ```

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use shared::ids::private_chat_id;
use shared::protocol::close as close_code;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

/// The gateway's allocator (gateway/src/main.rs): the floor does the
/// gateway's WebSocket work the way the gateway does it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(about = "A chat server that does the least it can, in memory, for measuring (never deploy it)")]
struct Args {
    /// Address to listen on (loopback only); repeat to look like several gateways.
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// The HS256 secret the load tool signs its tokens with.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Runtime worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Frames a connection may have queued before it is closed with 1008.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// For the load tool's own tests: every Nth accepted message is acked
    /// but never delivered to its first recipient (0: never).
    #[arg(long, default_value_t = 0)]
    drop_every: u64,
}

/// The gateway's read buffer and frame limit (gateway/src/ws/upgrade.rs).
const READ_BUFFER: usize = 2 * 1024;
const MAX_FRAME: usize = 64 * 1024;
/// Queued frames written per flush.
const WRITE_BATCH: usize = 64;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(a) = args.listen.iter().find(|a| !a.ip().is_loopback()) {
        bail!("--listen {a}: floor listens on loopback addresses only");
    }
    if args.secret.is_empty() {
        bail!("--secret (CHAT_JWT_SECRET) must not be empty");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.enable_all().build().context("tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    // As the gateway: an expired token is refused, with no grace period.
    validation.leeway = 0;
    let state = Arc::new(State {
        key: DecodingKey::from_secret(args.secret.as_bytes()),
        validation,
        queue: args.queue.max(1),
        chats: DashMap::new(),
        devices: DashMap::new(),
        next_device: AtomicU64::new(1),
        drop_every: args.drop_every,
        accepted: AtomicU64::new(0),
    });
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let socket = tokio::net::TcpSocket::new_v4().context("socket")?;
        socket.set_reuseaddr(true)?;
        socket.bind(*addr).with_context(|| format!("bind {addr}"))?;
        listeners.push(socket.listen(4096).with_context(|| format!("listen {addr}"))?);
        eprintln!("floor: listening on {addr}");
    }
    let mut tasks = Vec::new();
    for listener in listeners {
        tasks.push(tokio::spawn(accept_loop(listener, state.clone())));
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = futures_util::future::select_all(tasks) => {}
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

struct State {
    key: DecodingKey,
    validation: Validation,
    queue: usize,
    chats: DashMap<Uuid, Arc<Chat>>,
    /// Each user's open connections.
    devices: DashMap<Uuid, Vec<Device>>,
    next_device: AtomicU64,
    drop_every: u64,
    accepted: AtomicU64,
}

struct Chat {
    members: Vec<Uuid>,
    /// The last seq; locked while a message is numbered and queued to every
    /// recipient, so all of them get a chat's messages in seq order.
    seq: Mutex<i64>,
}

#[derive(Clone)]
struct Device {
    id: u64,
    tx: mpsc::Sender<Utf8Bytes>,
    overflowed: Arc<AtomicBool>,
}

impl Device {
    /// A new connection of `user`, receiving from now on.
    fn register(user: Uuid, state: &State) -> (Device, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(state.queue);
        let me = Device {
            id: state.next_device.fetch_add(1, Relaxed),
            tx,
            overflowed: Arc::new(AtomicBool::new(false)),
        };
        state.devices.entry(user).or_default().push(me.clone());
        (me, rx)
    }

    fn unregister(&self, user: Uuid, state: &State) {
        if let Some(mut list) = state.devices.get_mut(&user) {
            list.retain(|d| d.id != self.id);
        }
        state.devices.remove_if(&user, |_, list| list.is_empty());
    }
}

/// How long one write may wait on a client that does not read (the
/// gateway's ping interval plus timeout, by default).
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// The gateway's default `body` limit (contract: `too_large`).
const MAX_BODY: usize = 4096;

#[derive(Deserialize)]
struct Claims {
    sub: Uuid,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Result<Reply, Infallible> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Ok(r)
}

async fn route(mut req: Request<Incoming>, state: Arc<State>) -> Result<Reply, Infallible> {
    let user = match token(&req).and_then(|t| {
        jsonwebtoken::decode::<Claims>(t, &state.key, &state.validation)
            .ok()
            .map(|d| d.claims.sub)
    }) {
        Some(u) => u,
        None if req.uri().path() == "/healthz" => return reply(StatusCode::OK, "ok"),
        None => return reply(StatusCode::UNAUTHORIZED, r#"{"code":"unauthorized"}"#),
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/v1/ws") => {
            let Some(key) = req.headers().get("sec-websocket-key") else {
                return reply(StatusCode::BAD_REQUEST, r#"{"code":"bad_request"}"#);
            };
            let accept = derive_accept_key(key.as_bytes());
            let on_upgrade = hyper::upgrade::on(&mut req);
            // Registered before the 101, as the gateway does: a message sent
            // to the user once the handshake is answered is queued for it.
            let (me, rx) = Device::register(user, &state);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let config = WebSocketConfig::default()
                        .read_buffer_size(READ_BUFFER)
                        .max_frame_size(Some(MAX_FRAME))
                        .max_message_size(Some(MAX_FRAME));
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                    session(ws, user, &me, rx, &state).await;
                }
                me.unregister(user, &state);
            });
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = r.headers_mut();
            h.insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, header::HeaderValue::from_static("Upgrade"));
            if let Ok(v) = header::HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            Ok(r)
        }
        (&Method::POST, "/v1/chats") => {
            #[derive(Deserialize)]
            struct NewChat {
                title: String,
                visibility: String,
                #[serde(default)]
                members: Vec<Uuid>,
            }
            let Ok(body) = req.into_body().collect().await else {
                return reply(StatusCode::BAD_REQUEST, r#"{"code":"bad_request"}"#);
            };
            let Ok(new) = serde_json::from_slice::<NewChat>(&body.to_bytes()) else {
                return reply(StatusCode::BAD_REQUEST, r#"{"code":"bad_request"}"#);
            };
            let mut members = vec![user];
            for m in new.members {
                if !members.contains(&m) {
                    members.push(m);
                }
            }
            let id = Uuid::new_v4();
            state.chats.insert(
                id,
                Arc::new(Chat {
                    members: members.clone(),
                    seq: Mutex::new(0),
                }),
            );
            let answer =
                serde_json::json!({"id": id, "title": new.title, "visibility": new.visibility, "members": members});
            reply(StatusCode::CREATED, answer.to_string())
        }
        (_, "/healthz") => reply(StatusCode::OK, "ok"),
        _ => reply(StatusCode::NOT_FOUND, r#"{"code":"not_found"}"#),
    }
}

/// The token of a request: `?token=` or `Authorization: Bearer`.
fn token(req: &Request<Incoming>) -> Option<&str> {
    if let Some(q) = req.uri().query() {
        if let Some(t) = q.split('&').find_map(|kv| kv.strip_prefix("token=")) {
            return Some(t);
        }
    }
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn session(
    mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    user: Uuid,
    me: &Device,
    mut rx: mpsc::Receiver<Utf8Bytes>,
    state: &State,
) {
    use tokio::time::timeout;
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(first) = out else { break };
                if me.overflowed.load(Relaxed) {
                    let _ = timeout(WRITE_STALL, ws.close(Some(close(close_code::POLICY, "outgoing queue overflow")))).await;
                    break;
                }
                let written = timeout(WRITE_STALL, async {
                    ws.feed(Message::Text(first)).await?;
                    for _ in 1..WRITE_BATCH {
                        match rx.try_recv() {
                            Ok(f) => ws.feed(Message::Text(f)).await?,
                            Err(_) => break,
                        }
                    }
                    ws.flush().await
                })
                .await;
                if !matches!(written, Ok(Ok(()))) {
                    break;
                }
            }
            frame = ws.next() => {
                let answer = match frame {
                    Some(Ok(Message::Text(text))) => on_event(text.as_str(), user, me.id, state),
                    Some(Ok(Message::Binary(_))) => error(None, "bad_request", "floor speaks JSON only"),
                    Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                        let _ = timeout(WRITE_STALL, ws.close(Some(close(close_code::TOO_BIG, "frame too large")))).await;
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                if !matches!(timeout(WRITE_STALL, ws.send(Message::Text(answer.into()))).await, Ok(Ok(()))) {
                    break;
                }
            }
        }
    }
}

fn close(code: u16, reason: &'static str) -> tokio_tungstenite::tungstenite::protocol::CloseFrame {
    tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }
}

#[derive(Deserialize)]
struct ClientEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    to: Option<Uuid>,
    chat: Option<Uuid>,
    #[serde(borrow)]
    body: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow)]
    reference: Option<Cow<'a, str>>,
    id: Option<Uuid>,
}

#[derive(Serialize)]
struct MessageEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Uuid,
    chat: Uuid,
    seq: i64,
    from: Uuid,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<Uuid>,
    body: &'a str,
    ts: i64,
}

#[derive(Serialize)]
struct Ack<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a str>,
    id: Uuid,
    chat: Uuid,
    seq: i64,
    ts: i64,
}

/// Answers one client event: the `ack`, `pong` or `error` for the sender.
fn on_event(text: &str, user: Uuid, device: u64, state: &State) -> String {
    let ev: ClientEvent = match serde_json::from_str(text) {
        Ok(ev) => ev,
        Err(e) => return error(None, "bad_request", &e.to_string()),
    };
    let reference = ev.reference.as_deref();
    match ev.kind.as_ref() {
        "ping" => with_ref(serde_json::json!({"type": "pong"}), reference),
        "send" => {
            let Some(body) = ev.body.as_deref() else {
                return error(reference, "bad_request", "send needs a body");
            };
            if body.len() > MAX_BODY {
                return error(reference, "too_large", "body over 4096 bytes");
            }
            let (chat_id, to) = match (ev.to, ev.chat) {
                (Some(to), None) => (private_chat_id(user, to), Some(to)),
                (None, Some(chat)) => (chat, None),
                _ => return error(reference, "bad_request", "send needs `to` or `chat`"),
            };
            let chat = match to {
                Some(to) => state
                    .chats
                    .entry(chat_id)
                    .or_insert_with(|| {
                        // A user may message themselves: one member then.
                        let members = if user == to { vec![user] } else { vec![user, to] };
                        Arc::new(Chat {
                            members,
                            seq: Mutex::new(0),
                        })
                    })
                    .clone(),
                None => match state.chats.get(&chat_id) {
                    Some(c) => c.clone(),
                    None => return error(reference, "not_found", "no such chat"),
                },
            };
            if !chat.members.contains(&user) {
                return error(reference, "forbidden", "not a member of this chat");
            }
            let id = ev.id.unwrap_or_else(Uuid::now_v7);
            let ts = now_ms();
            let mut last = chat.seq.lock().unwrap_or_else(|e| e.into_inner());
            *last += 1;
            let seq = *last;
            let frame: Utf8Bytes = serde_json::to_string(&MessageEvent {
                kind: "message",
                id,
                chat: chat_id,
                seq,
                from: user,
                to,
                body,
                ts,
            })
            .expect("a message serializes")
            .into();
            let n = state.accepted.fetch_add(1, Relaxed) + 1;
            let mut drop_one = state.drop_every > 0 && n.is_multiple_of(state.drop_every);
            for member in &chat.members {
                if let Some(list) = state.devices.get(member) {
                    for d in list.iter().filter(|d| d.id != device) {
                        if std::mem::take(&mut drop_one) {
                            continue;
                        }
                        if d.tx.try_send(frame.clone()).is_err() {
                            d.overflowed.store(true, Relaxed);
                        }
                    }
                }
            }
            drop(last);
            // Fields in the gateway's order, `type` first: the load tool
            // reads acks and messages without a JSON parser when it can.
            serde_json::to_string(&Ack {
                kind: "ack",
                reference,
                id,
                chat: chat_id,
                seq,
                ts,
            })
            .expect("an ack serializes")
        }
        other => error(reference, "bad_request", &format!("floor does not serve `{other}`")),
    }
}

fn error(reference: Option<&str>, code: &str, message: &str) -> String {
    with_ref(
        serde_json::json!({"type": "error", "code": code, "message": message}),
        reference,
    )
}

/// `reply` as text, with the event's `ref` when it had one.
fn with_ref(mut reply: serde_json::Value, reference: Option<&str>) -> String {
    if let (Some(r), Some(map)) = (reference, reply.as_object_mut()) {
        map.insert("ref".into(), r.into());
    }
    reply.to_string()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
