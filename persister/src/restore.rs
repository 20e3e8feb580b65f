//! `persister restore-redis`: rebuilds the chats' live state in Redis from
//! PostgreSQL, after Redis lost it (a `FLUSHALL` by mistake, a failover to a
//! replica that was behind, a lost volume).
//!
//! What it writes, per chat row in `chats`: the meta hash, a group's members
//! set and its members' `user:<u>:chats`, a private chat's `a`/`b` (from its
//! first stored message) and both sides' `user:<u>:dms`, and the seq
//! counter at the chat's last stored seq with an empty run id, so the next
//! accepted message jumps by `CHAT_SEQ_RESTART_GAP` exactly as after a Redis
//! restart (accept.lua). A group's membership version `mver` gets an empty
//! run id too (`mrid`), so its next change jumps by the same gap
//! (membership.lua): a change a persister stores after this read it
//! (already taken from the lost queue) cannot share its version. Chats with stored messages but no row
//! get their counter only: a private chat's next message recreates the
//! rest.
//!
//! It never overwrites live state: each chat is one Lua call that writes
//! nothing when the chat's meta hash (or, for a counter alone, the counter)
//! exists, so it is safe on a Redis that lost only part of its data and
//! safe to run twice. It reads PostgreSQL a page of chats at a time (keyset
//! pagination in one read-only snapshot) and writes each page in one
//! pipelined round trip while it reads the next, so memory holds two pages
//! (and the largest group in them whole: a group's members are written in
//! one atomic call).
//!
//! Not restored, by design: idempotency records (`msg:<id>`), the recent
//! cache (refilled on demand), typing keys, and the queue stream (what it
//! held unstored is gone with it). See docs/operations.md.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;
use redis::{Script, Value};
use shared::ids::{private_chat_id, ChatId, UserId};
use shared::keys;
use shared::protocol::Visibility;
use shared::queue::ChatKind;
use tokio_postgres::{IsolationLevel, NoTls, Row, Statement, Transaction};

use crate::store::StoreError;

/// Restores one chat, or only its seq counter, unless Redis holds it.
///
/// KEYS: 1 chat:{chat}:meta  2 chat:{chat}:members  3 chat:{chat}:seq
///       4.. a group: user:{member}:chats per member, in ARGV order;
///           a private chat: user:{a}:dms, user:{b}:dms
/// ARGV: 1 chat  2 'group' | 'dm' | 'counter' (the counter alone)
///       3 the chat's last stored seq ('' when none)  4 the newest stored
///       membership version ('' when none)  5 k, the number of meta
///       arguments  6..5+k the meta hash's field/value pairs  then a
///       group's active members
/// Returns {'restored', 0} | {'skipped', behind}: behind is 1 when the
/// state Redis holds is older than PostgreSQL's (its counter below the last
/// stored seq, or its membership version below the newest stored one).
const RESTORE_LUA: &str = r"
local chat, what, last, mver = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tonumber(redis.call('HGET', KEYS[3], 'n'))
local counter_behind = last ~= nil and (n == nil or n < last)

if what == 'counter' then
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return {'skipped', counter_behind and 1 or 0}
  end
  redis.call('HSET', KEYS[3], 'n', last, 'rid', '')
  return {'restored', 0}
end

if redis.call('EXISTS', KEYS[1]) == 1 then
  local behind = counter_behind
  if mver ~= nil then
    behind = behind or (tonumber(redis.call('HGET', KEYS[1], 'mver')) or 0) < mver
  end
  return {'skipped', behind and 1 or 0}
end

local k = tonumber(ARGV[5])
redis.call('HSET', KEYS[1], unpack(ARGV, 6, 5 + k))
-- A members set left without its chat is not live state: PostgreSQL's
-- members replace it.
redis.call('DEL', KEYS[2])
if what == 'group' then
  local first = 6 + k
  for i = first, #ARGV, 500 do
    redis.call('SADD', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
  end
  for i = first, #ARGV do
    redis.call('SADD', KEYS[4 + i - first], chat)
  end
else
  redis.call('SADD', KEYS[4], chat)
  redis.call('SADD', KEYS[5], chat)
end
-- The empty run id matches no Redis run: the next accepted message jumps
-- by the restart gap. A counter still there and not behind is live: kept.
if counter_behind then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'n', last, 'rid', '')
end
return {'restored', 0}
";

static RESTORE: LazyLock<Script> = LazyLock::new(|| Script::new(RESTORE_LUA));

/// A page of `chats`, each with its last seq and, for a private chat, its
/// first message's sides: index lookups in `messages (chat, seq)`.
const CHATS_SELECT: &str = "
SELECT c.id, c.kind, c.title, c.visibility, c.created_by, c.created_at,
       (SELECT max(m.seq) FROM messages m WHERE m.chat = c.id) AS last_seq,
       f.sender, f.recipient
  FROM chats c
  LEFT JOIN LATERAL (SELECT m.sender, m.recipient FROM messages m
                      WHERE m.chat = c.id AND c.kind = 'dm'
                      ORDER BY m.seq LIMIT 1) f ON true";
const CHATS_FIRST: &str = "ORDER BY c.id LIMIT $1";
const CHATS_AFTER: &str = "WHERE c.id > $2 ORDER BY c.id LIMIT $1";

/// The membership rows of a page's groups, active or not (the newest
/// version counts either way).
const MEMBERS: &str = "SELECT chat, user_id, active, version FROM chat_members WHERE chat = ANY($1)";

/// A page of the chats `messages` holds, without reading every message: a
/// loose index scan of `messages (chat, seq)`, one descent per chat. `start`
/// is where the scan starts: nothing (the first page) or after a cursor.
fn message_chats(start: &str) -> String {
    format!(
        "WITH RECURSIVE seen(chat) AS (
             (SELECT chat FROM messages {start} ORDER BY chat LIMIT 1)
           UNION ALL
             SELECT (SELECT m.chat FROM messages m WHERE m.chat > s.chat ORDER BY m.chat LIMIT 1)
               FROM seen s WHERE s.chat IS NOT NULL
         )
         SELECT s.chat,
                (SELECT max(m.seq) FROM messages m WHERE m.chat = s.chat) AS last_seq,
                EXISTS (SELECT 1 FROM chats c WHERE c.id = s.chat) AS has_row
           FROM seen s WHERE s.chat IS NOT NULL LIMIT $1"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer from Redis: {0}")]
    Reply(String),
}

impl From<tokio_postgres::Error> for RestoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        RestoreError::Store(StoreError::Db(e))
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Chats written to Redis (meta, members, user sets, counter).
    pub chats_restored: u64,
    /// Chats Redis holds already (its meta hash; for a chat without a row,
    /// its counter), left as they are.
    pub chats_skipped: u64,
    /// Of those, the ones whose Redis state is older than PostgreSQL's
    /// (each logged with its id).
    pub chats_behind: u64,
    /// Active group memberships written (members-set entries).
    pub memberships: u64,
    /// Seq counters written alone: chats with stored messages and no
    /// usable chat row.
    pub counters_only: u64,
    /// Private chats not restored: no stored message names their second
    /// side (their next message recreates them).
    pub private_unrestored: u64,
    pub elapsed: Duration,
}

/// One chat as PostgreSQL holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChat {
    pub id: ChatId,
    pub kind: String,
    pub title: String,
    pub visibility: String,
    pub created_by: UserId,
    pub created_at: i64,
    /// max(seq) of its messages.
    pub last_seq: Option<i64>,
    /// max(version) of its membership rows, active or not: the next change
    /// must get a higher version, or the persister would ignore it.
    pub mver: Option<i64>,
    /// Sender and recipient of its first message (private chats).
    pub first: Option<(UserId, Option<UserId>)>,
}

impl StoredChat {
    fn from_row(row: &Row) -> Result<StoredChat, tokio_postgres::Error> {
        let first = match row.try_get::<_, Option<UserId>>(7)? {
            Some(sender) => Some((sender, row.try_get(8)?)),
            None => None,
        };
        Ok(StoredChat {
            id: row.try_get(0)?,
            kind: row.try_get(1)?,
            title: row.try_get(2)?,
            visibility: row.try_get(3)?,
            created_by: row.try_get(4)?,
            created_at: row.try_get(5)?,
            last_seq: row.try_get(6)?,
            // Filled in from the page's membership rows.
            mver: None,
            first,
        })
    }

    /// The two sides of a private chat, `a` first, as accept.lua wrote
    /// them: `a` the creator (its first sender), `b` the other. `None` when
    /// no stored message names them, or they do not give the chat's id.
    pub fn sides(&self) -> Option<(UserId, UserId)> {
        let (sender, recipient) = self.first?;
        let recipient = recipient?;
        let (a, b) = if recipient == self.created_by && sender != self.created_by {
            (recipient, sender)
        } else {
            (sender, recipient)
        };
        (private_chat_id(a, b) == self.id).then_some((a, b))
    }
}

/// The keys and arguments of one `RESTORE_LUA` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub keys: Vec<String>,
    pub args: Vec<String>,
}

impl Call {
    fn new(chat: ChatId, what: &str, last_seq: Option<i64>, mver: Option<i64>, meta: &[(&str, String)]) -> Call {
        let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        let mut args = vec![
            chat.to_string(),
            what.to_string(),
            opt(last_seq),
            opt(mver),
            (meta.len() * 2).to_string(),
        ];
        for (field, value) in meta {
            args.push(field.to_string());
            args.push(value.clone());
        }
        Call {
            keys: vec![keys::chat_meta(chat), keys::chat_members(chat), keys::chat_seq(chat)],
            args,
        }
    }

    /// The seq counter alone, at `last_seq`.
    pub fn counter(chat: ChatId, last_seq: i64) -> Call {
        Call::new(chat, "counter", Some(last_seq), None, &[])
    }

    /// A group with its active `members`.
    pub fn group(chat: &StoredChat, members: &[UserId]) -> Call {
        let mver = chat.mver.unwrap_or(0);
        let meta = [
            ("kind", ChatKind::Group.as_str().to_string()),
            ("title", chat.title.clone()),
            ("visibility", chat.visibility.clone()),
            ("created_by", chat.created_by.to_string()),
            ("created_at", chat.created_at.to_string()),
            ("mver", mver.to_string()),
            // No Redis run: the next change jumps by the restart gap.
            ("mrid", String::new()),
        ];
        let mut call = Call::new(chat.id, "group", chat.last_seq, Some(mver), &meta);
        for m in members {
            call.keys.push(keys::user_chats(*m));
            call.args.push(m.to_string());
        }
        call
    }

    /// A private chat between `a` (its creator) and `b`.
    pub fn private(chat: &StoredChat, a: UserId, b: UserId) -> Call {
        let meta = [
            ("kind", ChatKind::Direct.as_str().to_string()),
            ("a", a.to_string()),
            ("b", b.to_string()),
            ("title", String::new()),
            ("visibility", Visibility::Private.as_str().to_string()),
            ("created_by", chat.created_by.to_string()),
            ("created_at", chat.created_at.to_string()),
        ];
        let mut call = Call::new(chat.id, "dm", chat.last_seq, None, &meta);
        call.keys.push(keys::user_dms(a));
        call.keys.push(keys::user_dms(b));
        call
    }
}

/// What one call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Restored,
    Skipped { behind: bool },
}

/// Connects to PostgreSQL (`database_url`) and restores Redis (`redis`),
/// `page` chats per PostgreSQL query and Redis round trip.
pub async fn restore<C: ConnectionLike>(
    database_url: &str,
    redis: &mut C,
    page: usize,
) -> Result<Summary, RestoreError> {
    let started = Instant::now();
    let mut config = tokio_postgres::Config::from_str(database_url).map_err(|e| StoreError::Config(e.to_string()))?;
    config.connect_timeout(Duration::from_secs(10));
    if config.get_application_name().is_none() {
        config.application_name("persister restore-redis");
    }
    let (mut client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!(error = %e, "PostgreSQL connection failed");
        }
    });
    // One snapshot for the whole read: a chat stored meanwhile is seen by
    // both passes or by neither.
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut summary = Summary::default();
    let limit = i64::try_from(page.max(1)).unwrap_or(i64::MAX);
    restore_chats(&tx, redis, limit, &mut summary).await?;
    restore_counters(&tx, redis, limit, &mut summary).await?;
    tx.commit().await?;
    drop(client);
    let _ = connection.await;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// Every row of `chats`, a page at a time: the next page is read from
/// PostgreSQL while Redis writes this one.
async fn restore_chats<C: ConnectionLike>(
    tx: &Transaction<'_>,
    redis: &mut C,
    limit: i64,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    let pages = ChatPages::prepare(tx, limit).await?;
    let mut page = pages.read(None).await?;
    loop {
        let cursor = page.last.filter(|_| page.full);
        let next = async {
            match cursor {
                Some(last) => pages.read(Some(last)).await.map(Some),
                None => Ok(None),
            }
        };
        let (written, next) = tokio::join!(write_page(redis, &page, summary), next);
        written?;
        tracing::info!(
            restored = summary.chats_restored,
            skipped = summary.chats_skipped,
            "restoring chats"
        );
        match next? {
            Some(next) => page = next,
            None => return Ok(()),
        }
    }
}

/// The statements that read `chats` a page at a time.
struct ChatPages<'a> {
    tx: &'a Transaction<'a>,
    first: Statement,
    after: Statement,
    members: Statement,
    limit: i64,
}

/// One page of chats, as calls ready for Redis.
struct Page {
    calls: Vec<Call>,
    /// The active memberships each call writes.
    sizes: Vec<u64>,
    /// Private chats of the page that cannot be restored.
    private_unrestored: u64,
    /// The page's last chat (the next page's cursor).
    last: Option<ChatId>,
    /// Whether the page was full (there may be more).
    full: bool,
}

impl<'a> ChatPages<'a> {
    async fn prepare(tx: &'a Transaction<'a>, limit: i64) -> Result<ChatPages<'a>, RestoreError> {
        Ok(ChatPages {
            tx,
            first: tx.prepare(&format!("{CHATS_SELECT} {CHATS_FIRST}")).await?,
            after: tx.prepare(&format!("{CHATS_SELECT} {CHATS_AFTER}")).await?,
            members: tx.prepare(MEMBERS).await?,
            limit,
        })
    }

    /// The page after `cursor` (the first page when `None`).
    async fn read(&self, cursor: Option<ChatId>) -> Result<Page, RestoreError> {
        let rows = match cursor {
            None => self.tx.query(&self.first, &[&self.limit]).await?,
            Some(last) => self.tx.query(&self.after, &[&self.limit, &last]).await?,
        };
        let mut chats = rows.iter().map(StoredChat::from_row).collect::<Result<Vec<_>, _>>()?;

        // Each group's active members and newest membership version.
        let groups: Vec<ChatId> = chats
            .iter()
            .filter(|c| c.kind == ChatKind::Group.as_str())
            .map(|c| c.id)
            .collect();
        let mut members: HashMap<ChatId, (Vec<UserId>, i64)> = HashMap::new();
        if !groups.is_empty() {
            for row in self.tx.query(&self.members, &[&groups]).await? {
                let (chat, user, active, version): (ChatId, UserId, bool, i64) =
                    (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?, row.try_get(3)?);
                let (active_members, mver) = members.entry(chat).or_insert_with(|| (Vec::new(), version));
                *mver = version.max(*mver);
                if active {
                    active_members.push(user);
                }
            }
        }

        let mut page = Page {
            calls: Vec::with_capacity(chats.len()),
            sizes: Vec::with_capacity(chats.len()),
            private_unrestored: 0,
            last: chats.last().map(|c| c.id),
            full: chats.len() as i64 >= self.limit,
        };
        for chat in &mut chats {
            if chat.kind == ChatKind::Group.as_str() {
                let (of_chat, mver) = members.remove(&chat.id).unwrap_or_default();
                chat.mver = Some(mver);
                page.sizes.push(of_chat.len() as u64);
                page.calls.push(Call::group(chat, &of_chat));
                continue;
            }
            match chat.sides() {
                Some((a, b)) => {
                    page.sizes.push(0);
                    page.calls.push(Call::private(chat, a, b));
                }
                None => {
                    page.private_unrestored += 1;
                    tracing::warn!(
                        chat = %chat.id,
                        "private chat not restored: no stored message names its two sides \
                         (its next message recreates it)"
                    );
                    // Its stored messages still hold seqs no new message may take.
                    if let Some(last_seq) = chat.last_seq {
                        page.sizes.push(0);
                        page.calls.push(Call::counter(chat.id, last_seq));
                    }
                }
            }
        }
        Ok(page)
    }
}

/// Writes `page` in one round trip and counts what Redis did.
async fn write_page<C: ConnectionLike>(redis: &mut C, page: &Page, summary: &mut Summary) -> Result<(), RestoreError> {
    let outcomes = run(redis, &page.calls).await?;
    summary.private_unrestored += page.private_unrestored;
    for ((call, outcome), size) in page.calls.iter().zip(outcomes).zip(&page.sizes) {
        let counter_only = call.args[1] == "counter";
        match outcome {
            Outcome::Restored if counter_only => summary.counters_only += 1,
            Outcome::Restored => {
                summary.chats_restored += 1;
                summary.memberships += size;
            }
            Outcome::Skipped { behind } => {
                summary.chats_skipped += 1;
                if behind {
                    summary.chats_behind += 1;
                    warn_behind(&call.args[0]);
                }
            }
        }
    }
    Ok(())
}

/// The seq counters of chats `messages` holds but `chats` does not (their
/// chat job was lost with the queue, or dead-lettered): a private chat's
/// next message recreates it, and must not take a stored seq.
async fn restore_counters<C: ConnectionLike>(
    tx: &Transaction<'_>,
    redis: &mut C,
    limit: i64,
    summary: &mut Summary,
) -> Result<(), RestoreError> {
    let first = tx.prepare(&message_chats("")).await?;
    let after = tx.prepare(&message_chats("WHERE chat > $2")).await?;
    let mut cursor: Option<ChatId> = None;
    loop {
        let rows = match cursor {
            None => tx.query(&first, &[&limit]).await?,
            Some(last) => tx.query(&after, &[&limit, &last]).await?,
        };
        let mut calls = Vec::new();
        for row in &rows {
            let chat: ChatId = row.try_get(0)?;
            let last_seq: Option<i64> = row.try_get(1)?;
            let has_row: bool = row.try_get(2)?;
            cursor = Some(chat);
            if let (Some(last_seq), false) = (last_seq, has_row) {
                calls.push(Call::counter(chat, last_seq));
            }
        }
        for (call, outcome) in calls.iter().zip(run(redis, &calls).await?) {
            match outcome {
                Outcome::Restored => summary.counters_only += 1,
                Outcome::Skipped { behind } => {
                    summary.chats_skipped += 1;
                    if behind {
                        summary.chats_behind += 1;
                        warn_behind(&call.args[0]);
                    }
                }
            }
        }
        if rows.len() < limit as usize {
            break;
        }
    }
    Ok(())
}

fn warn_behind(chat: &str) {
    tracing::warn!(
        chat,
        "skipped a chat Redis holds whose state is older than PostgreSQL's \
         (seq counter or membership version behind); see docs/operations.md"
    );
}

/// Runs `calls` in one pipelined round trip (after a SCRIPT LOAD, so a
/// restarted Redis needs no retry); their outcomes in order.
async fn run<C: ConnectionLike>(redis: &mut C, calls: &[Call]) -> Result<Vec<Outcome>, RestoreError> {
    if calls.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    pipe.load_script(&RESTORE);
    for call in calls {
        let mut invocation = RESTORE.prepare_invoke();
        for key in &call.keys {
            invocation.key(key);
        }
        for arg in &call.args {
            invocation.arg(arg);
        }
        pipe.invoke_script(&invocation);
    }
    let replies: Vec<Value> = pipe.query_async(redis).await?;
    if replies.len() != calls.len() + 1 {
        return Err(RestoreError::Reply(format!(
            "{} replies to {} calls",
            replies.len(),
            calls.len() + 1
        )));
    }
    replies[1..].iter().map(outcome).collect()
}

fn outcome(reply: &Value) -> Result<Outcome, RestoreError> {
    let (status, behind): (String, i64) =
        redis::from_redis_value(reply).map_err(|e| RestoreError::Reply(format!("{reply:?}: {e}")))?;
    match status.as_str() {
        "restored" => Ok(Outcome::Restored),
        "skipped" => Ok(Outcome::Skipped { behind: behind != 0 }),
        _ => Err(RestoreError::Reply(format!("{reply:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn private(a: UserId, b: UserId, first: Option<(UserId, Option<UserId>)>) -> StoredChat {
        StoredChat {
            id: private_chat_id(a, b),
            kind: "dm".into(),
            title: String::new(),
            visibility: "private".into(),
            created_by: a,
            created_at: 1,
            last_seq: Some(3),
            mver: None,
            first,
        }
    }

    #[test]
    fn a_private_chat_takes_its_sides_from_its_first_message_creator_first() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(private(a, b, Some((a, Some(b)))).sides(), Some((a, b)));
        // A first message from the other side (its creator's was lost).
        assert_eq!(private(a, b, Some((b, Some(a)))).sides(), Some((a, b)));
        // A user's chat with themselves.
        assert_eq!(private(a, a, Some((a, Some(a)))).sides(), Some((a, a)));
    }

    #[test]
    fn a_private_chat_without_a_message_naming_both_sides_is_not_restored() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(private(a, b, None).sides(), None);
        assert_eq!(private(a, b, Some((a, None))).sides(), None);
        // Sides that do not give the chat's id.
        assert_eq!(private(a, b, Some((a, Some(c)))).sides(), None);
    }

    #[test]
    fn a_group_call_carries_its_meta_then_its_members_with_their_chat_lists() {
        let (creator, other) = (Uuid::new_v4(), Uuid::new_v4());
        let chat = StoredChat {
            id: Uuid::new_v4(),
            kind: "group".into(),
            title: "t".into(),
            visibility: "public".into(),
            created_by: creator,
            created_at: 7,
            last_seq: None,
            mver: Some(4),
            first: None,
        };
        let call = Call::group(&chat, &[creator, other]);
        assert_eq!(
            call.keys,
            vec![
                keys::chat_meta(chat.id),
                keys::chat_members(chat.id),
                keys::chat_seq(chat.id),
                keys::user_chats(creator),
                keys::user_chats(other),
            ]
        );
        let k: usize = call.args[4].parse().unwrap();
        assert_eq!(
            call.args[..4],
            [chat.id.to_string(), "group".into(), String::new(), "4".into()]
        );
        let meta: Vec<&str> = call.args[5..5 + k].iter().map(String::as_str).collect();
        let creator_text = creator.to_string();
        assert_eq!(
            meta,
            [
                "kind",
                "group",
                "title",
                "t",
                "visibility",
                "public",
                "created_by",
                creator_text.as_str(),
                "created_at",
                "7",
                "mver",
                "4",
                "mrid",
                ""
            ]
        );
        assert_eq!(call.args[5 + k..], [creator.to_string(), other.to_string()]);
    }

    #[test]
    fn a_private_call_names_both_sides_chat_lists() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let chat = private(a, b, Some((a, Some(b))));
        let call = Call::private(&chat, a, b);
        assert_eq!(call.keys[3..], [keys::user_dms(a), keys::user_dms(b)]);
        assert_eq!(call.args[1], "dm");
        assert_eq!(call.args[2], "3");
        assert!(call.args.windows(2).any(|w| w[0] == "a" && w[1] == a.to_string()));
        assert!(call.args.windows(2).any(|w| w[0] == "b" && w[1] == b.to_string()));
    }
}
