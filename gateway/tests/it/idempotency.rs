//! Idempotent sends (contract: `send` with `id`): a resent `id` never makes a
//! second message and is acked again with the same `id`, `chat`, `seq` and
//! `ts`; an `id` is its sender's alone.

use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, Stack, StackOptions, DEFAULT_TIMEOUT};

fn send_with_id(to: Uuid, id: Uuid, body: &str, reference: &str) -> Value {
    json!({ "type": "send", "to": to.to_string(), "body": body, "id": id.to_string(), "ref": reference })
}

fn ack_fields(ack: &Value) -> [&Value; 4] {
    [&ack["id"], &ack["chat"], &ack["seq"], &ack["ts"]]
}

#[tokio::test]
async fn the_same_id_sent_twice_is_one_message_acked_twice_alike() {
    let stack = Stack::start(StackOptions {
        gateways: 2,
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut alice_1 = stack.connect(1, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let id = Uuid::new_v4();

    let first = alice_0.request(send_with_id(bob, id, "once", "first")).await;
    assert_eq!(first["type"], "ack", "{first}");
    assert_eq!(
        first["id"],
        json!(id.to_string()),
        "the ack carries the client's id: {first}"
    );
    // The same id again: from the same connection, as after a lost ack, and
    // from Alice's other device, as after a reconnect elsewhere.
    let again = alice_0.request(send_with_id(bob, id, "once", "again")).await;
    let elsewhere = alice_1.request(send_with_id(bob, id, "once", "elsewhere")).await;
    for (reference, ack) in [("again", &again), ("elsewhere", &elsewhere)] {
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["ref"], json!(reference), "{ack}");
        assert_eq!(
            ack_fields(ack),
            ack_fields(&first),
            "a resend's ack differs: {ack} vs {first}"
        );
    }

    // Bob receives it once: the next message on his channel is Alice's next one.
    let got = bob_1.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], json!(id.to_string()), "{got}");
    assert_eq!(got["seq"], first["seq"], "{got}");
    let next = alice_0.send_message_to(bob, "twice?").await;
    let got = bob_1.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], next["id"], "Bob received the resent message again: {got}");
    assert_eq!(
        next["seq"].as_i64(),
        first["seq"].as_i64().map(|s| s + 1),
        "the resends took no seq: {first} then {next}"
    );

    // One stored message (and the next one).
    let chat = harness::private_chat(alice, bob);
    let history = stack.wait_for_history(bob, chat, 2, Duration::from_secs(15)).await;
    let stored: Vec<&Value> = history.iter().map(|m| &m["id"]).collect();
    assert_eq!(stored, vec![&json!(id.to_string()), &next["id"]], "{history:?}");
}

#[tokio::test]
async fn another_user_reusing_an_id_gets_bad_request() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let (alice, bob, mallory) = (harness::user(), harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut mallory_0 = stack.connect(0, mallory).await;
    let mut bob_0 = stack.connect(0, bob).await;
    let id = Uuid::new_v4();

    let ack = alice_0.request(send_with_id(bob, id, "from Alice", "a")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let got = bob_0.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], json!(id.to_string()));

    for (to, reference) in [(bob, "same recipient"), (mallory, "another chat")] {
        let reply = mallory_0.request(send_with_id(to, id, "from Mallory", reference)).await;
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "bad_request", "{reply}");
        assert_eq!(reply["ref"], json!(reference), "{reply}");
    }
    // Nothing reached Bob: his next message is Alice's next one.
    let next = alice_0.send_message_to(bob, "still Alice").await;
    let got = bob_0.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!((&got["type"], &got["id"]), (&json!("message"), &next["id"]), "{got}");
    // And Alice's id is still hers.
    let resend = alice_0.request(send_with_id(bob, id, "from Alice", "a2")).await;
    assert_eq!(ack_fields(&resend), ack_fields(&ack), "{resend}");
}
