//! The format of the recent-message cache: MessagePack, versioned.
//!
//! Gateways keep the latest messages of each chat in a Redis sorted set
//! scored by `seq`; each member is one `CachedMessage` encoded with
//! rmp-serde: a map with string keys, ids as 16-byte binaries (readable from
//! any language's MessagePack library, and 80 bytes smaller than ids as text).
//! The `seq`
//! is the member's score, not part of the value, so the gateway can encode the
//! value before Redis assigns the seq. `v` is the format version: a reader that
//! finds a version it does not know treats the whole read as a cache miss (a
//! rolling upgrade mixes versions; nothing fails).

use serde::{Deserialize, Serialize};

use crate::ids::{ChatId, MessageId, UserId};
use crate::protocol::Message;

/// The version this build writes and reads.
pub const VERSION: u32 = 1;

/// One cached message, without its `seq` (the sorted set's score).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedMessage {
    pub v: u32,
    pub id: MessageId,
    pub chat: ChatId,
    pub from: UserId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<UserId>,
    pub body: String,
    pub ts: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheFormatError {
    #[error("cache entry version {0} is not {VERSION}")]
    Version(u32),
    #[error("undecodable cache entry: {0}")]
    Decode(String),
}

impl CachedMessage {
    pub fn of(m: &Message) -> CachedMessage {
        CachedMessage {
            v: VERSION,
            id: m.id,
            chat: m.chat,
            from: m.from,
            to: m.to,
            body: m.body.clone(),
            ts: m.ts,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128 + self.body.len());
        // Plain data of our own into a Vec: encoding cannot fail.
        let _ = self.serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map());
        buf
    }

    /// Decodes an entry stored with score `seq`; any other version is an error.
    pub fn decode(bytes: &[u8], seq: i64) -> Result<Message, CacheFormatError> {
        match rmp_serde::from_slice::<CachedMessage>(bytes) {
            Ok(c) if c.v == VERSION => Ok(Message {
                id: c.id,
                chat: c.chat,
                seq,
                from: c.from,
                to: c.to,
                body: c.body,
                ts: c.ts,
            }),
            Ok(c) => Err(CacheFormatError::Version(c.v)),
            // Another version may have other fields: name it if it has a `v`.
            Err(e) => {
                #[derive(Deserialize)]
                struct VersionOnly {
                    v: u32,
                }
                match rmp_serde::from_slice::<VersionOnly>(bytes) {
                    Ok(probe) if probe.v != VERSION => Err(CacheFormatError::Version(probe.v)),
                    _ => Err(CacheFormatError::Decode(e.to_string())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn message() -> Message {
        Message {
            id: Uuid::now_v7(),
            chat: Uuid::now_v7(),
            seq: 12,
            from: Uuid::now_v7(),
            to: Some(Uuid::now_v7()),
            body: "héllo".into(),
            ts: 1_700_000_000_123,
        }
    }

    #[test]
    fn an_entry_roundtrips_with_its_score_as_seq() {
        let m = message();
        assert_eq!(CachedMessage::decode(&CachedMessage::of(&m).encode(), 12).unwrap(), m);
    }

    #[test]
    fn the_same_message_always_encodes_to_the_same_bytes() {
        // Writers on different nodes must produce identical set members.
        let m = message();
        assert_eq!(CachedMessage::of(&m).encode(), CachedMessage::of(&m.clone()).encode());
    }

    #[test]
    fn an_unknown_version_is_refused_not_misread() {
        let mut c = CachedMessage::of(&message());
        c.v = 2;
        assert_eq!(CachedMessage::decode(&c.encode(), 1), Err(CacheFormatError::Version(2)));
        assert!(matches!(
            CachedMessage::decode(b"\xc1", 1),
            Err(CacheFormatError::Decode(_))
        ));
        // A future version with other fields is still recognised by its `v`.
        #[derive(Serialize)]
        struct Future {
            v: u32,
            blob: Vec<u8>,
        }
        let future = rmp_serde::to_vec_named(&Future { v: 3, blob: vec![1, 2] }).unwrap();
        assert_eq!(CachedMessage::decode(&future, 1), Err(CacheFormatError::Version(3)));
    }
}
