//! The hub alone, with an in-memory stand-in for the bus's interest side.

use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared::protocol::{Message, ServerEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::*;

/// Starts a hub whose bus records interest and confirms every barrier.
fn hub(shards: usize) -> (Hub, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut senders = Vec::new();
    for _ in 0..shards {
        let (tx, mut rx) = mpsc::channel(64);
        senders.push(tx);
        let log = log.clone();
        tokio::spawn(async move {
            while let Some(i) = rx.recv().await {
                match i {
                    Interest::Subscribe(c) => log.lock().unwrap().push(format!("+{c}")),
                    Interest::Unsubscribe(c) => log.lock().unwrap().push(format!("-{c}")),
                    Interest::Barrier(r) => {
                        let _ = r.send(Ok(()));
                    }
                }
            }
        });
    }
    (Hub::start(senders, 64), log)
}

struct Client {
    conn: Conn,
    rx: mpsc::Receiver<Outbound>,
}

fn client(id: ConnId, user: UserId, queue: usize) -> Client {
    let (tx, rx) = mpsc::channel(queue);
    let conn = Conn::new(id, user, tx, Arc::new(AtomicU8::new(0)), CancellationToken::new());
    Client { conn, rx }
}

fn message(chat: ChatId, from: UserId, seq: i64) -> ServerEvent {
    ServerEvent::Message(Message {
        id: Uuid::now_v7(),
        chat,
        seq,
        from,
        to: None,
        body: "hi".into(),
        ts: 1,
    })
}

async fn next_frame(c: &mut Client) -> Frame {
    match tokio::time::timeout(Duration::from_secs(1), c.rx.recv()).await {
        Ok(Some(Outbound::Frame(f))) => f,
        other => panic!("expected a frame, got {other:?}"),
    }
}

fn nothing_queued(c: &mut Client) -> bool {
    c.rx.try_recv().is_err()
}

/// A deliver is processed once a later command to the same shard answers.
async fn settle(hub: &Hub, shard_of: Uuid) {
    let probe = client(u64::MAX, shard_of, 1);
    hub.attach_chat(shard_of, probe.conn.clone()).await.unwrap();
    hub.detach_chat(shard_of, u64::MAX).await;
}

#[tokio::test]
async fn a_chat_message_reaches_every_local_member_but_its_sender_encoded_once() {
    let (hub, _) = hub(4);
    let chat = Uuid::now_v7();
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let mut a = client(1, alice, 8);
    let mut b1 = client(2, bob, 8);
    let mut b2 = client(3, bob, 8);
    for c in [&a, &b1, &b2] {
        hub.attach_chat(chat, c.conn.clone()).await.unwrap();
    }
    let delivery = Delivery {
        channel: Channel::Chat(chat),
        origin: Some(1),
        event: message(chat, alice, 1),
    };
    hub.deliver(hub.shard_of(chat), delivery).await;

    let f1 = next_frame(&mut b1).await;
    let f2 = next_frame(&mut b2).await;
    // The same bytes, not two encodings of the same event.
    let (m1, m2) = (f1.into_message(), f2.into_message());
    assert_eq!(m1.clone().into_data().as_ptr(), m2.into_data().as_ptr());
    let json: serde_json::Value = serde_json::from_slice(&m1.into_data()).unwrap();
    assert_eq!(json["type"], "message");
    assert_eq!(json["seq"], 1);
    settle(&hub, chat).await;
    assert!(
        nothing_queued(&mut a),
        "the sender's own connection gets the ack, not the message"
    );
}

#[tokio::test]
async fn a_leave_on_the_chat_channel_stops_later_messages_to_that_user() {
    let (hub, log) = hub(2);
    let chat = Uuid::now_v7();
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let mut a = client(1, alice, 8);
    let mut b = client(2, bob, 8);
    hub.attach_chat(chat, a.conn.clone()).await.unwrap();
    hub.attach_chat(chat, b.conn.clone()).await.unwrap();
    let shard = hub.shard_of(chat);
    hub.deliver(
        shard,
        Delivery {
            channel: Channel::Chat(chat),
            origin: None,
            event: ServerEvent::Left { chat, user: bob },
        },
    )
    .await;
    hub.deliver(
        shard,
        Delivery {
            channel: Channel::Chat(chat),
            origin: None,
            event: message(chat, alice, 2),
        },
    )
    .await;

    let left: serde_json::Value = serde_json::from_slice(&next_frame(&mut a).await.into_message().into_data()).unwrap();
    assert_eq!(left["type"], "left");
    let msg: serde_json::Value = serde_json::from_slice(&next_frame(&mut a).await.into_message().into_data()).unwrap();
    assert_eq!(msg["seq"], 2);
    settle(&hub, chat).await;
    // Told it is detached (its session re-checks the membership), and
    // nothing more of the chat.
    match b.rx.try_recv() {
        Ok(Outbound::Detached(c)) => assert_eq!(c, chat),
        other => panic!("expected Detached, got {other:?}"),
    }
    assert!(
        nothing_queued(&mut b),
        "a user who left receives nothing more of the chat"
    );
    // Alice is still there: the node keeps the chat's channel.
    assert!(!log.lock().unwrap().contains(&format!("-c:{chat}")));
}

#[tokio::test]
async fn a_slow_reader_is_marked_for_closing_and_others_still_receive() {
    let (hub, _) = hub(1);
    let chat = Uuid::now_v7();
    let slow = client(1, Uuid::now_v7(), 2);
    let mut fast = client(2, Uuid::now_v7(), 64);
    hub.attach_chat(chat, slow.conn.clone()).await.unwrap();
    hub.attach_chat(chat, fast.conn.clone()).await.unwrap();
    for seq in 1..=5 {
        let d = Delivery {
            channel: Channel::Chat(chat),
            origin: None,
            event: message(chat, Uuid::now_v7(), seq),
        };
        hub.deliver(0, d).await;
    }
    for _ in 1..=5 {
        next_frame(&mut fast).await;
    }
    assert!(slow.conn.overflow_token().is_cancelled());
}

#[tokio::test]
async fn the_node_subscribes_on_first_interest_and_unsubscribes_on_last() {
    let (hub, log) = hub(3);
    let user = Uuid::now_v7();
    let (c1, c2) = (client(1, user, 4), client(2, user, 4));
    hub.attach_user(c1.conn.clone()).await.unwrap();
    hub.attach_user(c2.conn.clone()).await.unwrap();
    hub.detach_user(user, 1).await;
    settle(&hub, user).await;
    assert_eq!(
        *log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.ends_with(&format!("u:{user}")))
            .collect::<Vec<_>>(),
        [&format!("+u:{user}")]
    );
    hub.detach_user(user, 2).await;
    settle(&hub, user).await;
    assert!(log.lock().unwrap().contains(&format!("-u:{user}")));
}

#[tokio::test]
async fn joined_on_the_user_channel_tells_every_device_to_receive_the_chat() {
    let (hub, _) = hub(2);
    let (user, chat) = (Uuid::now_v7(), Uuid::now_v7());
    let mut d1 = client(1, user, 4);
    let mut d2 = client(2, user, 4);
    hub.attach_user(d1.conn.clone()).await.unwrap();
    hub.attach_user(d2.conn.clone()).await.unwrap();
    // The device that asked (origin 1) gets it too: only messages skip their sender.
    let d = Delivery {
        channel: Channel::User(user),
        origin: Some(1),
        event: ServerEvent::Joined { chat, user },
    };
    hub.deliver(hub.shard_of(user), d).await;
    for dev in [&mut d1, &mut d2] {
        next_frame(dev).await;
        match tokio::time::timeout(Duration::from_secs(1), dev.rx.recv()).await {
            Ok(Some(Outbound::Joined(c))) => assert_eq!(c, chat),
            other => panic!("expected Joined, got {other:?}"),
        }
    }
}

#[test]
fn shards_spread_ids_evenly() {
    let mut counts = [0usize; 8];
    for _ in 0..8000 {
        counts[shard_index(Uuid::now_v7(), 8)] += 1;
    }
    assert!(counts.iter().all(|&n| (800..1200).contains(&n)), "{counts:?}");
}

#[tokio::test]
async fn a_resync_reaches_every_connection_of_the_shards_users_and_no_chat_member_elsewhere() {
    // One shard: the users and the chat all live in it.
    let (hub, _) = hub(1);
    let chat = Uuid::now_v7();
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let mut a1 = client(1, alice, 8);
    let mut a2 = client(2, alice, 8);
    let mut b = client(3, bob, 8);
    hub.attach_user(a1.conn.clone()).await.unwrap();
    hub.attach_user(a2.conn.clone()).await.unwrap();
    // Bob's connection receives the chat but is not registered under his
    // user in this hub: nothing of a user's channel is its to resync.
    hub.attach_chat(chat, b.conn.clone()).await.unwrap();

    hub.resync(0).await;
    settle(&hub, chat).await;
    for c in [&mut a1, &mut a2] {
        assert!(
            matches!(c.rx.try_recv(), Ok(Outbound::Resync)),
            "each of Alice's connections resyncs"
        );
        assert!(nothing_queued(c), "once");
    }
    assert!(
        nothing_queued(&mut b),
        "a connection known only as a chat member is not told to resync"
    );
}
