//! The dead-letter stream `chat:dead`: its entry format, moving a queue entry
//! there, listing, and replaying onto the queue.
//!
//! A dead letter's fields are, in this order: `reason` (the full error text),
//! `class` (a fixed word, also the `reason` label of
//! `persister_dead_letters_total`), `source_id` (the entry's id in
//! `chat:queue`), `deliveries` (its delivery count when it was given up;
//! empty when Redis dropped it, see `add`), then the original entry's fields
//! unchanged. The four leading fields are
//! recognised by position, so an original field of the same name is never
//! mistaken for them. (Dead letters written before `deliveries` existed end
//! with `reason`, `source_id` instead; they are read too.)
//!
//! Every move is atomic and happens at most once (Lua scripts): a queue entry
//! becomes a dead letter only while it is still pending, and is acked and
//! deleted from the queue in the same step; a dead letter is replayed only
//! while it still exists, and deleted in the same step. The exception is an
//! entry deleted from the queue while pending that Redis itself already took
//! out of the pending list: `add` writes its letter, at most once too.
//! Replaying twice, or a job that was stored meanwhile, is harmless: storage
//! is idempotent. This module must never decide *whether* an entry is dead
//! (see `retry`).

use std::sync::LazyLock;

use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};
use shared::queue::{DEAD_LETTERS, GROUP, STREAM};

use crate::reply::{self, Entry, ReplyError};

/// The leading metadata fields of a dead letter, in order.
pub const META_FIELDS: [&str; 4] = ["reason", "class", "source_id", "deliveries"];

/// Moves a pending queue entry to the dead-letter stream: XADD (the
/// metadata given, then the entry's own fields as the queue holds them),
/// XACK, XDEL; or nothing at all when the entry is no longer pending
/// (someone else stored or dead-lettered it). The XADD runs first, so if
/// Redis refuses it (out of memory) the entry stays pending. Returns the dead
/// letter's id.
///
/// KEYS: queue, dead letters. ARGV: group, entry id, metadata field/value pairs.
const DEAD_LETTER_LUA: &str = r"
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return false
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entry == 1 then
  for _, v in ipairs(entry[1][2]) do
    fields[#fields + 1] = v
  end
end
local id = redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
";

/// Moves a dead letter back onto the queue with its original fields, or
/// does nothing when it is gone (replayed already). Returns the new queue id.
///
/// KEYS: dead letters, queue. ARGV: dead letter id, original field/value pairs.
const REPLAY_LUA: &str = r"
if #ARGV < 3 then
  return redis.error_reply('ERR a dead letter without original fields cannot be replayed')
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
  return false
end
local id = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
";

static DEAD_LETTER: LazyLock<Script> = LazyLock::new(|| Script::new(DEAD_LETTER_LUA));
static REPLAY: LazyLock<Script> = LazyLock::new(|| Script::new(REPLAY_LUA));

#[derive(Debug, thiserror::Error)]
pub enum DeadError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("dead letter {0} was deleted")]
    Deleted(String),
    #[error(
        "{0:?} is not a dead-letter id (<milliseconds>-<sequence>, as `dead-letters list` prints it); \
         nothing was replayed"
    )]
    BadId(String),
}

/// One dead letter: on its way to `chat:dead`, or read back from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Its id in `chat:dead` (empty before it is written).
    pub id: String,
    /// Why it was given up: the full error text.
    pub reason: String,
    /// A fixed word per kind of failure: `refused` (PostgreSQL refused the
    /// row), `invalid`, `missing`, `version`, `kind` (not a job), `deleted`
    /// (deleted from the queue while pending), `unknown` (an old letter).
    pub class: String,
    /// Its id in `chat:queue`.
    pub source_id: String,
    /// Its delivery count when it was given up (`None` for an old letter).
    pub deliveries: Option<u64>,
    /// The queue entry's own fields, unchanged.
    pub fields: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    /// The metadata fields, in `META_FIELDS` order.
    pub fn meta_fields(&self) -> Vec<(String, Vec<u8>)> {
        let deliveries = self.deliveries.map(|d| d.to_string()).unwrap_or_default();
        [
            self.reason.as_bytes(),
            self.class.as_bytes(),
            self.source_id.as_bytes(),
            deliveries.as_bytes(),
        ]
        .iter()
        .zip(META_FIELDS)
        .map(|(value, name)| (name.to_string(), value.to_vec()))
        .collect()
    }

    /// The stream fields: the metadata in `META_FIELDS` order, then the original.
    pub fn to_fields(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = self.meta_fields();
        out.extend(self.fields.iter().cloned());
        out
    }

    /// Reads an entry of `chat:dead`.
    pub fn from_entry(entry: Entry) -> Result<DeadLetter, DeadError> {
        let Some(mut fields) = entry.fields else {
            return Err(DeadError::Deleted(entry.id));
        };
        let leading =
            fields.len() >= META_FIELDS.len() && fields.iter().zip(META_FIELDS).all(|((name, _), meta)| name == meta);
        if leading {
            let original = fields.split_off(META_FIELDS.len());
            let mut meta = fields
                .into_iter()
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
            let mut next = || meta.next().unwrap_or_default();
            let (reason, class, source_id, deliveries) = (next(), next(), next(), next());
            return Ok(DeadLetter {
                id: entry.id,
                reason,
                class,
                source_id,
                deliveries: deliveries.parse().ok(),
                fields: original,
            });
        }
        // The first format: original fields, then `reason`, `source_id`.
        let mut letter = DeadLetter {
            id: entry.id,
            reason: String::new(),
            class: "unknown".into(),
            source_id: String::new(),
            deliveries: None,
            fields: Vec::new(),
        };
        let n = fields.len();
        if n >= 2 && fields[n - 2].0 == "reason" && fields[n - 1].0 == "source_id" {
            let source = fields.pop().map(|(_, v)| v).unwrap_or_default();
            let reason = fields.pop().map(|(_, v)| v).unwrap_or_default();
            letter.source_id = String::from_utf8_lossy(&source).into_owned();
            letter.reason = String::from_utf8_lossy(&reason).into_owned();
        }
        letter.fields = fields;
        Ok(letter)
    }

    /// An original field as text, if present.
    pub fn field(&self, name: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    /// One line for `persister dead-letters list`, tab-separated: id, reason,
    /// deliveries, kind, chat, message id (`-` where there is none). Tabs and
    /// line breaks inside values become spaces.
    pub fn summary_line(&self) -> String {
        let dash = |v: Option<String>| v.filter(|s| !s.is_empty()).unwrap_or_else(|| "-".into());
        let kind = self.field("kind");
        let message_id = if kind.as_deref() == Some("message") {
            self.field("id")
        } else {
            None
        };
        [
            self.id.clone(),
            dash(Some(self.reason.clone())),
            dash(self.deliveries.map(|d| d.to_string())),
            dash(kind),
            dash(self.field("chat")),
            dash(message_id),
        ]
        .iter()
        .map(|v| v.replace(['\t', '\n', '\r'], " "))
        .collect::<Vec<_>>()
        .join("\t")
    }
}

/// Moves pending queue entry `letter.source_id` to `chat:dead` with
/// `letter`'s metadata and the entry's fields as the queue holds them (see
/// `DEAD_LETTER_LUA`; `letter.fields` is not used). `Ok(None)` when it was
/// no longer pending.
pub async fn move_to_dead<C: ConnectionLike>(conn: &mut C, letter: &DeadLetter) -> Result<Option<String>, DeadError> {
    let mut invocation = DEAD_LETTER.key(STREAM);
    invocation.key(DEAD_LETTERS).arg(GROUP).arg(&letter.source_id);
    for (field, value) in letter.meta_fields() {
        invocation.arg(field).arg(value);
    }
    Ok(invocation.invoke_async(conn).await?)
}

/// Writes `letter` to `chat:dead` as it is (XADD of `to_fields`), for an
/// entry `move_to_dead` cannot move because it is no longer pending: one
/// deleted from the queue while pending, which Redis dropped from the
/// pending list when a takeover (XAUTOCLAIM) or a retry (XCLAIM) came across
/// it. Redis tells only that caller, so this too happens at most once per
/// entry. Returns the dead letter's id.
pub async fn add<C: ConnectionLike>(conn: &mut C, letter: &DeadLetter) -> Result<String, DeadError> {
    Ok(redis::cmd("XADD")
        .arg(DEAD_LETTERS)
        .arg("*")
        .arg(letter.to_fields())
        .query_async(conn)
        .await?)
}

/// The oldest `limit` dead letters.
pub async fn list<C: ConnectionLike>(conn: &mut C, limit: usize) -> Result<Vec<DeadLetter>, DeadError> {
    page(conn, "-", "+", limit).await
}

async fn page<C: ConnectionLike>(
    conn: &mut C,
    from: &str,
    to: &str,
    limit: usize,
) -> Result<Vec<DeadLetter>, DeadError> {
    let value: Value = redis::cmd("XRANGE")
        .arg(DEAD_LETTERS)
        .arg(from)
        .arg(to)
        .arg("COUNT")
        .arg(limit)
        .query_async(conn)
        .await?;
    reply::range(value)?.into_iter().map(DeadLetter::from_entry).collect()
}

/// What `replay` did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Back on the queue under this new id.
    Queued { dead_id: String, queue_id: String },
    /// Not in `chat:dead` (never was, or replayed already).
    Missing { dead_id: String },
    /// It has no original fields (its entry was deleted while pending).
    Empty { dead_id: String },
}

/// Refuses anything but a complete stream id, `<ms>-<seq>`: Redis would
/// refuse a malformed one only when its turn came (after the letters before
/// it were moved), and would read an incomplete one (`<ms>`) as a range.
pub fn check_id(id: &str) -> Result<(), DeadError> {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok();
    match id.split_once('-') {
        Some((ms, seq)) if number(ms) && number(seq) => Ok(()),
        _ => Err(DeadError::BadId(id.to_string())),
    }
}

/// Replays the dead letters with these ids, in order, handing each outcome
/// to `report` as soon as it is known, so a caller stopped by an error
/// part way has seen every letter moved before it. Every id is checked
/// first: a malformed one moves nothing at all.
pub async fn replay_ids<C: ConnectionLike>(
    conn: &mut C,
    ids: &[String],
    mut report: impl FnMut(Replayed),
) -> Result<(), DeadError> {
    for id in ids {
        check_id(id)?;
    }
    for id in ids {
        match page(conn, id, id, 1).await?.into_iter().next() {
            Some(letter) => report(replay_one(conn, &letter).await?),
            None => report(Replayed::Missing { dead_id: id.clone() }),
        }
    }
    Ok(())
}

/// Replays every dead letter present when it starts (letters added while it
/// runs, e.g. replayed jobs refused again, are left for the next call),
/// handing each outcome to `report` as soon as it is known (see
/// `replay_ids`).
pub async fn replay_all<C: ConnectionLike>(conn: &mut C, mut report: impl FnMut(Replayed)) -> Result<(), DeadError> {
    let last: Value = redis::cmd("XREVRANGE")
        .arg(DEAD_LETTERS)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    let Some(last) = reply::range(last)?.into_iter().next().map(|e| e.id) else {
        return Ok(());
    };
    let mut from = "-".to_string();
    loop {
        let letters = page(conn, &from, &last, 100).await?;
        let Some(tail) = letters.last().map(|l| l.id.clone()) else {
            break;
        };
        for letter in &letters {
            report(replay_one(conn, letter).await?);
        }
        if tail == last {
            break;
        }
        from = format!("({tail}");
    }
    Ok(())
}

async fn replay_one<C: ConnectionLike>(conn: &mut C, letter: &DeadLetter) -> Result<Replayed, DeadError> {
    if letter.fields.is_empty() {
        return Ok(Replayed::Empty {
            dead_id: letter.id.clone(),
        });
    }
    let mut invocation = REPLAY.key(DEAD_LETTERS);
    invocation.key(STREAM).arg(&letter.id);
    for (field, value) in &letter.fields {
        invocation.arg(field).arg(value);
    }
    let queued: Option<String> = invocation.invoke_async(conn).await?;
    Ok(match queued {
        Some(queue_id) => Replayed::Queued {
            dead_id: letter.id.clone(),
            queue_id,
        },
        None => Replayed::Missing {
            dead_id: letter.id.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn letter() -> DeadLetter {
        DeadLetter {
            id: String::new(),
            reason: "PostgreSQL: db error: ERROR: new row violates check constraint".into(),
            class: "refused".into(),
            source_id: "1700000000000-3".into(),
            deliveries: Some(5),
            fields: pairs(&[
                ("v", "1"),
                ("kind", "message"),
                ("id", "0190a0b0-0000-7000-8000-000000000001"),
                ("chat", "0190a0b0-0000-7000-8000-0000000000c1"),
                // An original field named like a metadata field stays original.
                ("reason", "mine"),
            ]),
        }
    }

    #[test]
    fn a_dead_letter_leads_with_its_metadata_then_the_original_fields() {
        let fields = letter().to_fields();
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "reason",
                "class",
                "source_id",
                "deliveries",
                "v",
                "kind",
                "id",
                "chat",
                "reason"
            ]
        );
        assert_eq!(fields[3].1, b"5");
        assert_eq!(fields[2].1, b"1700000000000-3");
    }

    #[test]
    fn a_dead_letter_reads_back_as_written() {
        let written = letter();
        let read = DeadLetter::from_entry(Entry {
            id: "1700000000999-0".into(),
            fields: Some(written.to_fields()),
        })
        .unwrap();
        assert_eq!(
            read,
            DeadLetter {
                id: "1700000000999-0".into(),
                ..written
            }
        );
    }

    #[test]
    fn a_first_format_letter_is_read_with_its_trailing_metadata() {
        let read = DeadLetter::from_entry(Entry {
            id: "5-0".into(),
            fields: Some(pairs(&[
                ("v", "1"),
                ("kind", "poll"),
                ("reason", "unknown job kind"),
                ("source_id", "4-0"),
            ])),
        })
        .unwrap();
        assert_eq!(read.reason, "unknown job kind");
        assert_eq!(read.source_id, "4-0");
        assert_eq!(read.deliveries, None);
        assert_eq!(read.class, "unknown");
        assert_eq!(read.fields, pairs(&[("v", "1"), ("kind", "poll")]));
    }

    #[test]
    fn the_summary_line_has_six_tab_separated_columns() {
        let mut l = letter();
        l.id = "9-0".into();
        l.reason = "bad\trow\nhere".into();
        assert_eq!(
            l.summary_line(),
            "9-0\tbad row here\t5\tmessage\t0190a0b0-0000-7000-8000-0000000000c1\t0190a0b0-0000-7000-8000-000000000001"
        );
        let member = DeadLetter {
            id: "10-0".into(),
            deliveries: None,
            fields: pairs(&[("kind", "member"), ("id", "x")]),
            ..letter()
        };
        let cols: Vec<String> = member.summary_line().split('\t').map(String::from).collect();
        assert_eq!(cols[2..], ["-", "member", "-", "-"]);
    }

    #[test]
    fn only_a_complete_stream_id_is_a_dead_letter_id() {
        for good in ["1700000000000-0", "0-1", "18446744073709551615-18446744073709551615"] {
            assert!(check_id(good).is_ok(), "{good}");
        }
        for bad in [
            "typo",
            "",
            "-",
            "+",
            "1700000000000",
            "1700000000000-",
            "-0",
            "(1700000000000-0",
            "1700000000000-0-1",
            "1700000000000-x",
            "+1-0",
            " 1-0",
            "18446744073709551616-0",
        ] {
            let err = check_id(bad).expect_err(bad);
            assert!(err.to_string().contains("nothing was replayed"), "{err}");
        }
    }

    #[test]
    fn a_deleted_dead_letter_is_an_error() {
        assert!(DeadLetter::from_entry(Entry {
            id: "1-0".into(),
            fields: None
        })
        .is_err());
    }
}
