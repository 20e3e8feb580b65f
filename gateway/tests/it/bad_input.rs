//! What a client may get wrong (contract: error codes, frame limit) and the
//! MessagePack encoding: each bad event gets the right `error`, with its
//! `ref` when it had one, and the connection stays usable; a frame over the
//! limit closes the connection with 1009.

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::harness::{self, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// The default `GATEWAY_MAX_FRAME_BYTES`.
const MAX_FRAME: usize = 65536;
/// The default body limit (`CHAT_MAX_BODY_BYTES`).
const MAX_BODY: usize = 4096;

fn one_gateway() -> StackOptions {
    StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    }
}

/// Sends `frame` as a text frame; the reply must be an `error` with `code`
/// and, when given, `reference`; a ping afterwards must still get its pong.
async fn refused(client: &mut Client, what: &str, frame: &str, code: &str, reference: Option<&str>) {
    client.send_text(frame).await;
    let reply = client.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!(reply["type"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], code, "{what}: {reply}");
    assert!(reply["message"].is_string(), "{what}: an error has a message: {reply}");
    if let Some(reference) = reference {
        assert_eq!(reply["ref"], reference, "{what}: the ref is echoed: {reply}");
    }
    let pong = client.ping().await;
    assert_eq!(pong["type"], "pong", "{what}: the connection is still usable");
}

#[tokio::test]
async fn each_malformed_event_gets_bad_request_and_the_connection_stays_usable() {
    let stack = Stack::start(one_gateway()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut client = stack.connect(0, alice).await;
    let to = bob.to_string();
    let chat = Uuid::new_v4().to_string();

    let cases: Vec<(&str, String, Option<&str>)> = vec![
        ("invalid JSON", r#"{"type":"ping","ref":"r0""#.to_string(), None),
        ("not JSON at all", "hello".to_string(), None),
        ("a JSON array", "[1,2,3]".to_string(), None),
        ("no type", json!({ "ref": "r1", "body": "x" }).to_string(), Some("r1")),
        (
            "a type that is not a string",
            json!({ "type": 7, "ref": "r2" }).to_string(),
            Some("r2"),
        ),
        (
            "an unknown type",
            json!({ "type": "dance", "ref": "r3" }).to_string(),
            Some("r3"),
        ),
        (
            "send without body",
            json!({ "type": "send", "to": to, "ref": "r4" }).to_string(),
            Some("r4"),
        ),
        (
            "join without chat",
            json!({ "type": "join", "ref": "r5" }).to_string(),
            Some("r5"),
        ),
        (
            "auth without token",
            json!({ "type": "auth", "ref": "r6" }).to_string(),
            Some("r6"),
        ),
        (
            "a body that is a number",
            json!({ "type": "send", "to": to, "body": 42, "ref": "r7" }).to_string(),
            Some("r7"),
        ),
        (
            "a `to` that is a number",
            json!({ "type": "send", "to": 1, "body": "x", "ref": "r8" }).to_string(),
            Some("r8"),
        ),
        (
            "an id that is not a UUID",
            json!({ "type": "send", "to": to, "body": "x", "id": "message-1", "ref": "r9" }).to_string(),
            Some("r9"),
        ),
        (
            "a `to` that is not a UUID",
            json!({ "type": "send", "to": "bob", "body": "x", "ref": "r10" }).to_string(),
            Some("r10"),
        ),
        (
            "a chat that is not a UUID",
            json!({ "type": "join", "chat": "general", "ref": "r11" }).to_string(),
            Some("r11"),
        ),
        (
            "both `to` and `chat`",
            json!({ "type": "send", "to": to, "chat": chat, "body": "x", "ref": "r12" }).to_string(),
            Some("r12"),
        ),
        (
            "neither `to` nor `chat`",
            json!({ "type": "send", "body": "x", "ref": "r13" }).to_string(),
            Some("r13"),
        ),
        (
            "typing with both `to` and `chat`",
            json!({ "type": "typing", "to": to, "chat": chat, "ref": "r14" }).to_string(),
            Some("r14"),
        ),
    ];
    for (what, frame, reference) in cases {
        refused(&mut client, what, &frame, "bad_request", reference).await;
    }

    // Unknown fields are ignored, and the connection still sends.
    let reply = client
        .request(json!({ "type": "send", "to": to, "body": "fine", "colour": "blue" }))
        .await;
    assert_eq!(reply["type"], "ack", "{reply}");
}

#[tokio::test]
async fn a_body_over_4096_bytes_gets_too_large_and_one_at_the_limit_is_accepted() {
    let stack = Stack::start(one_gateway()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut client = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    let send = |body: String, reference: &str| {
        json!({ "type": "send", "to": bob.to_string(), "body": body, "ref": reference }).to_string()
    };

    refused(
        &mut client,
        "one byte over",
        &send("a".repeat(MAX_BODY + 1), "big"),
        "too_large",
        Some("big"),
    )
    .await;
    // The limit is in bytes: 2,049 two-byte characters are 4,098 bytes.
    refused(
        &mut client,
        "over in bytes",
        &send("é".repeat(MAX_BODY / 2 + 1), "wide"),
        "too_large",
        Some("wide"),
    )
    .await;
    // A frame well within the frame limit, with a body far over the body limit.
    refused(
        &mut client,
        "far over",
        &send("a".repeat(60_000), "huge"),
        "too_large",
        Some("huge"),
    )
    .await;

    let at_limit = "é".repeat(MAX_BODY / 2);
    let ack = client
        .request(json!({ "type": "send", "to": bob.to_string(), "body": at_limit }))
        .await;
    assert_eq!(ack["type"], "ack", "a body of exactly {MAX_BODY} bytes: {ack}");
    // Only that one reached Bob.
    let got = bob_0.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!(
        (&got["type"], &got["id"]),
        (&json!("message"), &ack["id"]),
        "{}",
        got["type"]
    );
    assert_eq!(got["body"], json!(at_limit));
}

#[tokio::test]
async fn text_with_a_nul_character_is_refused_because_postgresql_could_never_store_it() {
    let stack = Stack::start(one_gateway()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut client = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;

    let nul = json!({ "type": "send", "to": bob.to_string(), "body": "a\u{0}b", "ref": "nul" });
    refused(
        &mut client,
        "a NUL in a body",
        &nul.to_string(),
        "bad_request",
        Some("nul"),
    )
    .await;
    let ack = client
        .request(json!({ "type": "send", "to": bob.to_string(), "body": "a b" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Only the storable one was accepted and reached Bob.
    let got = bob_0.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!((&got["type"], &got["id"]), (&json!("message"), &ack["id"]), "{got}");

    let token = stack.token(alice);
    let (status, body) = stack
        .http(0)
        .request(
            reqwest::Method::POST,
            "/v1/chats",
            Some(&token),
            Some(json!({ "title": "a\u{0}b", "visibility": "public" })),
        )
        .await;
    assert_eq!(status, 400, "a NUL in a chat's title: {body}");
    assert_eq!(body["code"], "bad_request", "{body}");
}

#[tokio::test]
async fn a_frame_over_the_frame_limit_closes_the_connection_with_1009() {
    let stack = Stack::start(one_gateway()).await;
    let user = harness::user();

    let mut text = stack.connect(0, user).await;
    text.ping().await;
    let oversize = json!({ "type": "send", "to": user.to_string(), "body": "a".repeat(MAX_FRAME + 10) });
    text.send_json(oversize).await;
    let closed = text.expect("__close", DEFAULT_TIMEOUT).await;
    assert_eq!(closed["code"], 1009, "{closed}");

    let mut binary = stack.connect(0, user).await;
    binary.send_binary(vec![0u8; MAX_FRAME + 1]).await;
    let closed = binary.expect("__close", DEFAULT_TIMEOUT).await;
    assert_eq!(closed["code"], 1009, "{closed}");

    // The node is fine and other connections carry on.
    let mut again = stack.connect(0, user).await;
    again.ping().await;
}

#[tokio::test]
async fn a_frame_just_under_the_limit_is_read_whole_and_answered() {
    // Far larger than the 2 KiB the gateway reads per attempt.
    let stack = Stack::start(one_gateway()).await;
    let mut client = stack.connect(0, harness::user()).await;
    let padding = " ".repeat(MAX_FRAME - 100);
    client
        .send_text(&format!(r#"{{"type":"ping",{padding}"ref":"big"}}"#))
        .await;
    let pong = client.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(pong["ref"], "big", "{pong}");
}

#[tokio::test]
async fn a_plain_get_of_the_websocket_endpoint_is_a_bad_request() {
    let stack = Stack::start(one_gateway()).await;
    let token = stack.token(harness::user());
    let (status, body) = stack
        .http(0)
        .request(reqwest::Method::GET, "/v1/ws", Some(&token), None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "bad_request", "{body}");
    assert!(
        body["message"].as_str().unwrap_or("").contains("WebSocket upgrade"),
        "{body}"
    );
}

/// The next frame, which must be binary MessagePack: a map with string keys.
async fn msgpack_frame(client: &mut Client, what: &str) -> Value {
    let frame = client.next_frame(DEFAULT_TIMEOUT).await;
    let Message::Binary(bytes) = frame else {
        panic!("{what}: expected a binary frame, got {frame:?}");
    };
    // A map (fixmap, map16 or map32); decoding into JSON values fails on
    // keys that are not strings.
    assert!(
        matches!(bytes[0], 0x80..=0x8f | 0xde | 0xdf),
        "{what}: not a MessagePack map: {bytes:?}"
    );
    rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{what}: not a map with string keys ({e}): {bytes:?}"))
}

#[tokio::test]
async fn a_client_whose_first_frame_is_messagepack_is_answered_in_messagepack() {
    let stack = Stack::start(one_gateway()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;

    alice_0.send_msgpack(&json!({ "type": "ping", "ref": "p1" })).await;
    let pong = msgpack_frame(&mut alice_0, "pong").await;
    assert_eq!(pong, json!({ "type": "pong", "ref": "p1" }));

    alice_0
        .send_msgpack(&json!({ "type": "send", "to": bob.to_string(), "body": "packed", "ref": "s1" }))
        .await;
    let ack = msgpack_frame(&mut alice_0, "ack").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["ref"], "s1", "{ack}");
    // Ids are strings, in their canonical text form.
    harness::canonical_uuid(&ack["id"], "ack.id");
    assert_eq!(
        harness::canonical_uuid(&ack["chat"], "ack.chat"),
        harness::private_chat(alice, bob)
    );
    assert!(ack["seq"].is_i64() && ack["ts"].is_i64(), "{ack}");

    // Bob has sent nothing yet: he is answered in JSON.
    let frame = bob_0.next_frame(DEFAULT_TIMEOUT).await;
    let Message::Text(text) = frame else {
        panic!("Bob sent nothing, so JSON is expected; got {frame:?}");
    };
    let message: Value = serde_json::from_str(text.as_str()).expect("JSON");
    assert_eq!(
        (&message["type"], &message["id"]),
        (&json!("message"), &ack["id"]),
        "{message}"
    );

    // The encoding is the first frame's: a later text frame still gets MessagePack.
    alice_0.send_json(json!({ "type": "ping", "ref": "p2" })).await;
    let pong = msgpack_frame(&mut alice_0, "pong to a text ping").await;
    assert_eq!(pong, json!({ "type": "pong", "ref": "p2" }));

    // Messages to a MessagePack client are MessagePack, with string ids.
    let reply = bob_0.send_message_to(alice, "back to you").await;
    let message = msgpack_frame(&mut alice_0, "message").await;
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["id"], reply["id"], "{message}");
    harness::canonical_uuid(&message["from"], "message.from");
    assert_eq!(message["to"], json!(alice.to_string()), "{message}");
    assert_eq!(message["body"], "back to you", "{message}");

    // Bad MessagePack gets bad_request, in MessagePack, and the connection lives.
    alice_0.send_binary(vec![0xc1, 0xff, 0x00]).await;
    let error = msgpack_frame(&mut alice_0, "error").await;
    assert_eq!(
        (&error["type"], &error["code"]),
        (&json!("error"), &json!("bad_request")),
        "{error}"
    );
    alice_0
        .send_msgpack(&json!({ "type": "send", "to": bob.to_string(), "body": 5, "ref": "s2" }))
        .await;
    let error = msgpack_frame(&mut alice_0, "error").await;
    assert_eq!(
        (&error["type"], &error["code"], &error["ref"]),
        (&json!("error"), &json!("bad_request"), &json!("s2")),
        "{error}"
    );
    alice_0.send_msgpack(&json!({ "type": "ping", "ref": "p3" })).await;
    let pong = msgpack_frame(&mut alice_0, "pong").await;
    assert_eq!(pong["ref"], "p3");
}

/// History's query (docs/api.md): a `limit` above 500 is 500, however large
/// the number; below 1 it is a bad request. A cursor that names no message
/// is a bad request too, but one that Redis could not look up may name a
/// message still in the queue: that is `unavailable` (503), so the client
/// retries instead of giving up its place.
#[tokio::test]
async fn history_treats_a_huge_limit_as_the_maximum_and_an_unreadable_cursor_as_unavailable() {
    const SENT: usize = 501;
    // A cache that holds every message (there is no persister), and room to
    // send them at once.
    let stack = Stack::start(StackOptions {
        env: harness::env(&[
            ("CHAT_CACHE_SIZE", "600"),
            ("GATEWAY_SEND_RATE", "100000"),
            ("GATEWAY_SEND_BURST", "100000"),
        ]),
        ..one_gateway()
    })
    .await;
    let api = stack.http(0);
    let alice = harness::user();
    let (status, created) = api.create_chat(alice, "history", "public", &[]).await;
    assert_eq!(status, 201, "{created}");
    let chat = harness::canonical_uuid(&created["id"], "the new chat's id");
    let mut client = stack.connect(0, alice).await;
    // No persister: the messages stay in the queue, and their cursors are
    // known only to Redis.
    for i in 0..SENT {
        client
            .send_json(json!({ "type": "send", "chat": chat.to_string(), "body": format!("message {i}") }))
            .await;
    }
    let acks = client.expect_n("ack", SENT, DEFAULT_TIMEOUT).await;
    let id = acks[SENT - 1]["id"].as_str().expect("the ack's id").to_string();

    for limit in ["501", "99999999999999999999"] {
        let (status, body) = api.history(alice, chat, &format!("limit={limit}")).await;
        assert_eq!(status, 200, "limit={limit}: {body}");
        assert_eq!(
            body["messages"].as_array().map(Vec::len),
            Some(500),
            "limit={limit}: the latest 500 of {SENT}"
        );
    }
    for limit in ["0", "-99999999999999999999", "ten"] {
        let (status, body) = api.history(alice, chat, &format!("limit={limit}")).await;
        assert_eq!(
            (status, &body["code"]),
            (400, &json!("bad_request")),
            "limit={limit}: {body}"
        );
    }

    let (status, body) = api.history(alice, chat, &format!("after={}", Uuid::now_v7())).await;
    assert_eq!(
        (status, &body["code"]),
        (400, &json!("bad_request")),
        "an unknown cursor: {body}"
    );
    let (status, body) = api.history(alice, chat, &format!("after={id}")).await;
    assert_eq!(status, 200, "the cursor of a message in the queue: {body}");

    // Redis cannot read the cursor's record (a wrong type stands in for a
    // timeout): PostgreSQL does not have the message yet either.
    let mut redis = stack.redis.connection().await;
    let _: () = redis::AsyncCommands::set(&mut redis, format!("msg:{id}"), "not a hash")
        .await
        .expect("SET");
    let (status, body) = api.history(alice, chat, &format!("after={id}")).await;
    assert_eq!(
        (status, &body["code"]),
        (503, &json!("unavailable")),
        "a cursor Redis could not look up: {body}"
    );
}
