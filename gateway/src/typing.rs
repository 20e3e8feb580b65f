//! Typing indicators: relayed live, limited, never stored.
//!
//! The limit of one event per second per sender and target holds across the
//! cluster: `scripts/typing.lua` sets a key that expires after the interval
//! and publishes only when it could set it. Extra events are dropped
//! silently, as the contract says.

use std::sync::Arc;

use redis::Script;
use shared::ids::{private_chat_id, UserId};
use shared::keys;
use shared::protocol::Target;

use crate::chats::ChatError;
use crate::redis_pool::{RedisError, RedisPool};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    Sent,
    /// Within the interval of the previous one: dropped.
    Limited,
}

#[derive(Clone)]
pub struct Typing {
    redis: RedisPool,
    script: Arc<Script>,
    interval_ms: u64,
}

impl Typing {
    pub fn new(redis: RedisPool, interval_ms: u64) -> Typing {
        Typing {
            redis,
            script: Arc::new(Script::new(include_str!("scripts/typing.lua"))),
            interval_ms,
        }
    }

    pub async fn relay(&self, from: UserId, target: Target, origin: &str) -> Result<Relayed, ChatError> {
        // Keyed by the private chat, as when addressed by its id. The script
        // reads the chat's keys only when the target is a chat.
        let (to, chat, keyed) = match target {
            Target::User(to) => (to.to_string(), String::new(), private_chat_id(from, to)),
            Target::Chat(chat) => (String::new(), chat.to_string(), chat),
        };
        let mut inv = self.script.prepare_invoke();
        inv.key(keys::typing(from, keyed))
            .key(keys::chat_meta(keyed))
            .key(keys::chat_members(keyed))
            .arg(from.to_string())
            .arg(to)
            .arg(chat)
            .arg(origin)
            .arg(self.interval_ms);
        let reply: Vec<String> = self.redis.run(&inv).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Relayed::Sent),
            Some("limited") => Ok(Relayed::Limited),
            Some("not_found") => Err(ChatError::NotFound),
            Some("forbidden") => Err(ChatError::Forbidden),
            _ => Err(RedisError::Reply(format!("typing script answered {reply:?}")).into()),
        }
    }
}
