//! Ordering (contract: Ordering and delivery): concurrent senders on two
//! gateways, one chat; every member sees one order with consecutive `seq`,
//! and history returns exactly that order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, Api, Client, Stack, StackOptions};

/// Messages each of the two senders sends.
const PER_SENDER: usize = 1000;
/// Sends a sender has in flight (sent, not yet acked).
const WINDOW: usize = 64;
/// Any single wait for the next event.
const STEP: Duration = Duration::from_secs(20);

/// Sends `PER_SENDER` messages to `chat`, keeping up to `WINDOW` unacked,
/// while reading what arrives; then reads until the other sender's
/// `PER_SENDER` messages are in. Returns the client, the acks by ref, and
/// the messages received, in arrival order.
async fn pipelined_sender(
    mut client: Client,
    chat: Uuid,
    tag: &'static str,
) -> (Client, HashMap<String, Value>, Vec<Value>) {
    let mut acks = HashMap::new();
    let mut messages = Vec::new();
    let mut sent = 0;
    while acks.len() < PER_SENDER || messages.len() < PER_SENDER {
        if sent < PER_SENDER && sent - acks.len() < WINDOW {
            let reference = format!("{tag}-{sent}");
            let body = format!("{tag} {sent}");
            client
                .send_json(json!({ "type": "send", "chat": chat.to_string(), "body": body, "ref": reference }))
                .await;
            sent += 1;
            continue;
        }
        let event = client.next_event(STEP).await;
        match event["type"].as_str() {
            Some("ack") => {
                let reference = event["ref"].as_str().expect("ack.ref").to_string();
                assert!(acks.insert(reference, event.clone()).is_none(), "a second ack: {event}");
            }
            Some("message") => messages.push(event),
            _ => panic!("{tag}: unexpected {event}"),
        }
    }
    (client, acks, messages)
}

/// Reads `n` messages.
async fn receiver(mut client: Client, n: usize) -> Vec<Value> {
    client.expect_n("message", n, STEP).await
}

/// Walks `chat`'s history back from the latest message, 500 at a time.
async fn history_backwards(api: &Api, user: Uuid, chat: Uuid) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    let mut query = "limit=500".to_string();
    loop {
        let (status, body) = api.history(user, chat, &query).await;
        assert_eq!(status, 200, "history?{query}: {body}");
        let page = body["messages"].as_array().expect("messages").clone();
        assert!(page.len() <= 500, "more than `limit` messages");
        if page.is_empty() {
            return all;
        }
        query = format!("before={}&limit=500", page[0]["id"].as_str().expect("id"));
        all.splice(0..0, page);
    }
}

/// Walks `chat`'s history forward from the message `first`, 500 at a time.
async fn history_forwards(api: &Api, user: Uuid, chat: Uuid, first: &Value) -> Vec<Value> {
    let mut all = vec![first.clone()];
    loop {
        let last = all.last().expect("one message")["id"].as_str().expect("id").to_string();
        let query = format!("after={last}&limit=500");
        let (status, body) = api.history(user, chat, &query).await;
        assert_eq!(status, 200, "history?{query}: {body}");
        let page = body["messages"].as_array().expect("messages").clone();
        assert!(page.len() <= 500, "more than `limit` messages");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

fn ids(messages: &[Value]) -> Vec<&str> {
    messages.iter().map(|m| m["id"].as_str().expect("id")).collect()
}

/// Fails, showing the first difference, unless `got` and `expected` hold
/// the same messages (by id) in the same order.
fn assert_same_order(who: &str, got: &[Value], expected: &[Value]) {
    let (got_ids, expected_ids) = (ids(got), ids(expected));
    if let Some(i) = (0..got_ids.len().min(expected_ids.len())).find(|&i| got_ids[i] != expected_ids[i]) {
        panic!("{who}: message {i} is {}, expected {}", got[i], expected[i]);
    }
    assert_eq!(got_ids.len(), expected_ids.len(), "{who}: not as many messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_two_gateways_give_every_member_and_history_one_order() {
    let stack = Stack::start(StackOptions {
        gateways: 2,
        ..StackOptions::default()
    })
    .await;
    let (alice, bob, carol, dave) = (harness::user(), harness::user(), harness::user(), harness::user());
    let (status, created) = stack
        .http(0)
        .create_chat(alice, "busy", "public", &[bob, carol, dave])
        .await;
    assert_eq!(status, 201, "{created}");
    let chat: Uuid = created["id"].as_str().expect("id").parse().expect("uuid");

    // Senders: Alice on gateway 0, Bob on gateway 1. Receivers: each
    // sender's other device on the other gateway, Carol and Dave.
    let alice_sending = stack.connect(0, alice).await;
    let bob_sending = stack.connect(1, bob).await;
    let readers = vec![
        ("Alice's other device", stack.connect(1, alice).await),
        ("Bob's other device", stack.connect(0, bob).await),
        ("Carol", stack.connect(0, carol).await),
        ("Dave", stack.connect(1, dave).await),
    ];
    let total = 2 * PER_SENDER;
    let readers: Vec<_> = readers
        .into_iter()
        .map(|(who, client)| (who, tokio::spawn(receiver(client, total))))
        .collect();
    let alice_task = tokio::spawn(pipelined_sender(alice_sending, chat, "alice"));
    let bob_task = tokio::spawn(pipelined_sender(bob_sending, chat, "bob"));
    let (_alice_client, alice_acks, alice_saw) = alice_task.await.expect("Alice's task");
    let (_bob_client, bob_acks, bob_saw) = bob_task.await.expect("Bob's task");

    // The order: what Carol saw. Seq increases by one, every acked message
    // is in it once, with the seq and ts of its ack.
    let mut seen = Vec::new();
    for (who, reader) in readers {
        seen.push((who, reader.await.expect("a reader's task")));
    }
    let order = seen[2].1.clone();
    let seqs: Vec<i64> = order.iter().map(|m| m["seq"].as_i64().expect("seq")).collect();
    if let Some(w) = seqs.windows(2).find(|w| w[1] != w[0] + 1) {
        panic!("seq does not increase by one: {} then {}", w[0], w[1]);
    }
    let acks: HashMap<&str, &Value> = alice_acks
        .values()
        .chain(bob_acks.values())
        .map(|ack| (ack["id"].as_str().expect("ack.id"), ack))
        .collect();
    assert_eq!(acks.len(), total, "acks with distinct ids");
    let distinct: HashSet<&str> = ids(&order).into_iter().collect();
    assert_eq!(distinct.len(), total, "every message once");
    for message in &order {
        let ack = acks
            .get(message["id"].as_str().expect("id"))
            .unwrap_or_else(|| panic!("a message no one was acked for: {message}"));
        assert_eq!(
            (&message["seq"], &message["ts"]),
            (&ack["seq"], &ack["ts"]),
            "{message} vs {ack}"
        );
    }

    // (The test's premise: the two senders really sent at once.)
    let switches = order.windows(2).filter(|w| w[0]["from"] != w[1]["from"]).count();
    assert!(switches > 1, "the senders did not overlap; switches: {switches}");
    // Every member saw that order; each sender saw the other's messages in it.
    for (who, messages) in &seen {
        assert_same_order(who, messages, &order);
    }
    for (who, sender, saw) in [("Alice", alice, &alice_saw), ("Bob", bob, &bob_saw)] {
        let others: Vec<Value> = order
            .iter()
            .filter(|m| m["from"] != json!(sender.to_string()))
            .cloned()
            .collect();
        assert_same_order(&format!("{who}'s sending connection"), saw, &others);
    }

    // History, once all 2,000 are stored, holds exactly that order, walked
    // back from the latest and forward from the first.
    let api = stack.http(1);
    let deadline = Instant::now() + Duration::from_secs(60);
    let backwards = loop {
        let history = history_backwards(&api, dave, chat).await;
        if history.len() >= total || Instant::now() >= deadline {
            break history;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if backwards.len() != total {
        panic!(
            "history holds {} of {total} messages after 60 s; the queue: {}\n{}",
            backwards.len(),
            queue_state(&stack).await,
            stack.logs_tail(40)
        );
    }
    assert_same_order("history walked back", &backwards, &order);
    for (stored, live) in backwards.iter().zip(&order) {
        assert_eq!(
            stored,
            &without_type(live),
            "history shows a message otherwise than live"
        );
    }
    let forwards = history_forwards(&api, dave, chat, &backwards[0]).await;
    assert_same_order("history walked forward", &forwards, &order);

    // Without a cursor: the latest 50 by default, and never more than 500.
    for (query, n) in [("", 50), ("limit=1000", 500)] {
        let (status, body) = api.history(carol, chat, query).await;
        assert_eq!(status, 200, "history?{query}: {body}");
        let page = body["messages"].as_array().expect("messages");
        assert_same_order(&format!("history?{query}"), page, &order[total - n..]);
    }
}

/// The queue stream's length and its pending summary, to tell a slow or
/// stuck persister from lost jobs when history falls short.
async fn queue_state(stack: &Stack) -> String {
    let mut redis = stack.redis.connection().await;
    let len: redis::RedisResult<i64> = redis::cmd("XLEN")
        .arg(shared::queue::STREAM)
        .query_async(&mut redis)
        .await;
    let pending: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
        .arg(shared::queue::STREAM)
        .arg(shared::queue::GROUP)
        .query_async(&mut redis)
        .await;
    format!("XLEN {len:?}, XPENDING {pending:?}")
}

/// A `message` event as history shows it: the same fields but `type`.
fn without_type(message: &Value) -> Value {
    let mut message = message.clone();
    message.as_object_mut().expect("an object").remove("type");
    message
}

/// The gap the two restart tests configure (the gateway's least allowed).
const RESTART_GAP: i64 = 1000;

/// Sends to `to` until acked, retrying with the same id while the gateway
/// answers `unavailable` (Redis coming back); returns the ack's seq.
async fn seq_of_send(client: &mut Client, to: Uuid, body: &str) -> i64 {
    let id = Uuid::now_v7().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = client
            .request(json!({ "type": "send", "to": to.to_string(), "body": body, "id": id }))
            .await;
        if reply["type"] == "ack" {
            return reply["seq"].as_i64().expect("an ack has a seq");
        }
        assert_eq!(reply["code"], "unavailable", "{body}: {reply}");
        assert!(Instant::now() < deadline, "{body}: still unavailable after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stack whose gateway jumps by `RESTART_GAP`, no persister, and Alice
/// connected (with Bob to write to).
async fn alice_writing_to_bob(redis_aof: bool) -> (Stack, Client, Uuid) {
    let stack = Stack::start(StackOptions {
        redis_aof,
        persister: false,
        env: vec![("CHAT_SEQ_RESTART_GAP".into(), RESTART_GAP.to_string())],
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let client = stack.connect(0, alice).await;
    (stack, client, bob)
}

#[tokio::test]
async fn after_a_redis_restart_a_chats_seq_jumps_by_the_restart_gap() {
    // Redis may lose its last second of writes in a crash (AOF everysec),
    // counter increments included, while a persister already stored those
    // messages: the jump keeps a lost seq from being given twice.
    let (mut stack, mut client, bob) = alice_writing_to_bob(true).await;
    assert_eq!(seq_of_send(&mut client, bob, "one").await, 1);
    assert_eq!(seq_of_send(&mut client, bob, "two").await, 2);

    stack.redis.restart().await;
    assert_eq!(
        seq_of_send(&mut client, bob, "after the restart").await,
        2 + RESTART_GAP + 1
    );
    assert_eq!(
        seq_of_send(&mut client, bob, "and then").await,
        2 + RESTART_GAP + 2,
        "one jump per restart"
    );
}

#[tokio::test]
async fn a_flushed_script_cache_without_a_restart_does_not_move_the_seq() {
    let (stack, mut client, bob) = alice_writing_to_bob(false).await;
    assert_eq!(seq_of_send(&mut client, bob, "one").await, 1);
    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut redis)
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(seq_of_send(&mut client, bob, "after SCRIPT FLUSH").await, 2);
}

/// `user`'s row of `chat_members` for `chat`: (active, version).
async fn membership_row(stack: &Stack, chat: Uuid, user: Uuid) -> Option<(bool, i64)> {
    let row = stack
        .db()
        .await
        .query_opt(
            "SELECT active, version FROM chat_members WHERE chat = $1 AND user_id = $2",
            &[&chat, &user],
        )
        .await
        .expect("reading chat_members");
    row.map(|r| (r.get(0), r.get(1)))
}

/// `owner` adds `user` to `chat` over REST, retrying while the gateway
/// answers 503 (Redis coming back).
async fn add_until_done(api: &Api, owner: Uuid, chat: Uuid, user: Uuid) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = api.add_member(owner, chat, user).await;
        if status == 204 {
            return;
        }
        assert_eq!(status, 503, "adding {user}: {body}");
        assert!(Instant::now() < deadline, "adding {user}: still 503 after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the persister has stored (and deleted) every queued job.
async fn queue_drained(stack: &Stack) {
    let mut redis = stack.redis.connection().await;
    stack
        .eventually("empty chat:queue", Duration::from_secs(30), async || {
            let len: i64 = redis::cmd("XLEN")
                .arg(shared::queue::STREAM)
                .query_async(&mut redis)
                .await
                .expect("XLEN");
            (len == 0).then_some(())
        })
        .await;
}

#[tokio::test]
async fn after_a_redis_restart_that_lost_a_leave_a_rejoin_is_stored_as_active() {
    // The membership version orders a chat's changes in PostgreSQL (a row
    // is replaced only by a newer version), so a restart that lost the last
    // changes must not give their versions again: they jump like the seq.
    let mut stack = Stack::start(StackOptions {
        redis_aof: true,
        env: vec![("CHAT_SEQ_RESTART_GAP".into(), RESTART_GAP.to_string())],
        ..StackOptions::default()
    })
    .await;
    let api = stack.http(0);
    let (owner, x) = (harness::user(), harness::user());
    let (status, created) = api.create_chat(owner, "restarts", "public", &[]).await;
    assert_eq!(status, 201, "{created}");
    let chat = harness::canonical_uuid(&created["id"], "the chat's id");
    // The owner is version 1; X joins (2) and leaves (3), both stored.
    add_until_done(&api, owner, chat, x).await;
    let (status, body) = api.remove_member(x, chat, x).await;
    assert_eq!(status, 204, "{body}");
    stack
        .eventually("X's leave stored", Duration::from_secs(30), async || {
            (membership_row(&stack, chat, x).await == Some((false, 3))).then_some(())
        })
        .await;

    // Redis restarts having lost its last second: X's join and leave, so
    // its membership version is back at 1 (X is not a member either way).
    stack.redis.restart().await;
    let meta = shared::keys::chat_meta(chat);
    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("mver")
        .arg(1)
        .query_async(&mut redis)
        .await
        .expect("setting mver back");

    // X joins again: Redis has X as a member, and so must PostgreSQL.
    add_until_done(&api, owner, chat, x).await;
    queue_drained(&stack).await;
    assert_eq!(
        membership_row(&stack, chat, x).await,
        Some((true, 1 + RESTART_GAP + 1)),
        "the rejoin after the restart must outrank the stored leave"
    );

    // One jump per restart.
    let (status, body) = api.remove_member(x, chat, x).await;
    assert_eq!(status, 204, "{body}");
    queue_drained(&stack).await;
    assert_eq!(
        membership_row(&stack, chat, x).await,
        Some((false, 1 + RESTART_GAP + 2))
    );
}
