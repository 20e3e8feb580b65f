//! Typing indicators (contract: `typing`; Ordering and delivery: at most one
//! per second per sender and target, extra ones dropped silently).
//!
//! A burst is counted without timing the recipient: after it, the sender
//! sends a message on the same channel, which the recipient gets after any
//! typing event the burst produced.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

const BURST: usize = 10;

fn two_gateways() -> StackOptions {
    StackOptions {
        gateways: 2,
        persister: false,
        ..StackOptions::default()
    }
}

/// The `typing` events `client` gets before the message `marker` (the ack
/// of a send that followed them on the same channel).
async fn typing_before(client: &mut Client, marker: &Value) -> Vec<Value> {
    let mut typing = Vec::new();
    loop {
        let event = client.next_event(DEFAULT_TIMEOUT).await;
        match event["type"].as_str() {
            Some("typing") => typing.push(event),
            Some("message") if event["id"] == marker["id"] => return typing,
            _ => panic!("unexpected {event} before the marker message {marker}"),
        }
    }
}

/// Sends `BURST` typing events for `target` (a `to` or `chat` field) as fast
/// as it can; returns how long the burst took, from its first send to the
/// ack of the marker sent after it, and the marker's ack.
async fn burst(client: &mut Client, target: Value, marker: Value) -> (Duration, Value) {
    let started = Instant::now();
    for _ in 0..BURST {
        let mut event = target.clone();
        event["type"] = json!("typing");
        client.send_json(event).await;
    }
    let reply = client.request(marker).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    (started.elapsed(), reply)
}

/// How many of a burst may come through: one, or two if the burst itself
/// spanned more than the one-second interval.
fn allowed(took: Duration) -> usize {
    if took < Duration::from_secs(1) {
        1
    } else {
        2
    }
}

#[tokio::test]
async fn ten_typing_events_within_a_second_reach_the_recipient_once() {
    let stack = Stack::start(two_gateways()).await;
    let (alice, bob, carol) = (harness::user(), harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut carol_1 = stack.connect(1, carol).await;

    let to = |user: Uuid| json!({ "to": user.to_string() });
    let marker = |user: Uuid| json!({ "type": "send", "to": user.to_string(), "body": "marker" });
    let (took, ack) = burst(&mut alice_0, to(bob), marker(bob)).await;
    let typing = typing_before(&mut bob_1, &ack).await;
    assert!(
        (1..=allowed(took)).contains(&typing.len()),
        "{} typing events from a burst of {BURST} in {took:?}: {typing:?}",
        typing.len()
    );
    for event in &typing {
        assert_eq!(event["from"], json!(alice.to_string()), "{event}");
        assert_eq!(event["to"], json!(bob.to_string()), "{event}");
        assert!(
            !event["chat"].is_string(),
            "a private typing event has no chat: {event}"
        );
    }

    // The limit is per target: Carol still gets Alice's typing.
    let (took, ack) = burst(&mut alice_0, to(carol), marker(carol)).await;
    let typing = typing_before(&mut carol_1, &ack).await;
    assert!((1..=allowed(took)).contains(&typing.len()), "{typing:?}");

    // And per second: once it has passed, Bob gets a new one.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, ack) = burst(&mut alice_0, to(bob), marker(bob)).await;
    let typing = typing_before(&mut bob_1, &ack).await;
    assert!(!typing.is_empty(), "no typing event a second after the last one");

    // Valid typing events, dropped or not, are never refused.
    alice_0.expect_none("error", Duration::ZERO).await;
}

#[tokio::test]
async fn typing_addressed_to_a_private_chat_by_its_id_reaches_the_other_side_as_private_typing() {
    let stack = Stack::start(two_gateways()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    // The first message brings the private chat into being.
    let first = alice_0
        .request(json!({ "type": "send", "to": bob.to_string(), "body": "hello" }))
        .await;
    assert_eq!(first["type"], "ack", "{first}");
    let hello = bob_1.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(hello["id"], first["id"], "{hello}");
    let dm = first["chat"].clone();

    let started = Instant::now();
    let marker = || json!({ "type": "send", "to": bob.to_string(), "body": "marker" });
    let (took_by_id, by_id) = burst(&mut alice_0, json!({ "chat": dm }), marker()).await;
    // The same conversation addressed by user: one limit for both.
    let (_, by_user) = burst(&mut alice_0, json!({ "to": bob.to_string() }), marker()).await;
    let took = started.elapsed();
    let mut typing = typing_before(&mut bob_1, &by_id).await;
    assert!(
        (1..=allowed(took_by_id)).contains(&typing.len()),
        "{} typing events from a burst of {BURST} by chat id in {took_by_id:?}: {typing:?}",
        typing.len()
    );
    typing.extend(typing_before(&mut bob_1, &by_user).await);
    assert!(
        typing.len() <= allowed(took),
        "{} typing events from two bursts of {BURST} in {took:?}: {typing:?}",
        typing.len()
    );
    for event in &typing {
        assert_eq!(event["from"], json!(alice.to_string()), "{event}");
        assert_eq!(event["to"], json!(bob.to_string()), "{event}");
        assert!(!event["chat"].is_string(), "private typing has no chat: {event}");
    }
    alice_0.expect_none("error", Duration::ZERO).await;
}

#[tokio::test]
async fn typing_in_a_group_reaches_the_other_members_once_with_the_chat() {
    let stack = Stack::start(two_gateways()).await;
    let (alice, bob, carol) = (harness::user(), harness::user(), harness::user());
    let (status, created) = stack
        .http(0)
        .create_chat(alice, "typists", "public", &[bob, carol])
        .await;
    assert_eq!(status, 201, "{created}");
    let chat: Uuid = created["id"].as_str().expect("id").parse().expect("uuid");
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let mut carol_0 = stack.connect(0, carol).await;

    let (took, ack) = burst(
        &mut alice_0,
        json!({ "chat": chat.to_string() }),
        json!({ "type": "send", "chat": chat.to_string(), "body": "marker" }),
    )
    .await;
    for (who, client) in [("Bob", &mut bob_1), ("Carol", &mut carol_0)] {
        let typing = typing_before(client, &ack).await;
        assert!(
            (1..=allowed(took)).contains(&typing.len()),
            "{who}: {} typing events from a burst of {BURST} in {took:?}: {typing:?}",
            typing.len()
        );
        for event in &typing {
            assert_eq!(event["from"], json!(alice.to_string()), "{who}: {event}");
            assert_eq!(event["chat"], json!(chat.to_string()), "{who}: {event}");
            assert!(
                !event["to"].is_string(),
                "{who}: a group typing event has no `to`: {event}"
            );
        }
    }
}
