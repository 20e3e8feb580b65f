//! Connections: where a gateway is, opening a WebSocket to it with a token,
//! and the two tasks of a connection: a writer that sends what the
//! dispatcher hands it (never waiting for acks) and a reader that records
//! acks, errors and deliveries.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use crate::body::{parse_body, parse_incoming, parse_ref, send_frame, Incoming, Stamp};
use crate::sys::now_ns;
use crate::tracker::PhaseTracker;

pub type Ws = WebSocketStream<TcpStream>;

/// A gateway's WebSocket endpoint, resolved once.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The URL given, with `/v1/ws` when it had no path.
    pub url: String,
    pub addr: SocketAddr,
    /// `http://host:port`, for REST calls.
    pub http_base: String,
}

/// Parses and resolves `raw` (ws://host:port[/path]); refuses addresses
/// that are not loopback unless `allow_remote`.
pub async fn resolve(raw: &str, allow_remote: bool) -> anyhow::Result<Endpoint> {
    let uri: Uri = raw.parse().with_context(|| format!("not a URL: {raw}"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => bail!("{raw}: wss is not supported (the tool speaks plain ws to local endpoints)"),
        _ => bail!("{raw}: expected a ws:// URL"),
    }
    let host = uri.host().with_context(|| format!("{raw}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = check_host(host, port, allow_remote).await?;
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => "/v1/ws",
        Some(p) => p,
    };
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    Ok(Endpoint {
        url: format!("ws://{authority}{path}"),
        addr,
        http_base: format!("http://{authority}"),
    })
}

/// Resolves host:port to one address, loopback unless allowed otherwise.
pub async fn check_host(host: &str, port: u16, allow_remote: bool) -> anyhow::Result<SocketAddr> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    let addr = *addrs.first().with_context(|| format!("{host} resolves to nothing"))?;
    if !allow_remote && !addrs.iter().all(|a| a.ip().is_loopback()) {
        bail!("{host} is not a loopback address; pass --allow-non-loopback to drive it");
    }
    Ok(addr)
}

/// Client settings: a small read buffer (tungstenite allocates it eagerly,
/// 128 KiB by default), writes coalesced up to 16 KiB before a flush.
pub fn ws_config(read_buffer: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer.max(1024))
        .write_buffer_size(16 * 1024)
}

/// Opens a WebSocket to `ep` as the holder of `token`. The error is a short
/// reason, fit to count by.
pub async fn open(ep: &Endpoint, token: &str, config: WebSocketConfig, limit: Duration) -> Result<Ws, String> {
    let sep = if ep.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}token={token}", ep.url);
    let attempt = async {
        let tcp = connect_tcp(ep.addr).await.map_err(|e| format!("tcp {:?}", e.kind()))?;
        let _ = tcp.set_nodelay(true);
        let (ws, _response) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .map_err(|e| reason(&e))?;
        Ok(ws)
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(r) => r,
        Err(_) => Err("timeout".into()),
    }
}

/// Loopback source addresses the load tool's connections are spread over.
/// From one address to one port, the kernel's search for a free ephemeral
/// port grows with the connections already open: at 19,500 connections it
/// was 58 % of the load tool's CPU (`__inet_check_established`,
/// `__inet_hash_connect`), which the connect rate then measured.
const LOOPBACK_SOURCES: u32 = 64;
static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// Connects to `addr`; to an IPv4 loopback address, from one of
/// `LOOPBACK_SOURCES` addresses in 127.0.1.0/24 in turn.
async fn connect_tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    match addr {
        SocketAddr::V4(v4) if v4.ip().is_loopback() => {
            let n = NEXT_SOURCE.fetch_add(1, Relaxed) % LOOPBACK_SOURCES;
            let source = Ipv4Addr::new(127, 0, 1, 1 + n as u8);
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(source.into(), 0))?;
            socket.connect(addr).await
        }
        _ => TcpStream::connect(addr).await,
    }
}

fn reason(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("http {}", resp.status().as_u16()),
        WsError::Io(io) => format!("io {:?}", io.kind()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => "closed".into(),
        WsError::Protocol(p) => format!("protocol: {p}"),
        other => {
            let mut s = other.to_string();
            s.truncate(60);
            s
        }
    }
}

/// State every connection's tasks share.
pub struct Shared {
    /// The phase being run; readers look it up when a stamp names another.
    pub current: Mutex<Option<Arc<PhaseTracker>>>,
    /// Deliveries or acks of a phase that is over (late arrivals).
    pub stale: AtomicU64,
    /// Frames we did not write (foreign bodies, binary frames, bad JSON).
    pub foreign: AtomicU64,
    /// Errors whose `ref` names no send of ours.
    pub other_errors: Mutex<BTreeMap<String, u64>>,
    /// Connections ended by the server or the network, by reason.
    pub closes: Mutex<BTreeMap<String, u64>>,
    /// Set when the run ends: readers stop.
    pub stop: CancellationToken,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            current: Mutex::new(None),
            stale: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            other_errors: Mutex::new(BTreeMap::new()),
            closes: Mutex::new(BTreeMap::new()),
            stop: CancellationToken::new(),
        }
    }

    fn closed(&self, why: String) {
        *self
            .closes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(why)
            .or_default() += 1;
    }

    pub fn closes(&self) -> BTreeMap<String, u64> {
        self.closes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tracker(&self, phase: u32, cache: &mut Option<Arc<PhaseTracker>>) -> Option<Arc<PhaseTracker>> {
        if let Some(t) = cache {
            if t.phase == phase {
                return Some(t.clone());
            }
        }
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        *cache = current;
        match cache {
            Some(t) if t.phase == phase => Some(t.clone()),
            _ => None,
        }
    }
}

/// What the dispatcher hands a writer.
pub struct SendCmd {
    pub tracker: Arc<PhaseTracker>,
    pub k: u32,
    pub sched_ns: u64,
}

/// Frames written per flush when the writer has a backlog.
const WRITE_BATCH: usize = 64;

/// Writes the sends handed to sender `me` (target: `"to":"…"` or
/// `"chat":"…"`), coalescing a backlog into one flush, until the channel
/// closes; then closes the socket politely.
pub async fn writer(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<SendCmd>,
    me: u32,
    target: String,
    body_len: usize,
) {
    let mut dead = false;
    let mut batch: Vec<SendCmd> = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            if dead {
                cmd.tracker.on_not_sent(1);
            } else {
                let stamp = Stamp {
                    sent_ns: cmd.sched_ns,
                    phase: cmd.tracker.phase,
                    sender: me,
                    k: cmd.k,
                };
                let frame = send_frame(&target, &stamp, body_len);
                batch.push(cmd);
                if sink.feed(Message::text(frame)).await.is_err() {
                    dead = true;
                }
            }
            if batch.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let ok = !dead && sink.flush().await.is_ok();
            dead = !ok;
            let now = now_ns();
            for cmd in batch.drain(..) {
                if ok {
                    cmd.tracker.on_sent(me as usize, cmd.k as usize, cmd.sched_ns, now);
                } else {
                    cmd.tracker.on_not_sent(1);
                }
            }
        }
    }
    if !dead {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = sink.send(Message::Close(None)).await;
            let _ = sink.close().await;
        })
        .await;
    }
}

/// Reads connection `me` (sender index `sender`, if it sends) until the run
/// stops or the connection ends.
pub async fn reader(mut stream: SplitStream<Ws>, me: usize, sender: Option<usize>, shared: Arc<Shared>) {
    let mut cache: Option<Arc<PhaseTracker>> = None;
    loop {
        let item = tokio::select! {
            biased;
            _ = shared.stop.cancelled() => return,
            item = stream.next() => item,
        };
        match item {
            None => {
                shared.closed("eof".into());
                return;
            }
            Some(Err(e)) => {
                shared.closed(reason(&e));
                return;
            }
            Some(Ok(Message::Text(text))) => on_text(text.as_str(), me, sender, &shared, &mut cache),
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                shared.closed(format!("close {code}"));
                return;
            }
            Some(Ok(Message::Binary(_))) => {
                shared.foreign.fetch_add(1, Relaxed);
            }
            Some(Ok(_)) => {} // ping/pong: tungstenite answers pings
        }
    }
}

fn on_text(text: &str, me: usize, sender: Option<usize>, shared: &Shared, cache: &mut Option<Arc<PhaseTracker>>) {
    let now = now_ns();
    match parse_incoming(text) {
        Incoming::Message { body } => match parse_body(&body) {
            Some(st) => match shared.tracker(st.phase, cache) {
                Some(t) => t.on_delivery(me, st.sender as usize, st.k as usize, st.sent_ns, now),
                None => {
                    shared.stale.fetch_add(1, Relaxed);
                }
            },
            None => {
                shared.foreign.fetch_add(1, Relaxed);
            }
        },
        Incoming::Ack { reference } => match (sender, reference.as_deref().and_then(parse_ref)) {
            (Some(s), Some((phase, k, sched_ns))) => match shared.tracker(phase, cache) {
                Some(t) => t.on_ack(s, k as usize, sched_ns, now),
                None => {
                    shared.stale.fetch_add(1, Relaxed);
                }
            },
            _ => {
                shared.foreign.fetch_add(1, Relaxed);
            }
        },
        Incoming::Error { code, reference } => {
            let ours = match (sender, reference.as_deref().and_then(parse_ref)) {
                (Some(s), Some((phase, k, _))) => shared.tracker(phase, cache).map(|t| (t, s, k)),
                _ => None,
            };
            match ours {
                Some((t, s, k)) => t.on_error(s, Some(k as usize), &code),
                None => {
                    *shared
                        .other_errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(code.into_owned())
                        .or_default() += 1;
                }
            }
        }
        Incoming::Other => {}
        Incoming::Bad => {
            shared.foreign.fetch_add(1, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_default_to_the_ws_path_and_stay_local() {
        let ep = resolve("ws://127.0.0.1:8081", false).await.unwrap();
        assert_eq!(ep.url, "ws://127.0.0.1:8081/v1/ws");
        assert_eq!(ep.http_base, "http://127.0.0.1:8081");
        assert_eq!(ep.addr, "127.0.0.1:8081".parse().unwrap());
        let lb = resolve("ws://localhost:8080/v1/ws", false).await.unwrap();
        assert!(lb.addr.ip().is_loopback());
        assert!(resolve("ws://10.1.2.3:80", false).await.is_err());
        assert!(resolve("wss://127.0.0.1:443", false).await.is_err());
        assert!(resolve("http://127.0.0.1:8081", false).await.is_err());
    }
}
