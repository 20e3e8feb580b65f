//! One hub shard: a task that owns a slice of the node's connection maps.
//!
//! It keeps, for the users and chats hashed to it, the local connections
//! that receive them, asks its bus for the matching Redis channels when the
//! first local connection appears and drops them when the last one goes, and
//! fans each delivery out to connection queues. It never waits on a
//! connection: a full queue closes that connection (1008), not the shard.

use std::collections::HashMap;

use shared::ids::{ChatId, UserId};
use shared::protocol::ServerEvent;
use tokio::sync::{mpsc, oneshot};

use super::frame::LazyFrames;
use super::{BusDown, Channel, Conn, ConnId, Delivery, Interest, Outbound};

pub(super) enum Command {
    AttachUser {
        conn: Conn,
        ready: oneshot::Sender<Result<(), BusDown>>,
    },
    DetachUser {
        user: UserId,
        conn: ConnId,
    },
    AttachChat {
        chat: ChatId,
        conn: Conn,
        ready: Option<oneshot::Sender<Result<(), BusDown>>>,
    },
    DetachChat {
        chat: ChatId,
        conn: ConnId,
    },
    Deliver(Delivery),
    /// The bus has this shard's channels again after losing them.
    Resync,
}

pub(super) struct Shard {
    users: HashMap<UserId, Vec<Conn>>,
    chats: HashMap<ChatId, Vec<Conn>>,
    interest: mpsc::Sender<Interest>,
}

impl Shard {
    pub(super) fn new(interest: mpsc::Sender<Interest>) -> Shard {
        Shard {
            users: HashMap::new(),
            chats: HashMap::new(),
            interest,
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(cmd) = commands.recv().await {
            self.handle(cmd).await;
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::AttachUser { conn, ready } => {
                let channel = Channel::User(conn.user);
                let first = attach(&mut self.users, conn.user, conn);
                self.subscribe_then_confirm(channel, first, Some(ready)).await;
            }
            Command::DetachUser { user, conn } => {
                if detach(&mut self.users, user, |c| c.id == conn) {
                    self.unsubscribe(Channel::User(user)).await;
                }
            }
            Command::AttachChat { chat, conn, ready } => {
                let first = attach(&mut self.chats, chat, conn);
                self.subscribe_then_confirm(Channel::Chat(chat), first, ready).await;
            }
            Command::DetachChat { chat, conn } => {
                if detach(&mut self.chats, chat, |c| c.id == conn) {
                    self.unsubscribe(Channel::Chat(chat)).await;
                }
            }
            Command::Deliver(d) => self.deliver(d).await,
            Command::Resync => {
                // A user's own joins and leaves come over the user's
                // channel; what a chat's channel missed meanwhile (messages,
                // other members' changes) is in history.
                for conn in self.users.values().flatten() {
                    conn.push(Outbound::Resync);
                }
            }
        }
    }

    async fn subscribe_then_confirm(
        &mut self,
        channel: Channel,
        first: bool,
        ready: Option<oneshot::Sender<Result<(), BusDown>>>,
    ) {
        if first {
            let _ = self.interest.send(Interest::Subscribe(channel.name())).await;
        }
        if let Some(ready) = ready {
            // The barrier also covers a subscription another connection
            // started a moment ago and that may still be in flight.
            if self.interest.send(Interest::Barrier(ready)).await.is_err() {
                tracing::error!("cluster bus task is gone");
            }
        }
    }

    async fn unsubscribe(&mut self, channel: Channel) {
        let _ = self.interest.send(Interest::Unsubscribe(channel.name())).await;
    }

    async fn deliver(&mut self, d: Delivery) {
        metrics::counter!("gateway_deliveries_in_total").increment(1);
        match (d.channel, d.event) {
            (Channel::User(user), event) => {
                let Some(conns) = self.users.get(&user) else {
                    return;
                };
                let control = match &event {
                    ServerEvent::Joined { chat, user: who } if *who == user => Some(Outbound::Joined(*chat)),
                    ServerEvent::Left { chat, user: who } if *who == user => Some(Outbound::Left(*chat)),
                    _ => None,
                };
                let sender = sending_conn(&event, d.origin);
                let mut frames = LazyFrames::new(event);
                let kind = frames.kind();
                let mut pushed = 0u64;
                for conn in conns.iter().filter(|c| Some(c.id) != sender) {
                    pushed += 1;
                    conn.push(Outbound::Frame(frames.get(conn.encoding())));
                    if let Some(control) = &control {
                        conn.push(control.clone());
                    }
                }
                metrics::counter!("gateway_events_out_total", "type" => kind).increment(pushed);
            }
            (Channel::Chat(chat), event) => {
                // A leave takes effect here, in channel order: no message
                // published after it reaches the user's connections.
                if let ServerEvent::Left { user, .. } = &event {
                    let user = *user;
                    for conn in self.chats.get(&chat).into_iter().flatten().filter(|c| c.user == user) {
                        conn.push(Outbound::Detached(chat));
                    }
                    if detach(&mut self.chats, chat, |c| c.user == user) {
                        self.unsubscribe(Channel::Chat(chat)).await;
                    }
                }
                let Some(conns) = self.chats.get(&chat) else {
                    return;
                };
                // Membership and typing events reach the user concerned
                // through the user's own channel, not this one.
                let skip_user = match &event {
                    ServerEvent::Typing { from, .. } => Some(*from),
                    ServerEvent::Joined { user, .. } | ServerEvent::Left { user, .. } => Some(*user),
                    _ => None,
                };
                let sender = sending_conn(&event, d.origin);
                let mut frames = LazyFrames::new(event);
                let kind = frames.kind();
                let mut pushed = 0u64;
                for conn in conns {
                    if Some(conn.id) == sender || Some(conn.user) == skip_user {
                        continue;
                    }
                    pushed += 1;
                    conn.push(Outbound::Frame(frames.get(conn.encoding())));
                }
                metrics::counter!("gateway_events_out_total", "type" => kind).increment(pushed);
            }
        }
    }
}

/// The connection a message must skip: its sender, which gets the `ack`.
/// Membership events go to the connection that asked, too.
fn sending_conn(event: &ServerEvent, origin: Option<ConnId>) -> Option<ConnId> {
    match event {
        ServerEvent::Message(_) => origin,
        _ => None,
    }
}

/// Adds a connection; true when it is the first for this key.
fn attach<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Vec<Conn>>, key: K, conn: Conn) -> bool {
    let conns = map.entry(key).or_default();
    if conns.iter().any(|c| c.id == conn.id) {
        return false;
    }
    conns.push(conn);
    conns.len() == 1
}

/// Removes matching connections; true when none is left for this key.
fn detach<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, Vec<Conn>>,
    key: K,
    matches: impl Fn(&Conn) -> bool,
) -> bool {
    let Some(conns) = map.get_mut(&key) else {
        return false;
    };
    let before = conns.len();
    conns.retain(|c| !matches(c));
    if conns.is_empty() {
        map.remove(&key);
        return before > 0;
    }
    false
}
