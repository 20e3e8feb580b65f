//! The hub: which local connections belong to which user and which chat.
//!
//! Connection state is split over N shards by hashing ids: a user's
//! connections live in the shard of the user, a chat's local members in the
//! shard of the chat. Each shard is a task that owns its maps and talks
//! through bounded channels, so no single task, channel or lock carries all
//! of a node's traffic. A shard tells its half of the cluster bus which Redis
//! channels it has interest in, and receives what arrives on them.
//!
//! The hub knows no Redis, HTTP or PostgreSQL: it routes `Delivery` values to
//! connection queues, encoding each event at most once per encoding.

mod frame;
mod shard;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use shared::codec::Encoding;
use shared::ids::{ChatId, UserId};
use shared::protocol::ServerEvent;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use frame::Frame;
use shard::{Command, Shard};

/// A connection's id, unique within this node.
pub type ConnId = u64;

/// What the hub puts on a connection's outgoing queue.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// An encoded event to write.
    Frame(Frame),
    /// The connection's user became a member of `chat`: start receiving it.
    Joined(ChatId),
    /// The connection's user left `chat`: stop receiving it.
    Left(ChatId),
    /// The chat's own channel said the user left, and the shard no longer
    /// sends the chat to this connection. The session checks the user's
    /// membership: a later join, arriving first on the user's channel, may
    /// have overtaken that leave.
    Detached(ChatId),
    /// The bus lost the user's channel for a while and has it again: a
    /// `joined` or `left` published meanwhile was missed, so the session
    /// reads the user's groups again and attaches or detaches what changed.
    Resync,
}

/// A local connection, as the hub sees it.
#[derive(Debug, Clone)]
pub struct Conn {
    pub id: ConnId,
    pub user: UserId,
    outbound: mpsc::Sender<Outbound>,
    encoding: Arc<AtomicU8>,
    /// Cancelled when the connection's queue overflowed (a slow reader).
    overflow: CancellationToken,
}

impl Conn {
    pub fn new(
        id: ConnId,
        user: UserId,
        outbound: mpsc::Sender<Outbound>,
        encoding: Arc<AtomicU8>,
        overflow: CancellationToken,
    ) -> Conn {
        Conn {
            id,
            user,
            outbound,
            encoding,
            overflow,
        }
    }

    /// Fires when the hub found this connection's queue full.
    pub fn overflow_token(&self) -> CancellationToken {
        self.overflow.clone()
    }

    fn encoding(&self) -> Encoding {
        decode_encoding(self.encoding.load(Ordering::Relaxed))
    }

    /// Queues without waiting; a full queue marks the reader as too slow.
    fn push(&self, item: Outbound) {
        match self.outbound.try_send(item) {
            Ok(()) => {}
            // Counted once, by the session that closes (a connection keeps
            // overflowing until its session gets to the token).
            Err(mpsc::error::TrySendError::Full(_)) => self.overflow.cancel(),
            // The session ended; its detach is on the way.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

/// Stores a connection's encoding in an atomic shared with the hub.
pub fn encode_encoding(e: Encoding) -> u8 {
    match e {
        Encoding::Json => 0,
        Encoding::MsgPack => 1,
    }
}

fn decode_encoding(v: u8) -> Encoding {
    if v == 1 {
        Encoding::MsgPack
    } else {
        Encoding::Json
    }
}

/// Where a delivery arrived: the channel of a user or of a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    User(UserId),
    Chat(ChatId),
}

impl Channel {
    /// The Redis pub/sub channel name (`u:<id>` / `c:<id>`).
    pub fn name(&self) -> String {
        match self {
            Channel::User(u) => format!("u:{u}"),
            Channel::Chat(c) => format!("c:{c}"),
        }
    }

    pub fn parse(name: &str) -> Option<Channel> {
        let (kind, id) = name.split_once(':')?;
        let id = id.parse().ok()?;
        match kind {
            "u" => Some(Channel::User(id)),
            "c" => Some(Channel::Chat(id)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub channel: Channel,
    /// The local connection that sent it: a message does not go back to the
    /// connection that sent it (that one gets the `ack`).
    pub origin: Option<ConnId>,
    /// A `message`, `typing`, `joined` or `left` event.
    pub event: ServerEvent,
}

/// What a shard asks of its bus: Redis channel interest.
#[derive(Debug)]
pub enum Interest {
    Subscribe(String),
    Unsubscribe(String),
    /// Answered once every earlier request is in effect, or failed.
    Barrier(oneshot::Sender<Result<(), BusDown>>),
}

/// The bus could not subscribe (Redis unreachable).
#[derive(Debug, Clone, thiserror::Error)]
#[error("cluster bus unavailable")]
pub struct BusDown;

/// Handle to all shards; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    shards: Arc<Vec<mpsc::Sender<Command>>>,
}

impl Hub {
    /// Starts `interest.len()` shards; shard i sends its interest to
    /// `interest[i]`. Returns the hub and nothing else to drive: the shard
    /// tasks end when every `Hub` clone is dropped.
    pub fn start(interest: Vec<mpsc::Sender<Interest>>, queue: usize) -> Hub {
        let shards = interest
            .into_iter()
            .map(|interest| {
                let (tx, rx) = mpsc::channel(queue);
                tokio::spawn(Shard::new(interest).run(rx));
                tx
            })
            .collect();
        Hub {
            shards: Arc::new(shards),
        }
    }

    /// The shard that owns `id` (a user's connections or a chat's members).
    pub fn shard_of(&self, id: uuid::Uuid) -> usize {
        shard_index(id, self.shards.len())
    }

    /// Registers a connection under its user; returns once the node receives
    /// the user's channel.
    pub async fn attach_user(&self, conn: Conn) -> Result<(), BusDown> {
        let (tx, rx) = oneshot::channel();
        self.send(self.shard_of(conn.user), Command::AttachUser { conn, ready: tx })
            .await;
        rx.await.unwrap_or(Err(BusDown))
    }

    pub async fn detach_user(&self, user: UserId, conn: ConnId) {
        self.send(self.shard_of(user), Command::DetachUser { user, conn }).await;
    }

    /// Makes a connection receive a chat; returns once the node receives the
    /// chat's channel.
    pub async fn attach_chat(&self, chat: ChatId, conn: Conn) -> Result<(), BusDown> {
        let (tx, rx) = oneshot::channel();
        self.send(
            self.shard_of(chat),
            Command::AttachChat {
                chat,
                conn,
                ready: Some(tx),
            },
        )
        .await;
        rx.await.unwrap_or(Err(BusDown))
    }

    pub async fn detach_chat(&self, chat: ChatId, conn: ConnId) {
        self.send(self.shard_of(chat), Command::DetachChat { chat, conn }).await;
    }

    /// Hands what arrived on shard `shard`'s channels to that shard.
    pub async fn deliver(&self, shard: usize, delivery: Delivery) {
        self.send(shard, Command::Deliver(delivery)).await;
    }

    /// Tells shard `shard` that its bus subscribed its channels again after
    /// losing them: every connection of its users gets `Outbound::Resync`.
    pub async fn resync(&self, shard: usize) {
        self.send(shard, Command::Resync).await;
    }

    async fn send(&self, shard: usize, cmd: Command) {
        // A shard only stops when the runtime shuts down.
        let _ = self.shards[shard].send(cmd).await;
    }
}

/// Spreads ids evenly: UUIDv4/v5/v7 all end in random bits.
pub fn shard_index(id: uuid::Uuid, shards: usize) -> usize {
    let low = id.as_u128() as u64;
    ((low.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % shards as u64) as usize
}

#[cfg(test)]
mod tests;
