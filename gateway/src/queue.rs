//! Accepting a message: the durable step between a `send` and its `ack`.
//!
//! One Lua script (`scripts/accept.lua`) runs atomically in Redis: it checks
//! the idempotency record of the message id, checks access, assigns the
//! chat's next `seq`, appends the job to the queue stream, records the id,
//! and publishes the message for delivery. Only when it returns does the
//! sender get its `ack`. Why `seq` comes from here and how it survives a
//! Redis restart is argued in docs/architecture.md (Ordering).
//!
//! This module never talks to PostgreSQL (the persister does) and never
//! writes to a client (the session does).

use shared::cache::{CachedMessage, VERSION};
use shared::ids::{private_chat_id, ChatId, MessageId, UserId};
use shared::protocol::{ErrorCode, Target};
use shared::queue::STREAM;

use crate::history::cache::{floor_key, recent_key};

use crate::redis_pool::{RedisError, RedisPool};
use crate::run_script::{RunScript, ScriptCall};

/// A message the queue holds: the fields of the `ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: MessageId,
    pub chat: ChatId,
    pub seq: i64,
    pub ts: i64,
    /// The recipient of a private message.
    pub to: Option<UserId>,
    /// True when the id had been accepted before (a resend).
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no such chat")]
    NotFound,
    #[error("not a member of this chat")]
    Forbidden,
    #[error("this id belongs to another user's message")]
    IdTaken,
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl AcceptError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AcceptError::NotFound => ErrorCode::NotFound,
            AcceptError::Forbidden => ErrorCode::Forbidden,
            AcceptError::IdTaken => ErrorCode::BadRequest,
            AcceptError::Redis(_) => ErrorCode::Unavailable,
        }
    }
}

/// What the script needs to know beyond the message itself.
#[derive(Debug, Clone, Copy)]
pub struct QueueSettings {
    pub idempotency_ttl_secs: u64,
    pub seq_restart_gap: u64,
    /// Recent-message cache entries per chat (0: no cache).
    pub cache_size: usize,
    pub cache_ttl_secs: u64,
}

#[derive(Clone)]
pub struct Queue {
    redis: RedisPool,
    script: std::sync::Arc<RunScript>,
    settings: QueueSettings,
}

impl Queue {
    pub fn new(redis: RedisPool, settings: QueueSettings) -> Queue {
        Queue {
            redis,
            script: std::sync::Arc::new(RunScript::new(include_str!("scripts/accept.lua"))),
            settings,
        }
    }

    /// Accepts `body` from `from` to `target` under message id `id`.
    pub async fn accept(
        &self,
        from: UserId,
        target: Target,
        id: MessageId,
        body: &str,
        origin: &str,
    ) -> Result<Accepted, AcceptError> {
        let (chat, to, mode) = match target {
            Target::User(to) => (private_chat_id(from, to), Some(to), "dm"),
            Target::Chat(chat) => (chat, None, "group"),
        };
        let to_text = to.map(|t| t.to_string()).unwrap_or_default();
        // Acceptance time; the cache entry carries it, encoded here once.
        let ts = now_ms();
        let entry = CachedMessage {
            v: VERSION,
            id,
            chat,
            from,
            to,
            body: body.to_string(),
            ts,
        }
        .encode();
        let mut call = ScriptCall::new();
        call.key(format!("msg:{id}"))
            .key(format!("chat:{chat}:meta"))
            .key(format!("chat:{chat}:members"))
            .key(format!("chat:{chat}:seq"))
            .key(STREAM)
            .key(format!("user:{from}:dms"))
            .key(format!("user:{}:dms", to.unwrap_or(from)))
            .key(recent_key(chat))
            .key(floor_key(chat))
            .arg(id.to_string())
            .arg(chat.to_string())
            .arg(from.to_string())
            .arg(&to_text)
            .arg(body)
            .arg(self.settings.idempotency_ttl_secs)
            .arg(self.settings.seq_restart_gap)
            .arg(origin)
            .arg(mode)
            .arg(ts)
            .arg(entry)
            .arg(self.settings.cache_size)
            .arg(self.settings.cache_ttl_secs);
        let reply: Vec<String> = self.script.call(&self.redis, &call).await?;
        parse_reply(id, &reply)
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn parse_reply(id: MessageId, reply: &[String]) -> Result<Accepted, AcceptError> {
    let bad = || AcceptError::Redis(RedisError::Reply(format!("accept script answered {reply:?}")));
    match reply.first().map(String::as_str) {
        Some(status @ ("ok" | "dup")) if reply.len() == 5 => Ok(Accepted {
            id,
            chat: reply[1].parse().map_err(|_| bad())?,
            seq: reply[2].parse().map_err(|_| bad())?,
            ts: reply[3].parse().map_err(|_| bad())?,
            to: if reply[4].is_empty() {
                None
            } else {
                Some(reply[4].parse().map_err(|_| bad())?)
            },
            duplicate: status == "dup",
        }),
        Some("not_found") => Err(AcceptError::NotFound),
        Some("forbidden") => Err(AcceptError::Forbidden),
        Some("conflict") => Err(AcceptError::IdTaken),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_replies_map_to_outcomes() {
        let id = uuid::Uuid::now_v7();
        let chat = uuid::Uuid::now_v7();
        let ok = parse_reply(
            id,
            &["dup".into(), chat.to_string(), "4".into(), "99".into(), "".into()],
        )
        .unwrap();
        assert_eq!((ok.chat, ok.seq, ok.ts, ok.to, ok.duplicate), (chat, 4, 99, None, true));
        assert!(matches!(
            parse_reply(id, &["forbidden".into()]),
            Err(AcceptError::Forbidden)
        ));
        assert_eq!(
            parse_reply(id, &["weird".into()]).unwrap_err().code(),
            ErrorCode::Unavailable
        );
    }
}
