//! Reads the replies of XREADGROUP, XAUTOCLAIM, XRANGE, XPENDING, TIME and
//! the retry transaction (`reclaim`) into plain data.
//!
//! Pure functions over `redis::Value`, so they are tested without a server and
//! accept both RESP2 (arrays) and RESP3 (maps) shapes. They must never panic
//! or trust the reply's shape: anything unexpected is a `ReplyError`.

use redis::Value;

/// One stream entry as Redis returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream id, e.g. `1700000000000-0`.
    pub id: String,
    /// The field/value pairs in stream order; `None` when the entry is still
    /// pending but was deleted from the stream (Redis returns a nil body).
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// What one XAUTOCLAIM call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// Where the next call continues; `0-0` when the scan went round.
    pub next: String,
    pub entries: Vec<Entry>,
    /// Pending ids whose entries no longer exist (Redis 7 drops them from the
    /// pending list itself).
    pub deleted: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unexpected {command} reply: {what}")]
pub struct ReplyError {
    pub command: &'static str,
    pub what: String,
}

fn bad(command: &'static str, what: impl Into<String>) -> ReplyError {
    ReplyError {
        command,
        what: what.into(),
    }
}

/// XREADGROUP: nil (timeout) or, per stream, its entries.
pub fn read_group(value: Value) -> Result<Vec<Entry>, ReplyError> {
    const CMD: &str = "XREADGROUP";
    let mut out = Vec::new();
    match value {
        Value::Nil => {}
        Value::Array(streams) => {
            for stream in streams {
                let Value::Array(pair) = stream else {
                    return Err(bad(CMD, "a stream is not a [name, entries] pair"));
                };
                let mut pair = pair.into_iter();
                let (Some(_name), Some(entries), None) = (pair.next(), pair.next(), pair.next()) else {
                    return Err(bad(CMD, "a stream is not a [name, entries] pair"));
                };
                out.extend(entries_of(CMD, entries)?);
            }
        }
        Value::Map(streams) => {
            for (_name, entries) in streams {
                out.extend(entries_of(CMD, entries)?);
            }
        }
        other => return Err(bad(CMD, format!("{other:?}"))),
    }
    Ok(out)
}

/// XAUTOCLAIM: `[next, entries, deleted ids]` (Redis 6.2 has no third part).
pub fn auto_claim(value: Value) -> Result<Claimed, ReplyError> {
    const CMD: &str = "XAUTOCLAIM";
    let Value::Array(parts) = value else {
        return Err(bad(CMD, "not an array"));
    };
    let mut parts = parts.into_iter();
    let next = match parts.next() {
        Some(v) => text(CMD, v)?,
        None => return Err(bad(CMD, "no cursor")),
    };
    let entries = match parts.next() {
        Some(v) => entries_of(CMD, v)?,
        None => return Err(bad(CMD, "no entries")),
    };
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.into_iter().map(|v| text(CMD, v)).collect::<Result<_, _>>()?,
        Some(Value::Nil) | None => Vec::new(),
        Some(other) => return Err(bad(CMD, format!("deleted ids: {other:?}"))),
    };
    Ok(Claimed { next, entries, deleted })
}

/// What the retry transaction returned (see `reclaim`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The entries XCLAIM delivered again.
    pub entries: Vec<Entry>,
    /// The XPENDING rows of the ids that were pending but whose entries no
    /// longer existed (deleted from the stream): XCLAIM did not return them,
    /// and Redis 7 dropped them from the pending list.
    pub deleted: Vec<Pending>,
}

/// The retry transaction (MULTI): for each id, `XPENDING <id> <id> 1` then
/// `XRANGE <id> <id>`; last, one XCLAIM of all the ids. An id is deleted
/// when it was pending, its entry did not exist, and XCLAIM did not return
/// it. (Redis 6.2 returns such an entry with no fields instead; it is then
/// among `entries`, not `deleted`.) An id that was not pending (stored or
/// dead-lettered by another consumer) is neither.
pub fn reclaim(replies: Vec<Value>) -> Result<Reclaimed, ReplyError> {
    const CMD: &str = "MULTI of XPENDING, XRANGE, XCLAIM";
    if replies.len() % 2 != 1 {
        return Err(bad(CMD, format!("{} replies, not two per id and one", replies.len())));
    }
    let mut replies = replies.into_iter();
    let entries = match replies.next_back() {
        Some(claimed) => entries_of(CMD, claimed)?,
        None => return Err(bad(CMD, "no XCLAIM reply")),
    };
    let mut deleted = Vec::new();
    while let (Some(pending), Some(range)) = (replies.next(), replies.next()) {
        let exists = !entries_of(CMD, range)?.is_empty();
        for row in pending_entries(pending)? {
            if !exists && !entries.iter().any(|e| e.id == row.id) {
                deleted.push(row);
            }
        }
    }
    Ok(Reclaimed { entries, deleted })
}

/// XPENDING summary form: the first element is the group's pending count.
pub fn pending_count(value: Value) -> Result<u64, ReplyError> {
    const CMD: &str = "XPENDING";
    let Value::Array(parts) = value else {
        return Err(bad(CMD, "not an array"));
    };
    match parts.into_iter().next() {
        Some(Value::Int(n)) => u64::try_from(n).map_err(|_| bad(CMD, "negative count")),
        Some(other) => text(CMD, other)?.parse().map_err(|_| bad(CMD, "count is not a number")),
        None => Err(bad(CMD, "empty")),
    }
}

/// XRANGE / XREVRANGE: the entries, in the order returned.
pub fn range(value: Value) -> Result<Vec<Entry>, ReplyError> {
    entries_of("XRANGE", value)
}

/// One row of XPENDING's extended form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: String,
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How often it was delivered (XREADGROUP, XCLAIM, XAUTOCLAIM).
    pub deliveries: u64,
}

/// XPENDING extended form: `[[id, consumer, idle ms, deliveries], ...]`.
pub fn pending_entries(value: Value) -> Result<Vec<Pending>, ReplyError> {
    const CMD: &str = "XPENDING";
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(bad(CMD, format!("{other:?}"))),
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(row) = item else {
                return Err(bad(CMD, "a row is not an array"));
            };
            let mut row = row.into_iter();
            let (Some(id), Some(consumer), Some(idle), Some(deliveries), None) =
                (row.next(), row.next(), row.next(), row.next(), row.next())
            else {
                return Err(bad(CMD, "a row is not [id, consumer, idle, deliveries]"));
            };
            Ok(Pending {
                id: text(CMD, id)?,
                consumer: text(CMD, consumer)?,
                idle_ms: number(CMD, idle)?,
                deliveries: number(CMD, deliveries)?,
            })
        })
        .collect()
}

/// TIME: `[seconds, microseconds]`, as milliseconds since the epoch.
pub fn time_millis(value: Value) -> Result<u64, ReplyError> {
    const CMD: &str = "TIME";
    let Value::Array(parts) = value else {
        return Err(bad(CMD, "not an array"));
    };
    let mut parts = parts.into_iter();
    let (Some(secs), Some(micros), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad(CMD, "not [seconds, microseconds]"));
    };
    let (secs, micros) = (number(CMD, secs)?, number(CMD, micros)?);
    Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
}

fn number(command: &'static str, value: Value) -> Result<u64, ReplyError> {
    match value {
        Value::Int(n) => u64::try_from(n).map_err(|_| bad(command, "a negative number")),
        other => text(command, other)?.parse().map_err(|_| bad(command, "not a number")),
    }
}

fn entries_of(command: &'static str, value: Value) -> Result<Vec<Entry>, ReplyError> {
    let items = match value {
        Value::Array(items) => items,
        Value::Nil => return Ok(Vec::new()),
        other => return Err(bad(command, format!("entries: {other:?}"))),
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(bad(command, "an entry is not an [id, fields] pair"));
        };
        let mut pair = pair.into_iter();
        let (Some(id), body, None) = (pair.next(), pair.next(), pair.next()) else {
            return Err(bad(command, "an entry is not an [id, fields] pair"));
        };
        let id = text(command, id)?;
        let fields = match body {
            None | Some(Value::Nil) => None,
            Some(Value::Array(flat)) => {
                if flat.len() % 2 != 0 {
                    return Err(bad(command, format!("entry {id} has an odd field list")));
                }
                let mut fields = Vec::with_capacity(flat.len() / 2);
                let mut flat = flat.into_iter();
                while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                    fields.push((lossy(command, k)?, bytes(command, v)?));
                }
                Some(fields)
            }
            Some(Value::Map(pairs)) => Some(
                pairs
                    .into_iter()
                    .map(|(k, v)| Ok((lossy(command, k)?, bytes(command, v)?)))
                    .collect::<Result<_, ReplyError>>()?,
            ),
            Some(other) => return Err(bad(command, format!("entry {id} fields: {other:?}"))),
        };
        entries.push(Entry { id, fields });
    }
    Ok(entries)
}

fn bytes(command: &'static str, value: Value) -> Result<Vec<u8>, ReplyError> {
    match value {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Int(n) => Ok(n.to_string().into_bytes()),
        other => Err(bad(command, format!("expected a string, got {other:?}"))),
    }
}

fn text(command: &'static str, value: Value) -> Result<String, ReplyError> {
    String::from_utf8(bytes(command, value)?).map_err(|_| bad(command, "an id is not UTF-8"))
}

/// Field names are ours and ASCII; a stray non-UTF-8 one is kept readable
/// (the entry then fails to parse as a job and is dead-lettered).
fn lossy(command: &'static str, value: Value) -> Result<String, ReplyError> {
    Ok(
        String::from_utf8(bytes(command, value)?)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![bulk(id), Value::Array(fields.iter().map(|f| bulk(f)).collect())])
    }

    #[test]
    fn a_resp2_read_reply_yields_entries_in_order() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("chat:queue"),
            Value::Array(vec![
                entry("1-0", &["v", "1", "kind", "message"]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = read_group(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(
            entries[0].fields,
            Some(vec![
                ("v".to_string(), b"1".to_vec()),
                ("kind".to_string(), b"message".to_vec())
            ])
        );
        assert_eq!(entries[1].fields, None, "a deleted pending entry");
    }

    #[test]
    fn a_timeout_and_a_resp3_map_are_read() {
        assert_eq!(read_group(Value::Nil).unwrap(), vec![]);
        let reply = Value::Map(vec![(
            bulk("chat:queue"),
            Value::Array(vec![entry("3-1", &["a", "b"])]),
        )]);
        assert_eq!(read_group(reply).unwrap()[0].id, "3-1");
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for reply in [
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            Value::Array(vec![Value::Array(vec![bulk("s")])]),
            Value::Array(vec![Value::Array(vec![
                bulk("s"),
                Value::Array(vec![entry("1-0", &["odd"])]),
            ])]),
            Value::Array(vec![Value::Array(vec![
                bulk("s"),
                Value::Array(vec![Value::Array(vec![])]),
            ])]),
        ] {
            assert!(read_group(reply).is_err());
        }
        assert!(auto_claim(Value::Array(vec![])).is_err());
        assert!(pending_count(Value::Array(vec![Value::Int(-1)])).is_err());
    }

    #[test]
    fn an_autoclaim_reply_has_cursor_entries_and_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("5-0"),
            Value::Array(vec![entry("4-0", &["v", "1"])]),
            Value::Array(vec![bulk("2-0")]),
        ]);
        let claimed = auto_claim(reply).unwrap();
        assert_eq!(claimed.next, "5-0");
        assert_eq!(claimed.entries[0].id, "4-0");
        assert_eq!(claimed.deleted, vec!["2-0"]);
    }

    fn pending_row(id: &str, deliveries: i64) -> Value {
        Value::Array(vec![Value::Array(vec![
            bulk(id),
            bulk("p1"),
            Value::Int(10),
            Value::Int(deliveries),
        ])])
    }

    #[test]
    fn a_retry_finds_deleted_only_what_was_pending_gone_and_not_claimed() {
        let nothing = || Value::Array(vec![]);
        let reply = vec![
            // 1-0: pending and there: claimed.
            pending_row("1-0", 2),
            Value::Array(vec![entry("1-0", &["v", "1"])]),
            // 2-0: pending, gone, not claimed: deleted while pending.
            pending_row("2-0", 3),
            nothing(),
            // 3-0: not pending and gone: stored by another consumer.
            nothing(),
            nothing(),
            // 4-0: pending and gone, but returned with no fields (Redis 6.2).
            pending_row("4-0", 1),
            nothing(),
            Value::Array(vec![
                entry("1-0", &["v", "1"]),
                Value::Array(vec![bulk("4-0"), Value::Nil]),
            ]),
        ];
        let reclaimed = reclaim(reply).unwrap();
        let ids: Vec<&str> = reclaimed.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["1-0", "4-0"]);
        assert_eq!(
            reclaimed.deleted,
            vec![Pending {
                id: "2-0".into(),
                consumer: "p1".into(),
                idle_ms: 10,
                deliveries: 3
            }]
        );
        assert!(reclaim(vec![]).is_err());
        assert!(reclaim(vec![nothing(), nothing()]).is_err());
    }

    #[test]
    fn extended_pending_rows_give_delivery_counts() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("7-1"),
            bulk("p1"),
            Value::Int(1500),
            Value::Int(3),
        ])]);
        assert_eq!(
            pending_entries(reply).unwrap(),
            vec![Pending {
                id: "7-1".into(),
                consumer: "p1".into(),
                idle_ms: 1500,
                deliveries: 3
            }]
        );
        assert_eq!(pending_entries(Value::Array(vec![])).unwrap(), vec![]);
        assert!(pending_entries(Value::Array(vec![Value::Array(vec![bulk("7-1")])])).is_err());
        assert!(pending_entries(Value::Array(vec![Value::Array(vec![
            bulk("7-1"),
            bulk("p1"),
            Value::Int(-1),
            Value::Int(3)
        ])]))
        .is_err());
    }

    #[test]
    fn time_is_read_as_milliseconds_and_ranges_as_entries() {
        let reply = Value::Array(vec![bulk("1700000000"), bulk("123456")]);
        assert_eq!(time_millis(reply).unwrap(), 1_700_000_000_123);
        assert!(time_millis(Value::Array(vec![bulk("1")])).is_err());
        let entries = range(Value::Array(vec![entry("1-0", &["a", "b"])])).unwrap();
        assert_eq!(entries[0].id, "1-0");
        assert_eq!(range(Value::Array(vec![])).unwrap(), vec![]);
    }

    #[test]
    fn the_pending_count_is_the_first_element() {
        let reply = Value::Array(vec![Value::Int(12), bulk("1-0"), bulk("9-0"), Value::Nil]);
        assert_eq!(pending_count(reply).unwrap(), 12);
    }
}
