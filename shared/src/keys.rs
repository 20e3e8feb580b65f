//! The names of the Redis keys that hold the service's live state.
//!
//! One function per key, so the gateway (which writes them through its Lua
//! scripts) and the persister (whose `restore-redis` rebuilds them from
//! PostgreSQL) never spell a key twice. The table in docs/architecture.md
//! ("Redis keys") says what each holds. The Lua scripts receive these names
//! as `KEYS`; only `list_chats.lua` builds names itself, from
//! [`CHAT_PREFIX`]. Pub/sub channels (`u:<user>`, `c:<chat>`) are not keys
//! and stay with the gateway's hub; the queue's streams are named in
//! [`crate::queue`], with their entry format.

use crate::ids::{ChatId, MessageId, UserId};

/// What every per-chat key starts with; `list_chats.lua` appends
/// `<id>:meta` to it.
pub const CHAT_PREFIX: &str = "chat:";

/// Hash: kind (`group`/`dm`), title, visibility, created_by, created_at,
/// `a`/`b` (the two sides of a private chat), `mver` (a group's membership
/// version), `mrid` (the Redis run that last advanced `mver`).
pub fn chat_meta(chat: ChatId) -> String {
    format!("{CHAT_PREFIX}{chat}:meta")
}

/// Set: a group's members.
pub fn chat_members(chat: ChatId) -> String {
    format!("{CHAT_PREFIX}{chat}:members")
}

/// Hash: the chat's seq counter: `n` (the last seq), `rid` (the Redis run
/// that last advanced it) and, after a restart's jump, `p` (the counter
/// before the jump) and `j` (the first seq after it).
pub fn chat_seq(chat: ChatId) -> String {
    format!("{CHAT_PREFIX}{chat}:seq")
}

/// Sorted set: the chat's recent-message cache, scored by seq.
pub fn chat_recent(chat: ChatId) -> String {
    format!("{CHAT_PREFIX}{chat}:recent")
}

/// Hash: from which seq on the recent cache is complete (`f`) and under
/// which Redis run it was written (`rid`).
pub fn chat_recent_floor(chat: ChatId) -> String {
    format!("{CHAT_PREFIX}{chat}:recent:floor")
}

/// Set: the groups `user` belongs to.
pub fn user_chats(user: UserId) -> String {
    format!("user:{user}:chats")
}

/// Set: the private chats of `user`.
pub fn user_dms(user: UserId) -> String {
    format!("user:{user}:dms")
}

/// Hash with a TTL: the idempotency record of message `id` (from, chat,
/// seq, ts, to).
pub fn message(id: MessageId) -> String {
    format!("msg:{id}")
}

/// String with a short TTL: the typing limit of `from` in `chat` (a private
/// chat is keyed by its id whether it was addressed by user or by chat).
pub fn typing(from: UserId, chat: ChatId) -> String {
    format!("typing:{from}:c:{chat}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn keys_have_the_documented_names() {
        let c: Uuid = "00000000-0000-0000-0000-00000000000c".parse().unwrap();
        let u: Uuid = "00000000-0000-0000-0000-00000000000a".parse().unwrap();
        assert_eq!(chat_meta(c), format!("chat:{c}:meta"));
        assert_eq!(chat_members(c), format!("chat:{c}:members"));
        assert_eq!(chat_seq(c), format!("chat:{c}:seq"));
        assert_eq!(chat_recent(c), format!("chat:{c}:recent"));
        assert_eq!(chat_recent_floor(c), format!("chat:{c}:recent:floor"));
        assert_eq!(user_chats(u), format!("user:{u}:chats"));
        assert_eq!(user_dms(u), format!("user:{u}:dms"));
        assert_eq!(message(u), format!("msg:{u}"));
        assert_eq!(typing(u, c), format!("typing:{u}:c:{c}"));
    }

    #[test]
    fn list_chats_builds_the_meta_key_from_the_prefix() {
        let c = Uuid::new_v4();
        assert_eq!(format!("{CHAT_PREFIX}{c}:meta"), chat_meta(c));
    }
}
