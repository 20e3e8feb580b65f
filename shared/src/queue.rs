//! The durable queue between gateways and persisters: a Redis Stream.
//!
//! Gateways append one entry per accepted change (a message, a new chat, a
//! membership change); persisters read the stream through one consumer group
//! and store each entry in PostgreSQL. This module owns the key names and the
//! entry format, so both sides agree on them. Entries are flat field/value
//! pairs (readable with `redis-cli XRANGE`), with `v` as the format version
//! and `kind` as the job type. The gateway writes them from Lua scripts using
//! the same field names; `Job::to_fields` is the reference encoding.

use std::collections::HashMap;
use std::str::FromStr;

use crate::ids::{ChatId, UserId};
use crate::protocol::Message;

/// The stream every accepted change is appended to.
pub const STREAM: &str = "chat:queue";
/// The consumer group all persister processes share.
pub const GROUP: &str = "persisters";
/// Where jobs go when they cannot be stored (see docs/architecture.md).
pub const DEAD_LETTERS: &str = "chat:dead";
/// The entry format version written in field `v`.
pub const FORMAT_VERSION: &str = "1";

/// What kind of chat a `Chat` job creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatKind {
    Group,
    Direct,
}

impl ChatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Group => "group",
            ChatKind::Direct => "dm",
        }
    }
}

/// One entry of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// An accepted message.
    Message(Message),
    /// A chat came into being: a group created over HTTP, or the first
    /// message of a private chat.
    Chat {
        chat: ChatId,
        kind: ChatKind,
        title: String,
        /// "public" or "private".
        visibility: String,
        created_by: UserId,
        ts: i64,
    },
    /// A user became (`active`) or stopped being a member of a chat.
    /// `version` increases with every membership change of the chat, so a
    /// persister applying changes out of order keeps the newest.
    Member {
        chat: ChatId,
        user: UserId,
        active: bool,
        version: i64,
        ts: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("job format version {0:?} is not supported")]
    Version(String),
    #[error("job field `{0}` is missing")]
    Missing(&'static str),
    #[error("job field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown job kind {0:?}")]
    Kind(String),
}

impl Job {
    /// The reference encoding: the field/value pairs of the stream entry.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![("v", FORMAT_VERSION.to_string())];
        match self {
            Job::Message(m) => {
                f.push(("kind", "message".into()));
                f.push(("id", m.id.to_string()));
                f.push(("chat", m.chat.to_string()));
                f.push(("seq", m.seq.to_string()));
                f.push(("from", m.from.to_string()));
                f.push(("to", m.to.map(|t| t.to_string()).unwrap_or_default()));
                f.push(("body", m.body.clone()));
                f.push(("ts", m.ts.to_string()));
            }
            Job::Chat {
                chat,
                kind,
                title,
                visibility,
                created_by,
                ts,
            } => {
                f.push(("kind", "chat".into()));
                f.push(("chat", chat.to_string()));
                f.push(("chat_kind", kind.as_str().into()));
                f.push(("title", title.clone()));
                f.push(("visibility", visibility.clone()));
                f.push(("created_by", created_by.to_string()));
                f.push(("ts", ts.to_string()));
            }
            Job::Member {
                chat,
                user,
                active,
                version,
                ts,
            } => {
                f.push(("kind", "member".into()));
                f.push(("chat", chat.to_string()));
                f.push(("user", user.to_string()));
                f.push(("active", if *active { "1" } else { "0" }.into()));
                f.push(("version", version.to_string()));
                f.push(("ts", ts.to_string()));
            }
        }
        f
    }

    /// Parses a stream entry's field/value pairs.
    pub fn from_fields(fields: &HashMap<String, Vec<u8>>) -> Result<Job, JobError> {
        let fields = Fields(fields);
        let version = fields.text("v")?;
        if version != FORMAT_VERSION {
            return Err(JobError::Version(version.to_string()));
        }
        match fields.text("kind")? {
            "message" => {
                let to = fields.text("to")?;
                Ok(Job::Message(Message {
                    id: fields.parse("id")?,
                    chat: fields.parse("chat")?,
                    seq: fields.parse("seq")?,
                    from: fields.parse("from")?,
                    to: if to.is_empty() {
                        None
                    } else {
                        Some(parse_value("to", to)?)
                    },
                    body: fields.text("body")?.to_string(),
                    ts: fields.parse("ts")?,
                }))
            }
            "chat" => Ok(Job::Chat {
                chat: fields.parse("chat")?,
                kind: match fields.text("chat_kind")? {
                    "group" => ChatKind::Group,
                    "dm" => ChatKind::Direct,
                    other => {
                        return Err(JobError::Invalid {
                            field: "chat_kind",
                            reason: other.into(),
                        })
                    }
                },
                title: fields.text("title")?.to_string(),
                visibility: fields.text("visibility")?.to_string(),
                created_by: fields.parse("created_by")?,
                ts: fields.parse("ts")?,
            }),
            "member" => Ok(Job::Member {
                chat: fields.parse("chat")?,
                user: fields.parse("user")?,
                active: match fields.text("active")? {
                    "1" => true,
                    "0" => false,
                    other => {
                        return Err(JobError::Invalid {
                            field: "active",
                            reason: other.into(),
                        })
                    }
                },
                version: fields.parse("version")?,
                ts: fields.parse("ts")?,
            }),
            other => Err(JobError::Kind(other.to_string())),
        }
    }
}

struct Fields<'a>(&'a HashMap<String, Vec<u8>>);

impl Fields<'_> {
    fn text(&self, field: &'static str) -> Result<&str, JobError> {
        let raw = self.0.get(field).ok_or(JobError::Missing(field))?;
        std::str::from_utf8(raw).map_err(|e| JobError::Invalid {
            field,
            reason: e.to_string(),
        })
    }

    fn parse<T: FromStr>(&self, field: &'static str) -> Result<T, JobError>
    where
        T::Err: std::fmt::Display,
    {
        parse_value(field, self.text(field)?)
    }
}

fn parse_value<T: FromStr>(field: &'static str, text: &str) -> Result<T, JobError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(|e: T::Err| JobError::Invalid {
        field,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn roundtrip(job: Job) {
        let fields: HashMap<String, Vec<u8>> = job
            .to_fields()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        assert_eq!(Job::from_fields(&fields).unwrap(), job);
    }

    #[test]
    fn every_job_kind_roundtrips_through_stream_fields() {
        roundtrip(Job::Message(Message {
            id: Uuid::now_v7(),
            chat: Uuid::now_v7(),
            seq: 42,
            from: Uuid::now_v7(),
            to: Some(Uuid::now_v7()),
            body: "héllo\n".into(),
            ts: 1_700_000_000_000,
        }));
        roundtrip(Job::Chat {
            chat: Uuid::now_v7(),
            kind: ChatKind::Group,
            title: "t".into(),
            visibility: "public".into(),
            created_by: Uuid::now_v7(),
            ts: 5,
        });
        roundtrip(Job::Member {
            chat: Uuid::now_v7(),
            user: Uuid::now_v7(),
            active: false,
            version: 3,
            ts: 5,
        });
    }

    #[test]
    fn an_unknown_version_is_refused_by_name() {
        let mut fields = HashMap::new();
        fields.insert("v".to_string(), b"9".to_vec());
        assert_eq!(Job::from_fields(&fields), Err(JobError::Version("9".into())));
    }
}
