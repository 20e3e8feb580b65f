//! Chats and memberships, as the gateways hold them in Redis.
//!
//! Redis is the live authority for who belongs to which chat: the gateway
//! checks access there on every send, typing event and read, without
//! touching PostgreSQL. Every change is made by a Lua script that updates
//! the sets, appends a job to the queue stream (so the persister keeps
//! PostgreSQL's copy) and publishes `joined` / `left` on the bus, in one
//! atomic step. The keys, and what each holds, are in [`shared::keys`].
//!
//! The membership version `mver` orders a chat's changes for the persister,
//! which stores a membership only when its version is newer. It is tagged
//! with the Redis run that last advanced it (`mrid`) and jumps by the
//! restart gap after a restart, exactly like the seq counter, so a change
//! after a restart that lost the last changes never reuses a stored version
//! (docs/architecture.md, Ordering). Hence the two scripts that write it
//! run through [`RunScript`].

use std::sync::Arc;

use redis::Script;
use serde::Serialize;
use shared::ids::{ChatId, UserId};
use shared::keys;
use shared::protocol::ErrorCode;
use shared::queue::STREAM;

use crate::redis_pool::{RedisError, RedisPool};
use crate::run_script::{RunScript, ScriptCall};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("no such chat")]
    NotFound,
    #[error("not allowed for this chat")]
    Forbidden,
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl ChatError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ChatError::NotFound => ErrorCode::NotFound,
            ChatError::Forbidden => ErrorCode::Forbidden,
            ChatError::Redis(_) => ErrorCode::Unavailable,
        }
    }
}

/// What a membership change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Done,
    /// Nothing to do: the user already was a member.
    Already,
}

/// A chat in `GET /v1/chats`. `kind` and, for private chats, `members` are
/// additions to the contract (docs/api.md).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChatSummary {
    pub id: ChatId,
    pub title: String,
    pub visibility: String,
    pub kind: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<UserId>,
}

#[derive(Clone)]
pub struct Chats {
    redis: RedisPool,
    scripts: Arc<Scripts>,
    /// How far a membership version jumps after a Redis restart
    /// (`CHAT_SEQ_RESTART_GAP`, the seq counter's gap).
    restart_gap: u64,
}

struct Scripts {
    membership: RunScript,
    create: RunScript,
    access: Script,
    list: Script,
}

impl Chats {
    /// `restart_gap`: how far a chat's membership version jumps at its
    /// first change after a Redis restart.
    pub fn new(redis: RedisPool, restart_gap: u64) -> Chats {
        Chats {
            redis,
            restart_gap,
            scripts: Arc::new(Scripts {
                membership: RunScript::new(include_str!("scripts/membership.lua")),
                create: RunScript::new(include_str!("scripts/create_chat.lua")),
                access: Script::new(include_str!("scripts/access.lua")),
                list: Script::new(include_str!("scripts/list_chats.lua")),
            }),
        }
    }

    /// Creates a group; `members` must hold the creator first and no duplicates.
    pub async fn create(
        &self,
        chat: ChatId,
        title: &str,
        visibility: &str,
        members: &[UserId],
        origin: &str,
    ) -> Result<(), ChatError> {
        let mut call = ScriptCall::new();
        call.key(keys::chat_meta(chat))
            .key(keys::chat_members(chat))
            .key(STREAM);
        for m in members {
            call.key(keys::user_chats(*m));
        }
        call.arg(chat.to_string())
            .arg(title)
            .arg(visibility)
            .arg(members[0].to_string())
            .arg(origin);
        for m in members {
            call.arg(m.to_string());
        }
        let _: Vec<String> = self.scripts.create.call(&self.redis, &call).await?;
        Ok(())
    }

    /// `actor` makes `user` a member (`join` when they are the same person,
    /// the REST `add` otherwise).
    pub async fn add(&self, chat: ChatId, user: UserId, actor: UserId, origin: &str) -> Result<Change, ChatError> {
        let action = if user == actor { "join" } else { "add" };
        self.change(chat, user, actor, action, origin).await
    }

    /// Whether `user` may join `chat` now, without joining it.
    pub async fn may_join(&self, chat: ChatId, user: UserId) -> Result<Change, ChatError> {
        self.change(chat, user, user, "may_join", "").await
    }

    /// `user` stops being a member.
    pub async fn leave(&self, chat: ChatId, user: UserId, origin: &str) -> Result<Change, ChatError> {
        self.change(chat, user, user, "leave", origin).await
    }

    async fn change(
        &self,
        chat: ChatId,
        user: UserId,
        actor: UserId,
        action: &str,
        origin: &str,
    ) -> Result<Change, ChatError> {
        let mut call = ScriptCall::new();
        call.key(keys::chat_meta(chat))
            .key(keys::chat_members(chat))
            .key(keys::user_chats(user))
            .key(STREAM)
            .arg(chat.to_string())
            .arg(user.to_string())
            .arg(actor.to_string())
            .arg(action)
            .arg(origin)
            .arg(self.restart_gap);
        let reply: Vec<String> = self.scripts.membership.call(&self.redis, &call).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Change::Done),
            Some("already") => Ok(Change::Already),
            Some("not_found") => Err(ChatError::NotFound),
            Some("forbidden") => Err(ChatError::Forbidden),
            _ => Err(RedisError::Reply(format!("membership script answered {reply:?}")).into()),
        }
    }

    /// May `user` read `chat`? (contract: members only)
    pub async fn check_access(&self, chat: ChatId, user: UserId) -> Result<(), ChatError> {
        let mut inv = self.scripts.access.prepare_invoke();
        inv.key(keys::chat_meta(chat))
            .key(keys::chat_members(chat))
            .arg(user.to_string());
        let reply: String = self.redis.run(&inv).await?;
        match reply.as_str() {
            "ok" => Ok(()),
            "not_found" => Err(ChatError::NotFound),
            "forbidden" => Err(ChatError::Forbidden),
            other => Err(RedisError::Reply(format!("access script answered {other:?}")).into()),
        }
    }

    /// The groups `user` belongs to, for subscribing a new connection.
    pub async fn groups_of(&self, user: UserId) -> Result<Vec<ChatId>, ChatError> {
        let ids: Vec<String> = self
            .redis
            .query(redis::cmd("SMEMBERS").arg(keys::user_chats(user)))
            .await?;
        Ok(ids.iter().filter_map(|s| s.parse().ok()).collect())
    }

    /// Every chat of `user`: groups and private chats.
    pub async fn list(&self, user: UserId) -> Result<Vec<ChatSummary>, ChatError> {
        let mut inv = self.scripts.list.prepare_invoke();
        inv.key(keys::user_chats(user))
            .key(keys::user_dms(user))
            .arg(keys::CHAT_PREFIX);
        let flat: Vec<String> = self.redis.run(&inv).await?;
        let mut out = Vec::with_capacity(flat.len() / 6);
        for row in flat.chunks_exact(6) {
            let Ok(id) = row[0].parse() else { continue };
            let members = if row[1] == "dm" {
                [&row[4], &row[5]].iter().filter_map(|s| s.parse().ok()).collect()
            } else {
                Vec::new()
            };
            out.push(ChatSummary {
                id,
                kind: if row[1] == "dm" {
                    "direct".into()
                } else {
                    "group".into()
                },
                title: row[2].clone(),
                visibility: row[3].clone(),
                members,
            });
        }
        out.sort_by_key(|c| c.id);
        Ok(out)
    }

    /// The position (`seq`) and `ts` of message `id` in `chat`, from its
    /// idempotency record (kept while it is fresh), for history cursors not
    /// yet in PostgreSQL.
    pub async fn position_of(&self, chat: ChatId, id: uuid::Uuid) -> Result<Option<(i64, i64)>, ChatError> {
        let (c, seq, ts): (Option<String>, Option<i64>, Option<i64>) = self
            .redis
            .query(
                redis::cmd("HMGET")
                    .arg(keys::message(id))
                    .arg("chat")
                    .arg("seq")
                    .arg("ts"),
            )
            .await?;
        Ok(match (c, seq, ts) {
            (Some(c), Some(seq), Some(ts)) if c == chat.to_string() => Some((seq, ts)),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    // That both scripts get their Redis run id is checked with the others in
    // run_script.rs.
    #[test]
    fn the_scripts_that_write_the_membership_version_know_their_redis_run() {
        for template in [
            include_str!("scripts/membership.lua"),
            include_str!("scripts/create_chat.lua"),
        ] {
            assert!(
                !template.contains("HINCRBY"),
                "mver is advanced with its run id: {template}"
            );
        }
    }
}
