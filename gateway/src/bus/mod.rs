//! The cluster bus: how gateways exchange live events through Redis pub/sub.
//!
//! Channels: `u:<user>` carries a user's private messages, typing and
//! membership changes; `c:<chat>` carries a group's messages, typing and
//! membership changes. A node subscribes only to the channels of its local
//! users and of the chats they are in, one subscriber connection per hub
//! shard (`subscriber`). Publishing happens inside the Lua scripts that
//! accept messages and change membership, so a publication is atomic with
//! the state change it announces and a chat's publications are in seq order.
//!
//! Delivery over pub/sub is at most once: a node that is disconnected from
//! Redis misses what was published meanwhile, and clients catch up from
//! history (contract: Ordering and delivery).
//!
//! This module owns the envelope format and decodes it into hub deliveries.
//! It never touches PostgreSQL and never writes to a client.

mod resp;
pub mod subscriber;

use serde::Deserialize;
use shared::protocol::{Message, ServerEvent};

use crate::hub::{Channel, ConnId, Delivery};

/// Names this node in envelopes, so it recognises its own publications.
#[derive(Debug, Clone)]
pub struct Origin {
    node_tag: String,
}

impl Origin {
    pub fn new() -> Origin {
        Origin {
            node_tag: format!("{:016x}", crate::random_u64()),
        }
    }

    /// The origin field for an event caused by local connection `conn`.
    pub fn of(&self, conn: ConnId) -> String {
        format!("{}:{conn}", self.node_tag)
    }

    /// The local connection an origin field names, if it is one of ours.
    fn local_conn(&self, origin: &str) -> Option<ConnId> {
        let (node, conn) = origin.split_once(':')?;
        if node == self.node_tag {
            conn.parse().ok()
        } else {
            None
        }
    }
}

impl Default for Origin {
    fn default() -> Self {
        Origin::new()
    }
}

/// The envelope the Lua scripts publish: a MessagePack array of nine
/// fields, the same shape for every kind (unused fields empty or 0):
/// `[kind, origin, chat, from/user, to, id, seq, body, ts]`, with kind
/// `m` (message), `t` (typing), `j` (joined) or `l` (left).
#[derive(Debug, Deserialize)]
struct Envelope(String, String, String, String, String, String, i64, String, i64);

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("unknown channel {0:?}")]
    Channel(String),
    #[error("undecodable envelope: {0}")]
    Decode(String),
    #[error("bad field in envelope: {0}")]
    Field(&'static str),
}

/// Decodes one publication on `channel`.
pub fn decode(channel: &str, payload: &[u8], origin: &Origin) -> Result<Delivery, EnvelopeError> {
    let channel = Channel::parse(channel).ok_or_else(|| EnvelopeError::Channel(channel.into()))?;
    let Envelope(kind, from_origin, chat, from, to, id, seq, body, ts) =
        rmp_serde::from_slice(payload).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
    let uuid = |s: &str, field| s.parse::<uuid::Uuid>().map_err(|_| EnvelopeError::Field(field));
    let optional = |s: &str, field| {
        if s.is_empty() {
            Ok(None)
        } else {
            uuid(s, field).map(Some)
        }
    };
    let event = match kind.as_str() {
        "m" => ServerEvent::Message(Message {
            id: uuid(&id, "id")?,
            chat: uuid(&chat, "chat")?,
            seq,
            from: uuid(&from, "from")?,
            to: optional(&to, "to")?,
            body,
            ts,
        }),
        "t" => ServerEvent::Typing {
            from: uuid(&from, "from")?,
            chat: optional(&chat, "chat")?,
            to: optional(&to, "to")?,
        },
        "j" => ServerEvent::Joined {
            chat: uuid(&chat, "chat")?,
            user: uuid(&from, "user")?,
        },
        "l" => ServerEvent::Left {
            chat: uuid(&chat, "chat")?,
            user: uuid(&from, "user")?,
        },
        _ => return Err(EnvelopeError::Field("kind")),
    };
    Ok(Delivery {
        channel,
        origin: origin.local_conn(&from_origin),
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_envelope_decodes_and_recognises_its_origin() {
        let origin = Origin::new();
        let (chat, from, id) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let payload = rmp_serde::to_vec(&(
            "m",
            origin.of(7),
            chat.to_string(),
            from.to_string(),
            "",
            id.to_string(),
            3i64,
            "hi",
            1000i64,
        ))
        .unwrap();
        let d = decode(&format!("c:{chat}"), &payload, &origin).unwrap();
        assert_eq!(d.origin, Some(7));
        assert_eq!(d.channel, Channel::Chat(chat));
        let ServerEvent::Message(m) = d.event else {
            panic!("not a message")
        };
        assert_eq!((m.seq, m.to, m.body.as_str()), (3, None, "hi"));
        // Another node's origin is not local.
        assert_eq!(
            decode(&format!("c:{chat}"), &payload, &Origin::new()).unwrap().origin,
            None
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode("c:nope", b"\x93", &Origin::new()).is_err());
        assert!(decode(&format!("u:{}", uuid::Uuid::nil()), b"\xff\x00", &Origin::new()).is_err());
    }
}
