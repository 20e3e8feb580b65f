//! Private messages across two gateway processes (contract: WebSocket
//! `send` with `to`, the `message` and `ack` events, Chats: the private
//! chat's id, history).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, canonical_uuid, Stack, StackOptions, DEFAULT_TIMEOUT};

/// How long the persister may take to store a message.
const STORED: Duration = Duration::from_secs(15);

fn two_gateways() -> StackOptions {
    StackOptions {
        gateways: 2,
        ..StackOptions::default()
    }
}

/// The private chat of `a` and `b` computed from the contract's words alone:
/// UUIDv5 in the URL namespace of `dm:<smaller id>:<larger id>`.
fn contract_private_chat(a: Uuid, b: Uuid) -> Uuid {
    let (a, b) = (a.to_string(), b.to_string());
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let namespace = Uuid::parse_str("6ba7b811-9dad-11d1-80b4-00c04fd430c8").expect("the URL namespace");
    Uuid::new_v5(&namespace, format!("dm:{lo}:{hi}").as_bytes())
}

fn now_ms() -> i64 {
    harness::now_secs() * 1000
}

/// Checks an `ack` to the send with `reference` and returns its fields.
fn check_ack(ack: &Value, reference: &str, chat: Uuid, sent_from_ms: i64) {
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], json!(reference), "{ack}");
    canonical_uuid(&ack["id"], "ack.id");
    assert_eq!(canonical_uuid(&ack["chat"], "ack.chat"), chat, "{ack}");
    assert!(ack["seq"].is_i64(), "ack.seq is not an integer: {ack}");
    // Milliseconds since the epoch (not seconds, not a string); the bounds
    // only tell units apart, with a minute of slack for clocks.
    let ts = ack["ts"]
        .as_i64()
        .unwrap_or_else(|| panic!("ack.ts is not an integer: {ack}"));
    assert!(
        (sent_from_ms - 60_000..=now_ms() + 60_000).contains(&ts),
        "ack.ts is not milliseconds since the epoch: {ack}"
    );
}

/// The `message` event the recipients of `ack` must get.
fn expected_message(ack: &Value, from: Uuid, to: Uuid, body: &str) -> Value {
    json!({
        "type": "message",
        "id": ack["id"],
        "chat": ack["chat"],
        "seq": ack["seq"],
        "from": from.to_string(),
        "to": to.to_string(),
        "body": body,
        "ts": ack["ts"],
    })
}

/// Checks every field of the contract's `message` event.
fn assert_message(got: &Value, expected: &Value, who: &str) {
    for field in ["type", "id", "chat", "seq", "from", "to", "body", "ts"] {
        assert_eq!(
            got[field], expected[field],
            "{who}: field `{field}` of {got}; expected {expected}"
        );
    }
}

/// The fields of a `message` event, without `type`.
fn message_fields(event: &Value) -> BTreeSet<String> {
    event
        .as_object()
        .expect("an object")
        .keys()
        .filter(|k| *k != "type")
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_private_message_reaches_every_device_of_both_users_but_the_sending_one() {
    let stack = Stack::start(two_gateways()).await;
    let (alice, bob) = (harness::user(), harness::user());
    // Alice sends from gateway 0 and has a second device on gateway 1; Bob
    // has a device on each gateway.
    let mut alice_sending = stack.connect(0, alice).await;
    let mut alice_other = stack.connect(1, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    let mut bob_1 = stack.connect(1, bob).await;

    let chat = contract_private_chat(alice, bob);
    assert_eq!(chat, harness::private_chat(alice, bob));
    let body = "hello Bob, from Alice ✓";
    let started = now_ms();
    let ack = alice_sending
        .request(json!({ "type": "send", "to": bob.to_string(), "body": body, "ref": "first" }))
        .await;
    check_ack(&ack, "first", chat, started);
    let expected = expected_message(&ack, alice, bob, body);

    let mut live = Vec::new();
    for (who, client) in [
        ("Bob on gateway 0", &mut bob_0),
        ("Bob on gateway 1", &mut bob_1),
        ("Alice's other device", &mut alice_other),
    ] {
        let message = client.expect("message", DEFAULT_TIMEOUT).await;
        assert_message(&message, &expected, who);
        live.push(message);
    }

    // Bob answers. Both messages travel on Alice's channel, in order, so had
    // Alice's own message been sent back to her sending connection it would
    // come before Bob's answer.
    let answer = bob_1.send_message_to(alice, "hi Alice").await;
    assert_eq!(
        answer["chat"],
        json!(chat.to_string()),
        "both directions share one chat"
    );
    assert!(
        answer["seq"].as_i64() > ack["seq"].as_i64(),
        "seq increases in chat order: {ack} then {answer}"
    );
    let first_seen = alice_sending.expect("message", DEFAULT_TIMEOUT).await;
    assert_message(
        &first_seen,
        &expected_message(&answer, bob, alice, "hi Alice"),
        "Alice's sending connection",
    );
    let on_bob_0 = bob_0.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(
        on_bob_0["id"], answer["id"],
        "Bob's other device gets his answer: {on_bob_0}"
    );

    // Once stored, history shows both users the message with exactly the
    // fields of the live event.
    for user in [alice, bob] {
        let history = stack.wait_for_history(user, chat, 2, STORED).await;
        assert_eq!(history.len(), 2, "{history:?}");
        let stored = &history[0];
        assert_eq!(message_fields(stored), message_fields(&live[0]), "history: {stored}");
        for field in message_fields(&live[0]) {
            assert_eq!(stored[&field], live[0][&field], "history field `{field}`: {stored}");
        }
        assert_eq!(history[1]["id"], answer["id"], "history is in chat order: {history:?}");
    }
}

#[tokio::test]
async fn a_user_may_message_themselves_and_their_other_devices_receive_it() {
    let stack = Stack::start(two_gateways()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut sending = stack.connect(0, alice).await;
    let mut other = stack.connect(1, alice).await;

    let chat = contract_private_chat(alice, alice);
    let started = now_ms();
    let ack = sending
        .request(json!({ "type": "send", "to": alice.to_string(), "body": "note to self", "ref": "n" }))
        .await;
    check_ack(&ack, "n", chat, started);
    let expected = expected_message(&ack, alice, alice, "note to self");
    let message = other.expect("message", DEFAULT_TIMEOUT).await;
    assert_message(&message, &expected, "Alice's other device");
    other.expect_none("message", Duration::from_millis(300)).await;

    // The sending connection did not get its own message: the next one on
    // Alice's channel is Bob's.
    let mut bob_client = stack.connect(1, bob).await;
    let from_bob = bob_client.send_message_to(alice, "hello").await;
    let first_seen = sending.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(first_seen["id"], from_bob["id"], "{first_seen}");

    let history = stack.wait_for_history(alice, chat, 1, STORED).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["id"], ack["id"]);
    assert_eq!(history[0]["from"], json!(alice.to_string()));
    assert_eq!(history[0]["to"], json!(alice.to_string()));

    // No one else may read it.
    let (status, body) = stack.http(0).history(bob, chat, "").await;
    assert_eq!(status, 403, "{body}");
}

#[tokio::test]
async fn connections_opened_together_each_receive_what_is_sent_as_soon_as_they_are_open() {
    // Their subscriptions reach Redis in shared round trips; each handshake
    // must still complete only once its own subscription is in effect.
    let stack = Stack::start(StackOptions {
        gateways: 2,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let users: Vec<Uuid> = (0..200).map(|_| harness::user()).collect();
    let mut clients = futures_util::future::join_all(users.iter().map(|user| stack.connect(0, *user))).await;
    let mut sender = stack.connect(1, harness::user()).await;
    for (i, user) in users.iter().enumerate() {
        let ack = sender.send_message_to(*user, &format!("hello {i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    for (i, client) in clients.iter_mut().enumerate() {
        let message = client.expect("message", DEFAULT_TIMEOUT).await;
        assert_eq!(message["body"], format!("hello {i}"), "{message}");
    }
}
