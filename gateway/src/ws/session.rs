//! One client connection: reads frames, runs handlers, writes queued frames.
//!
//! The session owns the socket and its state (encoding, token expiry, the
//! chats it receives). It closes the socket with the contract's codes: 1009
//! for an oversize frame, 1008 when its outgoing queue overflowed, 4001 when
//! its token expired, 1001 when the node shuts down. Dropping a session
//! removes its connection from the hub.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{FutureExt, SinkExt, StreamExt};
use shared::codec::{decode_client, Encoding};
use shared::ids::ChatId;
use shared::protocol::{close, ErrorCode, ServerEvent};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use crate::auth::Identity;
use crate::hub::{encode_encoding, Conn, Frame, Outbound};
use crate::limits::ConnSlot;
use crate::ws::events::Resync;
use crate::ws::upgrade::Socket;
use crate::Services;

/// Frames written per flush when the queue has a backlog.
const WRITE_BATCH: usize = 64;
/// How long writing a Close frame, or closing, may take.
const CLOSE_WRITE: Duration = Duration::from_secs(1);
/// How long to wait for the client's Close after ours (outside a drain).
const CLOSE_LINGER: Duration = Duration::from_secs(2);
/// At most this many already-received frames are answered during a drain,
/// for at most this long; what the client sent later is not accepted (it
/// resends with the same ids to another node).
const DRAIN_FRAMES: usize = 10_000;
const DRAIN_ANSWERING: Duration = Duration::from_secs(1);

pub struct Session {
    pub(super) svc: Arc<Services>,
    pub(super) identity: Identity,
    pub(super) conn: Conn,
    rx: mpsc::Receiver<Outbound>,
    encoding: Arc<AtomicU8>,
    /// Set by the first frame the client sends.
    chosen: Option<Encoding>,
    /// Chats this connection is attached to in the hub.
    pub(super) chats: HashSet<ChatId>,
    /// When the current token expires.
    pub(super) expires: Instant,
    /// When the client last sent anything (a frame, a pong).
    last_heard: Instant,
    /// A resync could not read the user's groups: tried again at each ping.
    pub(super) resync_due: bool,
    /// Counts this connection against the user's and the node's limits.
    _slot: ConnSlot,
}

enum Flow {
    Continue,
    Close(u16, &'static str),
    Gone,
}

/// The session's three reasons to close, wherever they are noticed.
const OVERFLOWED: Flow = Flow::Close(close::POLICY, "outgoing queue overflow");
const DRAINING: Flow = Flow::Close(close::GOING_AWAY, "node shutting down");
const EXPIRED: Flow = Flow::Close(close::TOKEN_EXPIRED, "token expired");

/// What one turn of the session's loop came to: a read from the client to
/// handle, or the outcome of anything else.
enum Next {
    Read(Option<Result<WsMessage, tungstenite::Error>>),
    Done(Flow),
}

impl Session {
    pub(super) fn new(
        svc: Arc<Services>,
        identity: Identity,
        conn: Conn,
        rx: mpsc::Receiver<Outbound>,
        encoding: Arc<AtomicU8>,
        slot: ConnSlot,
    ) -> Session {
        let expires = expiry_instant(identity.exp);
        Session {
            svc,
            identity,
            conn,
            rx,
            encoding,
            chosen: None,
            chats: HashSet::new(),
            expires,
            last_heard: Instant::now(),
            resync_due: false,
            _slot: slot,
        }
    }

    pub(super) fn track_chat(&mut self, chat: ChatId) {
        self.chats.insert(chat);
    }

    /// Serves the upgraded socket until either side ends it.
    ///
    /// The loop wakes for every frame the hub queues, so what it waits on is
    /// built once, outside it: re-creating a timer or a cancellation future
    /// per wake costs a timer-wheel insertion or a lock each time.
    ///
    /// Not an `async fn`: that would keep the session and the socket twice
    /// in every session's future, as the arguments and as the locals they
    /// are moved into (536 bytes per connection, rust-lang/rust#62958).
    #[allow(clippy::manual_async_fn)]
    pub fn run(mut self, mut ws: Socket) -> impl std::future::Future<Output = ()> {
        async move {
            metrics::gauge!("gateway_connections").increment(1.0);
            let overflow_token = self.conn.overflow_token();
            let overflow = overflow_token.cancelled();
            // Once the node drains, this session waits for its turn to close
            // (paced node-wide) and keeps serving meanwhile. A child token: its
            // lock is this session's, not one shared by every session.
            let shutdown = self.svc.shutdown.child_token();
            let shut_down = shutdown.clone();
            let svc = self.svc.clone();
            let closing = async move {
                shutdown.cancelled().await;
                svc.drain.turn(svc.sessions.len()).await;
            };
            let (ping_every, ping_timeout) = (self.svc.config.ping_interval, self.svc.config.ping_timeout);
            let silence = ping_every + ping_timeout;
            let mut pings = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
            // After a long stalled write, one ping (and one resync retry), not a burst.
            pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let expiry = tokio::time::sleep_until(self.expires);
            // Armed before each write of queued frames: moving the deadline of a
            // timer that has not fired yet is lock-free in tokio; after an idle
            // spell it re-registers once.
            let stall = tokio::time::sleep(silence);
            tokio::pin!(overflow, closing, expiry, stall);
            // Set after a write of queued frames: the client's frames come next.
            let mut client_turn = false;
            let flow = loop {
                if expiry.deadline() != self.expires {
                    // The client renewed its token.
                    expiry.as_mut().reset(self.expires);
                }
                // The select below serves the queue before the socket. A reader
                // a little slower than its chats keeps the queue from ever being
                // empty, so after each write batch a frame the client has
                // already sent is read first: its sends and pongs wait at most
                // one batch, not until the queue runs dry.
                // Not once a reason to close has fired: the select sees it.
                // (The session's own tokens: no lock shared by every session.)
                let ready = if std::mem::take(&mut client_turn)
                    && !(overflow_token.is_cancelled() || shut_down.is_cancelled() || expiry.is_elapsed())
                {
                    ws.next().now_or_never()
                } else {
                    None
                };
                let next = match ready {
                    Some(read) => Next::Read(read),
                    None => tokio::select! {
                        biased;
                        _ = &mut overflow => Next::Done(OVERFLOWED),
                        _ = &mut closing => Next::Done(DRAINING),
                        _ = &mut expiry => Next::Done(EXPIRED),
                        // Guarded as a write of the queue is: a ping may wait
                        // on Redis (a resync retried) or on a full socket.
                        _ = pings.tick() => Next::Done(tokio::select! {
                            biased;
                            _ = &mut overflow => OVERFLOWED,
                            _ = &mut closing => DRAINING,
                            _ = &mut expiry => EXPIRED,
                            flow = Box::pin(self.ping(&mut ws, silence)) => flow,
                        }),
                        out = self.rx.recv() => Next::Done(match out {
                            // A client that stops reading blocks this write once the
                            // socket buffers are full: the reasons to close must
                            // still end it, and a write stalled as long as a silent
                            // client may be is a gone client.
                            Some(first) => {
                                client_turn = true;
                                stall.as_mut().reset(Instant::now() + silence);
                                tokio::select! {
                                    biased;
                                    _ = &mut overflow => OVERFLOWED,
                                    _ = &mut closing => DRAINING,
                                    _ = &mut expiry => EXPIRED,
                                    _ = &mut stall => {
                                        metrics::counter!("gateway_silent_drops_total").increment(1);
                                        Flow::Gone
                                    }
                                    flow = self.write_queued(first, &mut ws) => flow,
                                }
                            }
                            None => Flow::Gone,
                        }),
                        read = ws.next() => Next::Read(read),
                    },
                };
                // Every idle connection holds this future at its largest
                // state, so the handler of a client frame, the largest thing
                // it awaits (a send's Redis call and more), is boxed and
                // awaited in one place (tests::a_sessions_future_stays_small).
                let flow = match next {
                    Next::Read(Some(Ok(msg))) => Box::pin(self.on_frame(msg, &mut ws)).await,
                    Next::Read(None) => Flow::Gone,
                    Next::Read(Some(Err(e))) if is_too_big(&e) => Flow::Close(close::TOO_BIG, "frame too large"),
                    Next::Read(Some(Err(_))) => Flow::Gone,
                    Next::Done(flow) => flow,
                };
                if !matches!(flow, Flow::Continue) {
                    break flow;
                }
            };
            if let Flow::Close(code, reason) = flow {
                if code == close::POLICY {
                    metrics::counter!("gateway_slow_reader_closes_total").increment(1);
                }
                metrics::counter!("gateway_closes_total", "code" => code.to_string()).increment(1);
                // A draining node has its grace period; keep a fifth of it spare
                // for the server itself. Otherwise the close takes at most a few seconds.
                let deadline = if code == close::GOING_AWAY {
                    self.svc.drain.deadline()
                } else {
                    Instant::now() + CLOSE_LINGER
                };
                if code == close::GOING_AWAY {
                    // Events the client sent before it could know we are leaving
                    // get their answers (ack or error) before the Close frame.
                    let answering = (Instant::now() + DRAIN_ANSWERING).min(deadline);
                    // Boxed for the same reason as the handler above.
                    Box::pin(self.answer_received(&mut ws, answering)).await;
                }
                // A slow reader gets the Close frame only after what it has not
                // read yet: give it as long as a silent client gets.
                let close_write = if code == close::POLICY {
                    ping_every + ping_timeout
                } else {
                    CLOSE_WRITE
                };
                let _ = tokio::time::timeout(
                    close_write,
                    ws.send(WsMessage::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: reason.into(),
                    }))),
                )
                .await;
                // Read, and drop, until the client's Close: closing a socket with
                // unread bytes makes the kernel send a reset, which would discard
                // the acks and the Close frame still on their way to the client.
                let _ = tokio::time::timeout_at(deadline, async {
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() {
                            break;
                        }
                    }
                })
                .await;
                let _ = tokio::time::timeout(CLOSE_WRITE, SinkExt::close(&mut ws)).await;
            }
            metrics::gauge!("gateway_connections").decrement(1.0);
        }
    }

    /// Handles the frames already received and readable now, without waiting
    /// for more, until `until` (a client that keeps sending is cut off). An
    /// event started is finished: an accepted send always gets its ack.
    async fn answer_received(&mut self, ws: &mut Socket, until: Instant) {
        for _ in 0..DRAIN_FRAMES {
            if Instant::now() >= until {
                return;
            }
            match ws.next().now_or_never() {
                Some(Some(Ok(msg))) if !msg.is_close() => {
                    if !matches!(self.on_frame(msg, ws).await, Flow::Continue) {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Pings the client; one that has said nothing for `silence` is gone
    /// (a half-open TCP connection, or a client that stopped reading).
    /// A resync that failed is tried again first.
    async fn ping(&mut self, ws: &mut Socket, silence: Duration) -> Flow {
        if self.last_heard.elapsed() > silence {
            metrics::counter!("gateway_silent_drops_total").increment(1);
            return Flow::Gone;
        }
        if self.resync_due {
            self.resync(Resync::Retry).await;
        }
        self.send_bounded(ws, WsMessage::Ping(Default::default())).await
    }

    async fn on_frame(&mut self, msg: WsMessage, ws: &mut Socket) -> Flow {
        self.last_heard = Instant::now();
        let (encoding, bytes) = match msg {
            WsMessage::Text(text) => (Encoding::Json, text.into()),
            WsMessage::Binary(bytes) => (Encoding::MsgPack, bytes),
            WsMessage::Close(_) => return Flow::Gone,
            // ping/pong: tungstenite answers pings itself
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => return Flow::Continue,
        };
        if self.chosen.is_none() {
            self.chosen = Some(encoding);
            self.encoding.store(encode_encoding(encoding), Ordering::Relaxed);
        }
        let reply = match decode_client(&bytes, encoding) {
            Ok(frame) => {
                metrics::counter!("gateway_events_in_total", "type" => frame.event.kind()).increment(1);
                self.handle(frame).await
            }
            Err(e) => Some(ServerEvent::error(ErrorCode::BadRequest, e.message, e.reference)),
        };
        match reply {
            Some(event) => self.write_event(&event, ws).await,
            None => Flow::Continue,
        }
    }

    /// Writes a reply in the connection's encoding.
    async fn write_event(&mut self, event: &ServerEvent, ws: &mut Socket) -> Flow {
        if let ServerEvent::Error { code, .. } = event {
            metrics::counter!("gateway_errors_total", "code" => code.as_str()).increment(1);
        }
        let frame = Frame::encode(event, self.encoding());
        self.send_bounded(ws, frame.into_message()).await
    }

    /// Writes and flushes one message. A client that stopped reading stalls
    /// the write once the socket buffers are full; stalled as long as a
    /// silent client may stay, it is gone. Its queue may overflow meanwhile
    /// (a client far behind that sent something and stopped reading): that
    /// ends the write with 1008, as it ends a stalled write of the queue.
    async fn send_bounded(&self, ws: &mut Socket, message: WsMessage) -> Flow {
        let stall = self.svc.config.ping_interval + self.svc.config.ping_timeout;
        let overflow = self.conn.overflow_token();
        tokio::select! {
            biased;
            _ = overflow.cancelled() => OVERFLOWED,
            sent = tokio::time::timeout(stall, ws.send(message)) => match sent {
                Ok(Ok(())) => Flow::Continue,
                Ok(Err(_)) => Flow::Gone,
                Err(_) => {
                    metrics::counter!("gateway_silent_drops_total").increment(1);
                    Flow::Gone
                }
            },
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch), then flushes.
    async fn write_queued(&mut self, first: Outbound, ws: &mut Socket) -> Flow {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(item) = next.take() {
            match item {
                Outbound::Frame(frame) => {
                    if ws.feed(frame.into_message()).await.is_err() {
                        return Flow::Gone;
                    }
                    written += 1;
                }
                Outbound::Joined(chat) => self.joined_elsewhere(chat).await,
                Outbound::Left(chat) => self.left_elsewhere(chat).await,
                Outbound::Detached(chat) => self.detached(chat).await,
                Outbound::Resync => self.resync(Resync::BusBack).await,
            }
            if written < WRITE_BATCH {
                next = self.rx.try_recv().ok();
            }
        }
        metrics::counter!("gateway_frames_out_total").increment(written as u64);
        match ws.flush().await {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Gone,
        }
    }

    pub(super) fn encoding(&self) -> Encoding {
        self.chosen.unwrap_or(Encoding::Json)
    }

    pub(super) fn now_secs() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let hub = self.svc.hub.clone();
        let (user, conn) = (self.identity.user, self.conn.id);
        let chats: Vec<ChatId> = self.chats.drain().collect();
        tokio::spawn(async move {
            hub.detach_user(user, conn).await;
            for chat in chats {
                hub.detach_chat(chat, conn).await;
            }
        });
    }
}

/// The tokio instant at which a token with expiry `exp` (epoch seconds) expires.
pub(super) fn expiry_instant(exp: i64) -> Instant {
    let left = exp.saturating_sub(Session::now_secs()).max(0) as u64;
    Instant::now() + Duration::from_secs(left)
}

/// Whether a read failed because the frame was over the size limit.
fn is_too_big(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Capacity(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<A, R>(_: impl FnOnce(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every open connection holds its session's future, so its size is
    /// memory per idle connection (docs/benchmarks.md): 4,648 bytes at
    /// 7edc2d8, 4,808 at ac5d62b (a jemalloc size class more per task), 3,096
    /// with the handlers boxed and `run` not an `async fn`, 3,112 with the
    /// early read's own shutdown token. A bound with room, so that what
    /// grows it is noticed.
    #[test]
    fn a_sessions_future_stays_small() {
        let size = returned_size(|(session, ws): (Session, Socket)| session.run(ws));
        println!("Session::run's future: {size} bytes");
        assert!(size <= 3_600, "Session::run's future is {size} bytes");
    }
}
