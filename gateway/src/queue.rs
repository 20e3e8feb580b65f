//! Accepting a message: the durable step between a `send` and its `ack`.
//!
//! One Lua script (`scripts/accept.lua`) runs atomically in Redis: it checks
//! the idempotency record of the message id, checks access, assigns the
//! chat's next `seq`, appends the job to the queue stream, records the id,
//! and publishes the message for delivery. Only when it returns does the
//! sender get its `ack`. Why `seq` comes from here and how it survives a
//! Redis restart is argued in docs/architecture.md (Ordering).
//!
//! The script queues a message only within `ACCEPT_DEADLINE_MS` of the
//! gateway's stamp, and `holes_of` tells history what has left the queue;
//! together they let history tell a message still on its way from a hole
//! for good (history::holes).
//!
//! This module never talks to PostgreSQL (the persister does) and never
//! writes to a client (the session does).

use shared::cache::{CachedMessage, VERSION};
use shared::ids::{private_chat_id, ChatId, MessageId, UserId};
use shared::keys;
use shared::protocol::{ErrorCode, Target};
use shared::queue::STREAM;

use crate::redis_pool::{Picked, RedisError, RedisPool};
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
    /// Redis ran the script more than `ACCEPT_DEADLINE_MS` after the gateway
    /// stamped the message (a stall, or this gateway's clock behind Redis's).
    #[error("the queue took the message {0} ms after it was sent, later than the {ACCEPT_DEADLINE_MS} ms allowed; nothing was accepted")]
    Late(i64),
    #[error(transparent)]
    Redis(#[from] RedisError),
}

impl AcceptError {
    pub fn code(&self) -> ErrorCode {
        match self {
            AcceptError::NotFound => ErrorCode::NotFound,
            AcceptError::Forbidden => ErrorCode::Forbidden,
            AcceptError::IdTaken => ErrorCode::BadRequest,
            AcceptError::Late(_) | AcceptError::Redis(_) => ErrorCode::Unavailable,
        }
    }
}

/// How long after a message's `ts` (the gateway's clock) Redis may still
/// queue it (its own clock); a later call is refused. The same on every
/// gateway, so history can rely on it: no queue entry's id time is later
/// than its message's `ts` plus this (history::holes). It also bounds how far
/// a gateway's clock may lag Redis's.
pub const ACCEPT_DEADLINE_MS: i64 = 10_000;

/// The seqs a chat's counter skipped after a Redis restart (the accept
/// script records its last jump): none of `before + 1 .. first_after` was
/// ever given to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqJump {
    pub before: i64,
    pub first_after: i64,
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

    /// What the queue can say about the holes in `chat`'s stored messages:
    /// a time (ms, Redis's clock) such that every message queued before it
    /// has left the queue (stored or dead-lettered: the persister deletes
    /// the entry then), which is its oldest entry's id time, or the time of
    /// the read when it is empty; and the chat's last seq jump. One round
    /// trip; `TIME` first, so an empty queue says nothing of what came after.
    pub async fn holes_of(&self, chat: ChatId) -> Result<(i64, Option<SeqJump>), RedisError> {
        /// `TIME`, one entry of `XRANGE`, and the jump's `HMGET`.
        type Reply = ((i64, i64), Vec<(String, redis::Value)>, (Option<i64>, Option<i64>));
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        pipe.cmd("XRANGE").arg(STREAM).arg("-").arg("+").arg("COUNT").arg(1);
        pipe.cmd("HMGET").arg(keys::chat_seq(chat)).arg("p").arg("j");
        let mut picked = self.redis.pick();
        let ((secs, micros), oldest, jump): Reply = self
            .redis
            .timed(picked.slot, pipe.query_async(&mut picked.conn))
            .await?;
        let since_ms = match oldest.first() {
            None => secs * 1000 + micros / 1000,
            Some((id, _)) => id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .ok_or_else(|| RedisError::Reply(format!("a queue entry id that is not <ms>-<n>: {id:?}")))?,
        };
        let jump = match jump {
            (Some(before), Some(first_after)) => Some(SeqJump { before, first_after }),
            _ => None,
        };
        Ok((since_ms, jump))
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
        let ts = crate::clock::now_ms();
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
        // A send by chat id may turn out to be to a private chat, whose
        // recipient only the script learns: it puts it into the entry.
        let slot = RecipientSlot::get();
        let mut call = ScriptCall::new();
        call.key(keys::message(id))
            .key(keys::chat_meta(chat))
            .key(keys::chat_members(chat))
            .key(keys::chat_seq(chat))
            .key(STREAM)
            .key(keys::user_dms(from))
            .key(keys::user_dms(to.unwrap_or(from)))
            .key(keys::chat_recent(chat))
            .key(keys::chat_recent_floor(chat))
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
            .arg(self.settings.cache_ttl_secs)
            .arg(slot.map(|s| s.bytes.as_slice()).unwrap_or_default())
            .arg(slot.map(|s| s.at).unwrap_or_default())
            .arg(ACCEPT_DEADLINE_MS);
        let mut picked = self.redis.pick();
        let failed = match self
            .redis
            .timed(picked.slot, self.script.call_on::<Vec<String>>(&mut picked.conn, &call))
            .await
        {
            Ok(reply) => return parse_reply(id, &reply),
            Err(e @ (RedisError::Timeout(_) | RedisError::Unavailable(_))) => e,
            Err(e) => return Err(e.into()),
        };
        // An answer that came too late, or a connection lost after sending,
        // does not mean the script did not run: Redis runs what it has read.
        // Answering `unavailable` then would tell the client nothing was
        // accepted, and a resend without an `id` would be a second message.
        // So ask, on the same connection and after the script, whether it
        // recorded this id for this sender.
        // (The old connection even when a timeout has it replaced.)
        match self.accepted_meanwhile(&mut picked, id, from).await {
            Some(accepted) => {
                tracing::info!(%id, error = %failed, "the accept script's answer was lost, but it had accepted the message");
                Ok(accepted)
            }
            None => Err(failed.into()),
        }
    }

    /// The message `id` of `from`, if the accept script recorded it.
    async fn accepted_meanwhile(&self, picked: &mut Picked, id: MessageId, from: UserId) -> Option<Accepted> {
        let fields: Vec<Option<String>> = self
            .redis
            .timed(
                picked.slot,
                redis::cmd("HMGET")
                    .arg(keys::message(id))
                    .arg(&["from", "chat", "seq", "ts", "to"])
                    .query_async(&mut picked.conn),
            )
            .await
            .ok()?;
        let [Some(sender), Some(chat), Some(seq), Some(ts), to] = fields.as_slice() else {
            return None;
        };
        if *sender != from.to_string() {
            return None;
        }
        let reply = ["ok", chat, seq, ts, to.as_deref().unwrap_or("")].map(String::from);
        parse_reply(id, &reply).ok()
    }
}

/// Where the recipient goes in a cache entry written without one, so the
/// accept script can complete the entry of a private message sent by chat
/// id to exactly the bytes `CachedMessage::encode` gives with `to` set (the
/// same message must be one set member, whoever writes it).
///
/// The fields before `to` (`v` and three ids, each id a 16-byte binary) have
/// the same length in every entry of this format version, so the place is
/// found once, by encoding a probe message with and without `to`, and
/// checked by rebuilding the probe. If that check ever failed (another
/// encoding), the script gets no slot and drops the chat's cache instead,
/// as a node without a cache does.
#[derive(Debug, PartialEq, Eq)]
struct RecipientSlot {
    /// The map header of an entry with `to`, then the bytes that precede
    /// the recipient's 16 bytes (the key `to` and the binary's header).
    bytes: Vec<u8>,
    /// The 1-based position in the entry without `to` where they go (Lua
    /// indexes strings from 1).
    at: usize,
}

impl RecipientSlot {
    fn get() -> Option<&'static RecipientSlot> {
        static SLOT: std::sync::LazyLock<Option<RecipientSlot>> = std::sync::LazyLock::new(|| {
            let probe = CachedMessage {
                v: VERSION,
                id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
                chat: uuid::Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888),
                from: uuid::Uuid::from_u128(0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0000),
                to: None,
                body: "probe".into(),
                ts: 1_700_000_000_000,
            };
            let to = uuid::Uuid::from_u128(0xfedc_ba98_7654_3210_fedc_ba98_7654_3210);
            RecipientSlot::find(&probe, to)
        });
        SLOT.as_ref()
    }

    /// The slot, found from `message` (without `to`) and a recipient.
    fn find(message: &CachedMessage, to: UserId) -> Option<RecipientSlot> {
        let without = message.encode();
        let with = CachedMessage {
            to: Some(to),
            ..message.clone()
        }
        .encode();
        // What follows the recipient is what follows `from` without one:
        // the longest common tail, since the last byte of the recipient
        // differs from the last byte of `from`'s in the probe.
        let tail = without
            .iter()
            .rev()
            .zip(with.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        let at = without.len().checked_sub(tail)?;
        let before_id = with.len().checked_sub(tail + 16)?;
        if at < 1 || before_id < at || with.get(before_id..before_id + 16)? != to.as_bytes() {
            return None;
        }
        let mut bytes = vec![with[0]];
        bytes.extend_from_slice(&with[at..before_id]);
        let slot = RecipientSlot { bytes, at: at + 1 };
        (slot.put(&without, to) == with).then_some(slot)
    }

    /// What the script does: `entry` (without `to`) with `to` put in.
    fn put(&self, entry: &[u8], to: UserId) -> Vec<u8> {
        let at = self.at - 1;
        let mut out = Vec::with_capacity(entry.len() + self.bytes.len() + 16);
        out.push(self.bytes[0]);
        out.extend_from_slice(&entry[1..at]);
        out.extend_from_slice(&self.bytes[1..]);
        out.extend_from_slice(to.as_bytes());
        out.extend_from_slice(&entry[at..]);
        out
    }
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
        Some("late") if reply.len() == 2 => Err(AcceptError::Late(reply[1].parse().map_err(|_| bad())?)),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipient_put_into_a_cache_entry_gives_the_entry_encoded_with_it() {
        let slot = RecipientSlot::get().expect("the recipient's place in a cache entry");
        for (body, ts) in [("", 0), ("hé", -1), (&"x".repeat(70_000)[..], i64::MAX)] {
            for id in [uuid::Uuid::nil(), uuid::Uuid::max(), uuid::Uuid::now_v7()] {
                let message = CachedMessage {
                    v: VERSION,
                    id,
                    chat: uuid::Uuid::now_v7(),
                    from: id,
                    to: None,
                    body: body.into(),
                    ts,
                };
                let to = uuid::Uuid::new_v4();
                let expected = CachedMessage {
                    to: Some(to),
                    ..message.clone()
                }
                .encode();
                assert_eq!(
                    slot.put(&message.encode(), to),
                    expected,
                    "body of {} bytes",
                    body.len()
                );
            }
        }
    }

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
