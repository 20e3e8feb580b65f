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
