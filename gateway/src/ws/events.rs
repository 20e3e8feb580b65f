//! One handler per client event type; each returns the direct reply, if any.
//!
//! `send` → the queue (ack or error); `typing` → the typing relay; `join` /
//! `leave` → chat membership (the `joined` / `left` events come back over the
//! bus); `ping` → `pong`; `auth` → a fresh token for the same user.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use shared::ids::{new_id, ChatId};
use shared::protocol::{storable, ClientEvent, ClientFrame, ErrorCode, ServerEvent, Target};

use super::session::{expiry_instant, Session};
use crate::chats::{Change, ChatError};

impl Session {
    pub(super) async fn handle(&mut self, frame: ClientFrame) -> Option<ServerEvent> {
        let reference = frame.reference;
        let result = match frame.event {
            ClientEvent::Send { to, chat, body, id } => self.on_send(to, chat, body, id, &reference).await,
            ClientEvent::Typing { to, chat } => self.on_typing(to, chat).await,
            ClientEvent::Join { chat } => self.on_join(chat).await,
            ClientEvent::Leave { chat } => self.on_leave(chat).await,
            ClientEvent::Ping => Ok(Some(ServerEvent::Pong {
                reference: reference.clone(),
            })),
            ClientEvent::Auth { token } => self.on_auth(&token, &reference),
        };
        match result {
            Ok(reply) => reply,
            Err((code, message)) => Some(ServerEvent::error(code, message, reference)),
        }
    }

    fn origin(&self) -> String {
        self.svc.origin.of(self.conn.id)
    }

    async fn on_send(
        &mut self,
        to: Option<uuid::Uuid>,
        chat: Option<ChatId>,
        body: String,
        id: Option<uuid::Uuid>,
        reference: &Option<String>,
    ) -> Reply {
        let target = Target::from_fields(to, chat).ok_or((ErrorCode::BadRequest, EXACTLY_ONE.to_string()))?;
        if !self.svc.limits.sends.allow(self.identity.user) {
            return Err((
                ErrorCode::RateLimited,
                "too many sends; slow down and resend with the same id".into(),
            ));
        }
        let limit = self.svc.config.max_body_bytes;
        if body.len() > limit {
            return Err((
                ErrorCode::TooLarge,
                format!("body is {} bytes; the limit is {limit}", body.len()),
            ));
        }
        if !storable(&body) {
            return Err((ErrorCode::BadRequest, NUL.to_string()));
        }
        let started = Instant::now();
        let id = id.unwrap_or_else(new_id);
        let accepted = self
            .svc
            .queue
            .accept(self.identity.user, target, id, &body, &self.origin())
            .await
            .map_err(|e| {
                if e.code() == ErrorCode::Unavailable {
                    tracing::warn!(error = %e, "send refused: queue unavailable");
                }
                (e.code(), e.to_string())
            })?;
        metrics::histogram!("gateway_send_ack_seconds").record(started.elapsed().as_secs_f64());
        Ok(Some(ServerEvent::Ack {
            reference: reference.clone(),
            id: accepted.id,
            chat: accepted.chat,
            seq: accepted.seq,
            ts: accepted.ts,
        }))
    }

    async fn on_typing(&mut self, to: Option<uuid::Uuid>, chat: Option<ChatId>) -> Reply {
        let target = Target::from_fields(to, chat).ok_or((ErrorCode::BadRequest, EXACTLY_ONE.to_string()))?;
        self.svc
            .typing
            .relay(self.identity.user, target, &self.origin())
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        Ok(None)
    }

    fn check_join_rate(&self) -> Result<(), (ErrorCode, String)> {
        if self.svc.limits.joins.allow(self.identity.user) {
            Ok(())
        } else {
            Err((ErrorCode::RateLimited, "too many joins and leaves; slow down".into()))
        }
    }

    async fn on_join(&mut self, chat: ChatId) -> Reply {
        self.check_join_rate()?;
        // Refuse before receiving anything: a connection attached to a chat
        // gets its messages, so only one that may join is attached.
        self.svc
            .chats
            .may_join(chat, self.identity.user)
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        // Receive the chat before joining it, so no message published after
        // the join is missed by this connection.
        // Tracked before the attachment is awaited: a shard keeps the
        // connection even when the subscription fails, and the session
        // detaches only tracked chats.
        let newly_attached = self.chats.insert(chat);
        if newly_attached && self.svc.hub.attach_chat(chat, self.conn.clone()).await.is_err() {
            self.svc.hub.detach_chat(chat, self.conn.id).await;
            self.chats.remove(&chat);
            return Err((ErrorCode::Unavailable, "cluster bus unavailable".to_string()));
        }
        match self
            .svc
            .chats
            .add(chat, self.identity.user, self.identity.user, &self.origin())
            .await
        {
            // `joined` reaches every member, this connection included, over the bus.
            Ok(Change::Done) => Ok(None),
            Ok(Change::Already) => Ok(Some(ServerEvent::Joined {
                chat,
                user: self.identity.user,
            })),
            Err(e) => {
                if newly_attached {
                    self.svc.hub.detach_chat(chat, self.conn.id).await;
                    self.chats.remove(&chat);
                }
                Err((e.code(), e.to_string()))
            }
        }
    }

    async fn on_leave(&mut self, chat: ChatId) -> Reply {
        self.check_join_rate()?;
        // `left` comes back over the bus, and with it the detach.
        self.svc
            .chats
            .leave(chat, self.identity.user, &self.origin())
            .await
            .map_err(|e| (e.code(), e.to_string()))?;
        Ok(None)
    }

    fn on_auth(&mut self, token: &str, reference: &Option<String>) -> Reply {
        let fresh = self
            .svc
            .verifier
            .verify(token)
            .map_err(|e| (ErrorCode::Forbidden, e.to_string()))?;
        if fresh.user != self.identity.user {
            return Err((ErrorCode::Forbidden, "token is for another user".to_string()));
        }
        self.identity.exp = fresh.exp;
        self.expires = expiry_instant(fresh.exp);
        Ok(Some(ServerEvent::Authed {
            reference: reference.clone(),
            exp: fresh.exp,
        }))
    }

    /// The user joined `chat` (on any device): receive it here too.
    pub(super) async fn joined_elsewhere(&mut self, chat: ChatId) {
        if self.chats.insert(chat) {
            self.attach_tracked(chat).await;
        }
    }

    /// Makes the hub send `chat` (already tracked) to this connection; if
    /// the bus cannot subscribe, history has the chat's messages.
    async fn attach_tracked(&self, chat: ChatId) {
        if self.svc.hub.attach_chat(chat, self.conn.clone()).await.is_err() {
            tracing::warn!(%chat, "could not subscribe to a chat of the user's; history has its messages");
        }
    }

    /// The user left `chat`: stop receiving it.
    pub(super) async fn left_elsewhere(&mut self, chat: ChatId) {
        // Untracked only once detached: this runs while writing queued
        // frames, which a close can cancel, and the session's Drop detaches
        // the chats still tracked.
        if self.chats.contains(&chat) {
            self.svc.hub.detach_chat(chat, self.conn.id).await;
            self.chats.remove(&chat);
        }
    }

    /// The bus lost the user's channel for a while and has it again, so a
    /// `joined` or `left` published meanwhile may never arrive: read the
    /// user's groups again and receive exactly those. The read comes after
    /// the channel is back, so a change made after it arrives as an event
    /// (and finds the connection already attached or detached).
    ///
    /// Every connection of the shard reads at once, just after an outage, so
    /// a failed read is tried twice more after a random wait; if all three
    /// fail, the session reads once more at each ping until a read succeeds
    /// (until then, history has what it misses). A chat missing
    /// from the user's groups is left only when its check says `forbidden`:
    /// a Redis that lost its data (until `persister restore-redis`) knows
    /// neither the chat nor the membership, and the connection keeps it.
    pub(super) async fn resync(&mut self, why: Resync) {
        let waits: &[Option<u64>] = match why {
            Resync::BusBack => &RESYNC_RETRY_MS,
            // The session waits on nothing else meanwhile: one read, no waits.
            Resync::Retry => &[None],
        };
        let mut groups = None;
        for &wait_ms in waits {
            match self.svc.chats.groups_of(self.identity.user).await {
                Ok(read) => {
                    groups = Some(read.into_iter().collect::<HashSet<ChatId>>());
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "reading the user's groups after the bus reconnected failed");
                    if let Some(ms) = wait_ms {
                        tokio::time::sleep(Duration::from_millis(ms / 2 + crate::random_u64() % ms)).await;
                    }
                }
            }
        }
        let Some(groups) = groups else {
            let outcome = match why {
                Resync::BusBack => "failed",
                Resync::Retry => "retry_failed",
            };
            metrics::counter!("gateway_membership_resyncs_total", "outcome" => outcome).increment(1);
            if !self.resync_due {
                tracing::warn!("could not read the user's groups after the bus reconnected; trying again at each ping, and history has what is missed meanwhile");
            }
            self.resync_due = true;
            return;
        };
        if std::mem::take(&mut self.resync_due) {
            tracing::info!("read the user's groups again after a resync had failed");
        }
        metrics::counter!("gateway_membership_resyncs_total", "outcome" => "done").increment(1);
        let joined: Vec<ChatId> = groups.difference(&self.chats).copied().collect();
        let missing: Vec<ChatId> = self.chats.difference(&groups).copied().collect();
        for chat in missing {
            if let Err(ChatError::Forbidden) = self.svc.chats.check_access(chat, self.identity.user).await {
                self.left_elsewhere(chat).await;
            }
        }
        for chat in joined {
            self.joined_elsewhere(chat).await;
        }
    }

    /// The chat's channel carried a leave of this user, and its shard no
    /// longer sends the chat here. The user's and the chat's channels arrive
    /// over different connections, so a leave followed at once by a join
    /// can reach the shard after the join re-attached this connection: a
    /// user who is a member again is attached again.
    ///
    /// The chat stays tracked until the answer is known, and a user who is
    /// not a member is detached here too: between the shard's detach and
    /// now, a join this session handled may have attached the connection
    /// again, and the session's Drop detaches only tracked chats.
    pub(super) async fn detached(&mut self, chat: ChatId) {
        if !self.chats.contains(&chat) {
            return;
        }
        match self.svc.chats.check_access(chat, self.identity.user).await {
            Ok(()) => self.attach_tracked(chat).await,
            Err(e) => {
                if !matches!(e, ChatError::Forbidden | ChatError::NotFound) {
                    tracing::warn!(%chat, error = %e, "could not check a membership after a leave; not receiving the chat");
                }
                self.left_elsewhere(chat).await;
            }
        }
    }
}

type Reply = Result<Option<ServerEvent>, (ErrorCode, String)>;

/// Why a session reads its user's groups again.
#[derive(Debug, Clone, Copy)]
pub(super) enum Resync {
    /// The bus has the user's channel again after losing it (`Outbound::Resync`).
    BusBack,
    /// A ping, after a resync whose reads all failed.
    Retry,
}

/// A resync's reads: the first at once, then after about 0.2 s and 1 s
/// (each wait between half and one and a half of the figure), then no more.
const RESYNC_RETRY_MS: [Option<u64>; 3] = [Some(200), Some(1_000), None];

const EXACTLY_ONE: &str = "give exactly one of `to` (a user id) and `chat` (a chat id)";
const NUL: &str = "body contains the NUL character (U+0000), which cannot be stored";
