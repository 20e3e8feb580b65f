//! The client contract's events (../shared/protocol.md), as Rust types.
//!
//! Field names and `type` tags are the contract's, letter for letter. The
//! types carry no behaviour: validation that needs configuration (body size)
//! or state (membership) belongs to the gateway.

use serde::{Deserialize, Serialize};

use crate::ids::{ChatId, MessageId, UserId};

/// One frame from a client: the event and the `ref` the client put on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Echoed on every reply (`ack`, `pong`, `authed`, `error`) to this event.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(flatten)]
    pub event: ClientEvent,
}

/// Events a client sends, tagged by their `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientEvent {
    /// A message to a user (`to`) or to a group (`chat`); exactly one is set.
    Send {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<UserId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chat: Option<ChatId>,
        body: String,
        /// Chosen by the client to make the send idempotent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
    },
    Typing {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<UserId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chat: Option<ChatId>,
    },
    Join {
        chat: ChatId,
    },
    Leave {
        chat: ChatId,
    },
    Ping,
    Auth {
        token: String,
    },
}

impl ClientEvent {
    /// The contract's `type` tag, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientEvent::Send { .. } => "send",
            ClientEvent::Typing { .. } => "typing",
            ClientEvent::Join { .. } => "join",
            ClientEvent::Leave { .. } => "leave",
            ClientEvent::Ping => "ping",
            ClientEvent::Auth { .. } => "auth",
        }
    }
}

/// Where a `send` or `typing` goes: exactly one of the contract's `to` / `chat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    User(UserId),
    Chat(ChatId),
}

impl Target {
    /// `None` when both or neither of `to` and `chat` are given.
    pub fn from_fields(to: Option<UserId>, chat: Option<ChatId>) -> Option<Target> {
        match (to, chat) {
            (Some(user), None) => Some(Target::User(user)),
            (None, Some(chat)) => Some(Target::Chat(chat)),
            _ => None,
        }
    }
}

/// Whether `text` can be stored: PostgreSQL's `text` type refuses the NUL
/// character (U+0000), which JSON and MessagePack strings may carry. A
/// message or title holding one would be acked and then refused by every
/// write of the persister, so the gateway refuses it up front.
pub fn storable(text: &str) -> bool {
    !text.contains('\0')
}

/// A stored or live message, with the fields of the contract's `message` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    pub chat: ChatId,
    /// Position in the chat: increases in chat order, the same for everyone.
    pub seq: i64,
    pub from: UserId,
    /// Set on private messages only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<UserId>,
    pub body: String,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub ts: i64,
}

/// Events the server sends, tagged by their `type` field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    Message(Message),
    Ack {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        id: MessageId,
        chat: ChatId,
        seq: i64,
        ts: i64,
    },
    Typing {
        from: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chat: Option<ChatId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<UserId>,
    },
    Joined {
        chat: ChatId,
        user: UserId,
    },
    Left {
        chat: ChatId,
        user: UserId,
    },
    Pong {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    Authed {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        exp: i64,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

impl ServerEvent {
    /// The contract's `type` tag, for metrics labels and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerEvent::Message(_) => "message",
            ServerEvent::Ack { .. } => "ack",
            ServerEvent::Typing { .. } => "typing",
            ServerEvent::Joined { .. } => "joined",
            ServerEvent::Left { .. } => "left",
            ServerEvent::Pong { .. } => "pong",
            ServerEvent::Authed { .. } => "authed",
            ServerEvent::Error { .. } => "error",
        }
    }

    pub fn error(code: ErrorCode, message: impl Into<String>, reference: Option<String>) -> Self {
        ServerEvent::Error {
            code,
            message: message.into(),
            reference,
        }
    }
}

/// The contract's error codes; every refusal a client sees is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    Forbidden,
    NotFound,
    RateLimited,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The HTTP status the REST API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::TooLarge => 413,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::RateLimited => 429,
            ErrorCode::Unavailable => 503,
        }
    }
}

/// Close codes the server uses (contract: WebSocket).
pub mod close {
    /// The node is shutting down; reconnect elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// The client read too slowly and its outgoing queue overflowed.
    pub const POLICY: u16 = 1008;
    /// A frame over the connection's frame limit.
    pub const TOO_BIG: u16 = 1009;
    /// The connection's token expired.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// A group chat as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    Public,
    Private,
}

impl Visibility {
    pub fn as_str(&self) -> &'static str {
        match self {
            Visibility::Public => "public",
            Visibility::Private => "private",
        }
    }

    pub fn parse(s: &str) -> Option<Visibility> {
        match s {
            "public" => Some(Visibility::Public),
            "private" => Some(Visibility::Private),
            _ => None,
        }
    }
}
