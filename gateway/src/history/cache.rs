//! The recent-message cache in Redis: the latest messages of each chat.
//!
//! The accept script writes each message into `chat:<id>:recent` (a sorted
//! set scored by seq, values in `shared::cache`'s MessagePack format) and
//! trims it to the newest `CHAT_CACHE_SIZE`; `chat:<id>:recent:floor` says
//! from which seq on the set holds every message of the chat (0: from the
//! first). Both expire `CHAT_CACHE_TTL_SECS` after the last read, refill,
//! start of the cache or 16th message (writes renew the TTL when they trim).
//! This module reads windows from it, proving from the floor that a window is
//! complete, and fills it from PostgreSQL's rows, never claiming a message
//! still in the queue (in neither) as absent. It never decides access.

use std::sync::Arc;

use shared::cache::CachedMessage;
use shared::ids::ChatId;
use shared::keys;
use shared::protocol::Message;

use super::Window;
use crate::redis_pool::{RedisError, RedisPool};
use crate::run_script::{RunScript, ScriptCall};

/// The answer of the cache to a window.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Vec<Message>),
    /// No usable cache for the chat (none, from before a Redis restart, or
    /// an entry of an unknown format version): a refill is worth it.
    Cold,
    /// The cache is there but cannot prove the window complete (older
    /// messages than it holds).
    Outside,
}

#[derive(Clone)]
pub struct RecentCache {
    redis: RedisPool,
    /// Entries per chat; 0 turns the cache off.
    pub size: usize,
    ttl_secs: u64,
    read: Arc<RunScript>,
    fill: Arc<RunScript>,
}

/// What the accept script needs to maintain the cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub size: usize,
    pub ttl_secs: u64,
}

impl RecentCache {
    pub fn new(redis: RedisPool, settings: CacheSettings) -> RecentCache {
        RecentCache {
            redis,
            size: settings.size,
            ttl_secs: settings.ttl_secs,
            read: Arc::new(RunScript::new(include_str!("../scripts/recent_read.lua"))),
            fill: Arc::new(RunScript::new(include_str!("../scripts/recent_fill.lua"))),
        }
    }

    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// The window, oldest first, when the cache can prove it complete.
    pub async fn read(&self, chat: ChatId, w: Window) -> Result<Lookup, RedisError> {
        if !self.enabled() {
            return Ok(Lookup::Cold);
        }
        let ascending = w.after.is_some();
        let mut call = ScriptCall::new();
        call.key(keys::chat_recent(chat))
            .key(keys::chat_recent_floor(chat))
            .arg(if ascending { "after" } else { "latest" })
            .arg(w.after.map(|s| s.to_string()).unwrap_or_default())
            .arg(w.before.map(|s| s.to_string()).unwrap_or_default())
            .arg(w.limit)
            .arg(self.ttl_secs);
        let reply: (Option<i64>, Vec<(Vec<u8>, i64)>) =
            match self.read.call::<Vec<redis::Value>>(&self.redis, &call).await? {
                v if v.is_empty() => return Ok(Lookup::Cold),
                v => redis::FromRedisValue::from_redis_value(&redis::Value::Array(v))
                    .map_err(|e| RedisError::Reply(e.to_string()))?,
            };
        let (Some(floor), rows) = reply else {
            return Ok(Lookup::Cold);
        };
        let mut messages = Vec::with_capacity(rows.len());
        for (entry, seq) in rows {
            // Two encodings of one message (writers of different versions)
            // share a score: keep the first.
            if messages.last().is_some_and(|m: &Message| m.seq == seq) {
                continue;
            }
            match CachedMessage::decode(&entry, seq) {
                Ok(m) => messages.push(m),
                Err(e) => {
                    metrics::counter!("gateway_cache_bad_entries_total").increment(1);
                    tracing::debug!(error = %e, %chat, "cache entry not readable: treating as a miss");
                    return Ok(Lookup::Cold);
                }
            }
        }
        let complete = match w.after {
            // Every message after the cursor is at or above the floor.
            Some(after) => floor <= after + 1,
            // A full page, or the whole chat is cached.
            None => messages.len() as i64 == w.limit || floor == 0,
        };
        if !complete {
            return Ok(Lookup::Outside);
        }
        if !ascending {
            messages.reverse();
        }
        Ok(Lookup::Hit(messages))
    }

    /// Merges `latest`, the newest stored messages of `chat` (oldest first),
    /// into the cache, as far as they connect to what the cache or the
    /// chat's counter already proves (`scripts/recent_fill.lua`): messages
    /// still in the queue are in neither, so rows that do not reach up to
    /// them prove nothing. Returns the floor written, `None` when the cache
    /// was left as it was.
    pub async fn fill(&self, chat: ChatId, latest: &[Message]) -> Result<Option<i64>, RedisError> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut call = ScriptCall::new();
        call.key(keys::chat_recent(chat))
            .key(keys::chat_recent_floor(chat))
            .key(keys::chat_seq(chat))
            .arg(self.size)
            .arg(self.ttl_secs);
        for m in latest {
            call.arg(m.seq).arg(CachedMessage::of(m).encode());
        }
        let floor: i64 = self.fill.call(&self.redis, &call).await?;
        Ok((floor >= 0).then_some(floor))
    }
}
