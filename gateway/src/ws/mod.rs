//! WebSocket sessions: `GET /v1/ws`, one task per connection.
//!
//! `open` runs before the HTTP upgrade completes: it registers the
//! connection in the hub and waits until the node receives the user's
//! channel and the channels of the user's groups, so nothing sent to the
//! user after the handshake is missed. `upgrade` answers the handshake and
//! hands over the socket. `session` then owns the socket: it
//! reads frames, hands each event to its handler in `events`, and writes
//! what the hub queues for it.

pub mod drain;
mod events;
mod session;
pub mod upgrade;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::hub::{encode_encoding, Conn};
use crate::limits::ConnRefused;
use crate::Services;
pub use session::Session;
use shared::codec::Encoding;

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("node is draining")]
    Draining,
    #[error("redis unavailable")]
    Unavailable,
    /// The subscriptions or the read of the user's groups took too long.
    #[error("the node could not open the connection within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Refused(#[from] ConnRefused),
}

/// Registers a new connection of `identity` and returns its session, ready
/// to run on the upgraded socket. Gives up after
/// `GATEWAY_HANDSHAKE_TIMEOUT_SECS`: the handshake then gets 503 rather
/// than hold the client (and its connection slot) on a bus or a Redis that
/// does not answer.
pub async fn open(svc: Arc<Services>, identity: Identity) -> Result<Session, OpenError> {
    let bound = svc.config.handshake_timeout;
    // Given up half-way, `register`'s session is dropped, and its Drop
    // undoes what was registered so far.
    match tokio::time::timeout(bound, register(svc, identity)).await {
        Ok(opened) => opened,
        Err(_) => Err(OpenError::TimedOut(bound)),
    }
}

async fn register(svc: Arc<Services>, identity: Identity) -> Result<Session, OpenError> {
    if svc.shutdown.is_cancelled() {
        return Err(OpenError::Draining);
    }
    let slot = svc.limits.conns.admit(identity.user)?;
    let id = svc.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(svc.config.outbound_queue);
    let encoding = Arc::new(AtomicU8::new(encode_encoding(Encoding::Json)));
    let conn = Conn::new(id, identity.user, tx, encoding.clone(), CancellationToken::new());
    // From here on the session's Drop undoes the registrations, also when
    // the handshake is abandoned half-way.
    let mut session = Session::new(svc.clone(), identity, conn.clone(), rx, encoding, slot);
    // The user's channel first: a `joined` or `left` published from now on
    // is queued for this connection, so the list of groups read next cannot
    // miss a change made while the connection opens.
    svc.hub
        .attach_user(conn.clone())
        .await
        .map_err(|_| OpenError::Unavailable)?;
    let groups = svc
        .chats
        .groups_of(session.identity.user)
        .await
        .map_err(|_| OpenError::Unavailable)?;
    // Tracked before the attachments are awaited: a shard keeps a connection
    // even when its subscription then fails, and only a tracked chat is
    // detached when the session ends.
    for chat in &groups {
        session.track_chat(*chat);
    }
    let attached = join_all(groups.iter().map(|chat| svc.hub.attach_chat(*chat, conn.clone()))).await;
    if attached.iter().any(Result::is_err) {
        return Err(OpenError::Unavailable);
    }
    Ok(session)
}
