//! Hardening (issue 7): every limit answers with its contract error or close
//! code, and while one user runs into it another user on the same gateway
//! is served as usual (their send is acked and delivered, both ways).
//!
//! Limits are set low through the gateway's environment so each test hits
//! them with a handful of events. Waits have timeouts that only guard
//! against hangs; no assertion depends on how fast something happened,
//! except where a rate limit is the subject (there the sends are pipelined,
//! so a whole burst arrives far within one refill interval).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::harness::{self, now_secs, Client, ConnectOptions, Stack, StackOptions, DEFAULT_TIMEOUT};

/// One gateway, no persister, `env` on top of the defaults.
fn one_gateway(env: &[(&str, &str)]) -> StackOptions {
    StackOptions {
        gateways: 1,
        persister: false,
        env: harness::env(env),
        ..StackOptions::default()
    }
}

/// Two users who have nothing to do with the abuse under test, connected
/// to the same gateway. `still_served` proves the node serves them.
struct Bystanders {
    bob: Client,
    carol: Client,
    bob_id: Uuid,
    carol_id: Uuid,
    rounds: usize,
}

impl Bystanders {
    async fn connect(stack: &Stack, gw: usize) -> Bystanders {
        let (bob_id, carol_id) = (harness::user(), harness::user());
        Bystanders {
            bob: stack.connect(gw, bob_id).await,
            carol: stack.connect(gw, carol_id).await,
            bob_id,
            carol_id,
            rounds: 0,
        }
    }

    /// Bob messages Carol and Carol answers: each send is acked and the
    /// other side receives exactly that message.
    async fn still_served(&mut self, when: &str) {
        self.rounds += 1;
        let body = format!("bystander round {} ({when})", self.rounds);
        exchange(&mut self.bob, &mut self.carol, self.carol_id, &body, when).await;
        exchange(&mut self.carol, &mut self.bob, self.bob_id, &body, when).await;
    }
}

/// `sender` messages `to` (whose connection is `receiver`): acked, and
/// received as sent.
async fn exchange(sender: &mut Client, receiver: &mut Client, to: Uuid, body: &str, when: &str) {
    let ack = sender.send_message_to(to, body).await;
    let got = receiver.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], ack["id"], "{when}: got {got}, ack {ack}");
    assert_eq!(got["body"], json!(body), "{when}: {got}");
}

/// A `send` to `to` with an explicit id and ref.
fn send_event(to: Uuid, body: &str, id: Uuid, reference: &str) -> Value {
    json!({ "type": "send", "to": to.to_string(), "body": body, "id": id.to_string(), "ref": reference })
}

/// The reply (any type) that echoes `reference`.
async fn reply_to(client: &mut Client, reference: &str) -> Value {
    let wanted = json!(reference);
    client
        .wait_for(&format!("the reply to {reference}"), DEFAULT_TIMEOUT, |e| {
            e["ref"] == wanted
        })
        .await
}

fn assert_error(reply: &Value, code: &str, reference: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["ref"], reference, "{reply}");
    assert!(reply["message"].is_string(), "{reply}");
}

/// The pause between the attempts of a loop that waits for something (a
/// limit to recover, a metric to move); fails the test after its guard.
struct Retry {
    what: &'static str,
    guard: Duration,
    deadline: Instant,
}

impl Retry {
    fn new(what: &'static str, guard: Duration) -> Retry {
        Retry {
            what,
            guard,
            deadline: Instant::now() + guard,
        }
    }

    async fn pause(&self) {
        assert!(
            Instant::now() < self.deadline,
            "{}: not within {:?}",
            self.what,
            self.guard
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sends_over_the_burst_get_rate_limited_then_recover_while_others_send() {
    const BURST: usize = 5;
    let stack = Stack::start(one_gateway(&[("GATEWAY_SEND_RATE", "1"), ("GATEWAY_SEND_BURST", "5")])).await;
    let (alice, dave) = (harness::user(), harness::user());
    let mut flooder = stack.connect(0, alice).await;
    let mut recipient = stack.connect(0, dave).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    // All frames go out before the first reply is read: at one token per
    // second, the bucket cannot refill the whole excess meanwhile.
    let ids: Vec<Uuid> = (0..BURST + 10).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        flooder
            .send_json(send_event(dave, &format!("m{i}"), *id, &format!("s{i}")))
            .await;
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for (i, id) in ids.iter().enumerate() {
        let reference = format!("s{i}");
        let reply = reply_to(&mut flooder, &reference).await;
        if reply["type"] == "ack" {
            assert_eq!(reply["id"], json!(id.to_string()), "{reply}");
            acked.push(reply);
        } else {
            assert_error(&reply, "rate_limited", &reference);
            refused.push(i);
        }
    }
    let first_refused = *refused.first().expect("no send of the flood was rate limited");
    assert!(
        first_refused >= BURST,
        "send #{first_refused} was refused within the burst of {BURST}"
    );

    others.still_served("while alice is rate limited").await;

    // The bucket refills: the first refused send, resent with its id, is
    // accepted; nothing refused was accepted meanwhile (its seq follows the
    // acked ones directly).
    let resend = send_event(dave, &format!("m{first_refused}"), ids[first_refused], "retry");
    let retry = Retry::new("a refused send accepted on retry", Duration::from_secs(10));
    let recovered = loop {
        flooder.send_json(resend.clone()).await;
        let reply = reply_to(&mut flooder, "retry").await;
        if reply["type"] == "ack" {
            break reply;
        }
        assert_error(&reply, "rate_limited", "retry");
        retry.pause().await;
    };
    assert_eq!(recovered["seq"], json!(acked.len() + 1), "{recovered}");

    // Dave got exactly the accepted messages, in order.
    let got = recipient.expect_n("message", acked.len() + 1, DEFAULT_TIMEOUT).await;
    let got_ids: Vec<&Value> = got.iter().map(|m| &m["id"]).collect();
    let want_ids: Vec<&Value> = acked.iter().chain([&recovered]).map(|a| &a["id"]).collect();
    assert_eq!(got_ids, want_ids);
    others.still_served("after alice recovered").await;
}

#[tokio::test]
async fn joins_over_the_burst_get_rate_limited_then_recover_while_others_join() {
    const BURST: usize = 3;
    let stack = Stack::start(one_gateway(&[("GATEWAY_JOIN_RATE", "1"), ("GATEWAY_JOIN_BURST", "3")])).await;
    let api = stack.http(0);
    let owner = harness::user();
    let mut groups = Vec::new();
    for i in 0..BURST + 5 {
        let (status, body) = api.create_chat(owner, &format!("public {i}"), "public", &[]).await;
        assert_eq!(status, 201, "{body}");
        groups.push(harness::canonical_uuid(&body["id"], "chat id"));
    }
    let alice = harness::user();
    let mut joiner = stack.connect(0, alice).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    for (i, chat) in groups.iter().enumerate() {
        joiner
            .send_json(json!({ "type": "join", "chat": chat.to_string(), "ref": format!("j{i}") }))
            .await;
    }
    // A join that passes is answered by `joined` (over the bus, without a
    // ref); a refused one by an `error` with its ref.
    let mut refused = Vec::new();
    for (i, chat) in groups.iter().enumerate() {
        let (reference, chat_text, me) = (
            json!(format!("j{i}")),
            json!(chat.to_string()),
            json!(alice.to_string()),
        );
        let reply = joiner
            .wait_for(&format!("the answer to join #{i}"), DEFAULT_TIMEOUT, |e| {
                e["ref"] == reference || (e["type"] == "joined" && e["chat"] == chat_text && e["user"] == me)
            })
            .await;
        if reply["type"] == "error" {
            assert_error(&reply, "rate_limited", &format!("j{i}"));
            refused.push(i);
        }
    }
    let first_refused = *refused.first().expect("no join of the burst was rate limited");
    assert!(
        first_refused >= BURST,
        "join #{first_refused} was refused within the burst"
    );

    // Bob joins and posts in one of the same groups, and the DMs flow.
    let chat = groups[0];
    let joined = others.bob.join(chat).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let ack = others.bob.send_to_chat(chat, "bob is in").await;
    let seen = joiner
        .wait_for("bob's group message", DEFAULT_TIMEOUT, |e| {
            e["type"] == "message" && e["id"] == ack["id"]
        })
        .await;
    assert_eq!(seen["body"], "bob is in");
    others.still_served("while alice's joins are rate limited").await;

    let late = groups[first_refused];
    let retry = Retry::new("a refused join accepted on retry", Duration::from_secs(10));
    let answer = loop {
        let answer = joiner.join(late).await;
        if answer["type"] == "joined" {
            break answer;
        }
        assert_eq!(answer["code"], "rate_limited", "{answer}");
        retry.pause().await;
    };
    assert_eq!(answer["user"], json!(alice.to_string()), "{answer}");
}

#[tokio::test]
async fn rest_calls_over_the_burst_get_429_rate_limited_then_recover_while_others_call() {
    const BURST: usize = 5;
    let stack = Stack::start(one_gateway(&[("GATEWAY_REST_RATE", "1"), ("GATEWAY_REST_BURST", "5")])).await;
    let api = stack.http(0);
    let alice = harness::user();
    let mut others = Bystanders::connect(&stack, 0).await;

    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..BURST + 10 {
        let (status, body) = api.list_chats(alice).await;
        statuses.push(status);
        if status == 429 && refusal.is_none() {
            refusal = Some(body);
        }
    }
    assert!(statuses[..BURST].iter().all(|s| *s == 200), "{statuses:?}");
    let refusal = refusal.unwrap_or_else(|| panic!("no REST call was rate limited: {statuses:?}"));
    assert_eq!(refusal["code"], "rate_limited", "{refusal}");
    assert!(refusal["message"].is_string(), "{refusal}");
    // Every kind of call is counted: a refused POST creates nothing.
    let (status, body) = api.create_chat(alice, "refused", "public", &[]).await;
    assert_eq!((status, &body["code"]), (429, &json!("rate_limited")), "{body}");

    let (status, body) = api.list_chats(others.bob_id).await;
    assert_eq!(status, 200, "bob's own REST call: {body}");
    others.still_served("while alice's REST calls are rate limited").await;

    let retry = Retry::new("a REST call accepted again", Duration::from_secs(10));
    let chats = loop {
        let (status, body) = api.list_chats(alice).await;
        if status == 200 {
            break body;
        }
        assert_eq!((status, &body["code"]), (429, &json!("rate_limited")), "{body}");
        retry.pause().await;
    };
    assert_eq!(chats, json!([]), "the refused POST created a chat");
}

#[tokio::test]
async fn connections_over_the_per_user_limit_get_429_at_the_handshake_and_others_still_connect() {
    let stack = Stack::start(one_gateway(&[("GATEWAY_MAX_CONNS_PER_USER", "2")])).await;
    let alice = harness::user();
    let token = stack.token(alice);
    let mut first = stack.connect(0, alice).await;
    let second = stack.connect(0, alice).await;
    assert_eq!(stack.try_connect_raw(0, Some(&token)).await.err(), Some(429));
    assert_eq!(stack.try_connect_query(0, Some(&token)).await.err(), Some(429));

    // Others connect (Bob twice), and alice's open connections are fine.
    let mut others = Bystanders::connect(&stack, 0).await;
    let mut bob_again = stack.connect(0, others.bob_id).await;
    bob_again.ping().await;
    others.still_served("while alice is at her connection limit").await;
    first.ping().await;

    // A closed connection frees its slot.
    second.close().await;
    let retry = Retry::new("a connection after one closed", DEFAULT_TIMEOUT);
    let mut third = loop {
        match stack.try_connect_raw(0, Some(&token)).await {
            Ok(client) => break client,
            Err(status) => assert_eq!(status, 429),
        }
        retry.pause().await;
    };
    third.ping().await;
}

#[tokio::test]
async fn connections_over_the_per_node_limit_get_503_at_the_handshake() {
    let stack = Stack::start(one_gateway(&[("GATEWAY_MAX_CONNS", "3")])).await;
    let mut others = Bystanders::connect(&stack, 0).await;
    let alice = harness::user();
    let alice_conn = stack.connect(0, alice).await;

    let dave = harness::user();
    assert_eq!(
        stack.try_connect_raw(0, Some(&stack.token(dave))).await.err(),
        Some(503)
    );
    assert_eq!(
        stack.try_connect_raw(0, Some(&stack.token(alice))).await.err(),
        Some(503)
    );
    // The node is full of WebSockets, not out of service.
    let (status, body) = stack.http(0).list_chats(dave).await;
    assert_eq!(status, 200, "{body}");
    others.still_served("while the node is full").await;

    alice_conn.close().await;
    let retry = Retry::new("a connection after one closed", DEFAULT_TIMEOUT);
    let mut dave_conn = loop {
        match stack.try_connect_raw(0, Some(&stack.token(dave))).await {
            Ok(client) => break client,
            Err(status) => assert_eq!(status, 503),
        }
        retry.pause().await;
    };
    dave_conn.ping().await;
}

#[tokio::test]
async fn a_body_over_the_configured_limit_gets_too_large_and_the_connection_stays() {
    const LIMIT: usize = 64;
    let stack = Stack::start(one_gateway(&[("CHAT_MAX_BODY_BYTES", "64")])).await;
    let (alice, dave) = (harness::user(), harness::user());
    let mut client = stack.connect(0, alice).await;
    let mut recipient = stack.connect(0, dave).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    // The limit is in bytes: 33 two-byte characters are 66 bytes.
    for (i, body) in ["x".repeat(LIMIT + 1), "é".repeat(LIMIT / 2 + 1)].iter().enumerate() {
        let reference = format!("big{i}");
        let reply = client.request(send_event(dave, body, Uuid::new_v4(), &reference)).await;
        assert_error(&reply, "too_large", &reference);
    }
    others.still_served("after alice's oversize bodies").await;

    let at_limit = "é".repeat(LIMIT / 2);
    let ack = client.send_message_to(dave, &at_limit).await;
    let got = recipient.next_event(DEFAULT_TIMEOUT).await;
    assert_eq!((&got["id"], &got["body"]), (&ack["id"], &json!(at_limit)), "{got}");
}

#[tokio::test]
async fn a_frame_over_the_configured_limit_closes_with_1009_and_others_carry_on() {
    const FRAME: usize = 1024;
    let stack = Stack::start(one_gateway(&[("GATEWAY_MAX_FRAME_BYTES", "1024")])).await;
    let (alice, dave) = (harness::user(), harness::user());
    let mut client = stack.connect(0, alice).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    // Under the frame limit (and the default body limit): accepted.
    let ack = client.send_message_to(dave, &"a".repeat(FRAME - 200)).await;
    assert_eq!(ack["type"], "ack");
    // Over the frame limit, though the body is within the body limit.
    client
        .send_json(json!({ "type": "send", "to": dave.to_string(), "body": "a".repeat(2 * FRAME) }))
        .await;
    let closed = client.expect("__close", DEFAULT_TIMEOUT).await;
    assert_eq!(closed["code"], 1009, "{closed}");

    others.still_served("after alice's oversize frame").await;
    stack.connect(0, alice).await.ping().await;
}

/// `user` on gateway 0 with a 4 KiB receive buffer: when it stops reading,
/// the gateway's writes to it back up within a few frames.
async fn connect_with_a_small_buffer(stack: &Stack, user: Uuid) -> Client {
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut client = stack
        .try_connect_options(0, Some(&stack.token(user)), &options)
        .await
        .expect("upgrade");
    client.user = Some(user);
    client
}

/// A client that stops reading while someone sends it large messages: its
/// outgoing queue (8 frames here) fills once the socket buffers are full,
/// and the gateway closes it with 1008, even though it reads nothing at all.
/// What the node holds for it is bounded by the queue (frames) plus the
/// WebSocket write buffer and the kernel's socket buffers.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_with_1008_and_loses_nothing_from_history() {
    const BODY: usize = 4000;
    const BATCH: usize = 16;
    const MAX_MESSAGES: usize = 4000;
    let stack = Stack::start(StackOptions {
        persister: true,
        ..one_gateway(&[
            ("GATEWAY_OUTBOUND_QUEUE", "8"),
            ("GATEWAY_SEND_RATE", "100000"),
            ("GATEWAY_SEND_BURST", "100000"),
        ])
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut slow = connect_with_a_small_buffer(&stack, alice).await;
    let mut sender = stack.connect(0, bob).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    // Alice reads nothing from here on. Bob sends until the gateway has
    // closed her connection for overflow (its metrics say so).
    let mut acks = Vec::new();
    let mut batch_no = 0;
    while stack.metric(0, "gateway_closes_total", "code=\"1008\"").await < 1.0 {
        if acks.len() >= MAX_MESSAGES {
            let overflows = stack.metric(0, "gateway_slow_reader_closes_total", "").await;
            panic!(
                "no 1008 close after {} messages to a client that reads nothing \
                 ({overflows} overflows of its queue counted)",
                acks.len()
            );
        }
        for i in 0..BATCH {
            let body = format!("{batch_no}.{i} {}", "x".repeat(BODY));
            sender
                .send_json(json!({ "type": "send", "to": alice.to_string(), "body": body }))
                .await;
        }
        acks.extend(sender.expect_n("ack", BATCH, DEFAULT_TIMEOUT).await);
        batch_no += 1;
    }
    others.still_served("after alice's queue overflowed").await;
    assert_eq!(
        stack.metric(0, "gateway_slow_reader_closes_total", "").await,
        1.0,
        "one connection closed for overflow, however many frames found its queue full"
    );

    // Now she reads: what fitted in the buffers, in order, then the close.
    let mut received = Vec::new();
    let closed = loop {
        let event = slow.next_event(Duration::from_secs(30)).await;
        match event["type"].as_str() {
            Some("message") => received.push(event["id"].clone()),
            Some("__close") => break event,
            _ => panic!("unexpected {event}"),
        }
    };
    assert_eq!(closed["code"], 1008, "{closed}");
    assert!(
        received.len() < acks.len(),
        "no message was left out of the live stream"
    );
    let sent: Vec<Value> = acks.iter().map(|a| a["id"].clone()).collect();
    assert_eq!(
        received,
        sent[..received.len()],
        "live delivery is a prefix of what was sent"
    );
    println!(
        "slow reader: {} messages of {BODY} bytes sent, {} delivered live before the 1008 close",
        sent.len(),
        received.len()
    );

    // Nothing is lost: history has every acked message, in order.
    let chat = harness::private_chat(alice, bob);
    let history = stack
        .wait_for_history(alice, chat, sent.len(), Duration::from_secs(30))
        .await;
    let stored: Vec<Value> = history.iter().map(|m| m["id"].clone()).collect();
    assert_eq!(stored, sent);
}

/// A client that stops reading while its own replies back up: the session
/// is in the middle of writing one (a `pong` as long as the `ping`'s `ref`)
/// when its queue overflows, and closes with 1008 then, as a stalled write
/// of the queue does, rather than waiting out the write-stall bound (the
/// ping interval and timeout, 40 s here) and dropping it silently.
#[tokio::test]
async fn a_client_whose_replies_back_up_is_closed_with_1008_when_its_queue_overflows() {
    const REF: usize = 60_000;
    const QUEUE: usize = 8;
    let stack = Stack::start(one_gateway(&[
        ("GATEWAY_OUTBOUND_QUEUE", &QUEUE.to_string()),
        ("GATEWAY_PING_INTERVAL_SECS", "30"),
        ("GATEWAY_PING_TIMEOUT_SECS", "10"),
    ]))
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = connect_with_a_small_buffer(&stack, alice).await;
    let mut sender = stack.connect(0, bob).await;
    let mut others = Bystanders::connect(&stack, 0).await;

    // Alice pings and reads nothing, until the gateway stops taking her
    // pings: the socket buffers are full and it is stuck writing a pong.
    let handled = async || stack.metric(0, "gateway_events_in_total", "type=\"ping\"").await;
    let mut sent = 0usize;
    loop {
        for _ in 0..10 {
            let reference = format!("{sent} {}", "r".repeat(REF));
            alice_ws.send_json(json!({ "type": "ping", "ref": reference })).await;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Stuck, not slow: no ping taken for two seconds in a row.
        let before = handled().await;
        if before < sent as f64 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if handled().await == before {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if handled().await == before {
                    break;
                }
            }
        }
        assert!(
            sent < 400,
            "the gateway took all {sent} pings of {REF} bytes: no write stalled"
        );
    }
    println!("the gateway stopped taking pings after {} of {sent}", handled().await);

    // Bob's messages to her overflow her queue while the pong is stuck.
    for i in 0..2 * QUEUE {
        let ack = sender.send_message_to(alice, &format!("while stuck {i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let overflowed = Instant::now();
    stack
        .eventually("a 1008 close", Duration::from_secs(10), async || {
            (stack.metric(0, "gateway_closes_total", "code=\"1008\"").await >= 1.0).then_some(())
        })
        .await;
    println!("closed 1008 {:?} after the overflow", overflowed.elapsed());
    others.still_served("after alice's replies backed up").await;

    // She reads again: the pongs that were written, then the close.
    let closed = loop {
        let event = alice_ws.next_event(DEFAULT_TIMEOUT).await;
        match event["type"].as_str() {
            Some("pong") | Some("message") => {}
            Some("__close") => break event,
            _ => panic!("unexpected {event}"),
        }
    };
    assert_eq!(closed["code"], 1008, "{closed}");
}

/// A client behind on its messages is still heard: with hundreds of frames
/// queued for it, its `ping` is answered once the socket buffers and at most
/// one write batch are through, not after the whole backlog. (Before, the
/// session read the client only when its queue was empty, so a reader a
/// little slower than its chats had its sends and pongs wait until it was
/// dropped as silent.)
#[tokio::test]
async fn a_client_with_a_backlog_is_answered_before_its_backlog_is_through() {
    const BODY: usize = 4000;
    const BACKLOG: usize = 2000;
    let stack = Stack::start(one_gateway(&[
        // Room for the whole backlog: nothing here may overflow. It is
        // larger than the socket buffers can take (up to 4 MiB with the
        // kernel's default tcp_wmem), so most of it waits in the queue.
        ("GATEWAY_OUTBOUND_QUEUE", "4096"),
        ("GATEWAY_SEND_RATE", "100000"),
        ("GATEWAY_SEND_BURST", "100000"),
    ]))
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = connect_with_a_small_buffer(&stack, alice).await;
    let mut sender = stack.connect(0, bob).await;

    // Alice reads nothing while Bob's messages pile up for her: 8 MB, some
    // in the socket buffers, the rest in her queue on the gateway.
    for i in 0..BACKLOG {
        let body = format!("{i} {}", "x".repeat(BODY));
        sender
            .send_json(json!({ "type": "send", "to": alice.to_string(), "body": body }))
            .await;
    }
    let acks = sender.expect_n("ack", BACKLOG, DEFAULT_TIMEOUT).await;

    // Now she pings and reads on.
    alice_ws.send_json(json!({ "type": "ping", "ref": "behind" })).await;
    let mut before_pong = Vec::new();
    let mut after_pong = Vec::new();
    let mut ponged = false;
    while before_pong.len() + after_pong.len() < BACKLOG {
        let event = alice_ws.next_event(DEFAULT_TIMEOUT).await;
        match event["type"].as_str() {
            Some("message") if ponged => after_pong.push(event["id"].clone()),
            Some("message") => before_pong.push(event["id"].clone()),
            Some("pong") if event["ref"] == "behind" => ponged = true,
            _ => panic!("unexpected {event}"),
        }
    }
    println!(
        "backlog of {BACKLOG}: pong after {} messages, {} after it",
        before_pong.len(),
        after_pong.len()
    );
    assert!(ponged, "no pong after all {BACKLOG} messages");
    assert!(
        !after_pong.is_empty(),
        "the pong came only after the whole backlog of {BACKLOG} messages"
    );
    // The answer jumped the queue; the messages kept their order, all of them.
    let received: Vec<Value> = before_pong.into_iter().chain(after_pong).collect();
    let sent: Vec<Value> = acks.iter().map(|a| a["id"].clone()).collect();
    assert_eq!(received, sent);
}

#[tokio::test]
async fn an_expired_token_closes_with_4001_by_timer_and_auth_keeps_a_connection_without_losing_messages() {
    let stack = Stack::start(one_gateway(&[])).await;
    let (alice, dave, bob) = (harness::user(), harness::user(), harness::user());
    let mut others = Bystanders::connect(&stack, 0).await;
    let mut sender = stack.connect(0, bob).await;

    // Alice's token lasts 2 s and she sends nothing: only a timer can close her.
    let mut left_alone = stack
        .try_connect_raw(0, Some(&stack.token_expiring_in(alice, 2)))
        .await
        .expect("upgrade");
    // Dave's lasts 3 s; he renews it while messages are flowing to him.
    let dave_exp = now_secs() + 3;
    let mut renewed = stack
        .try_connect_raw(0, Some(&harness::mint_token(&stack.secret, dave, dave_exp)))
        .await
        .expect("upgrade");

    let mut acks = Vec::new();
    for i in 0..3 {
        acks.push(sender.send_message_to(dave, &format!("before auth {i}")).await);
    }
    let reply = renewed.auth(&stack.token(dave)).await;
    assert_eq!(reply["type"], "authed", "{reply}");
    // Keep sending across the old expiry.
    let mut i = 0;
    while now_secs() <= dave_exp {
        acks.push(sender.send_message_to(dave, &format!("after auth {i}")).await);
        i += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    acks.push(sender.send_message_to(dave, "past the old expiry").await);

    let closed = left_alone.expect("__close", Duration::from_secs(10)).await;
    assert_eq!(closed["code"], 4001, "{closed}");

    let got = renewed.expect_n("message", acks.len(), DEFAULT_TIMEOUT).await;
    let got_ids: Vec<&Value> = got.iter().map(|m| &m["id"]).collect();
    let want_ids: Vec<&Value> = acks.iter().map(|a| &a["id"]).collect();
    assert_eq!(got_ids, want_ids, "the renewed connection missed or reordered messages");
    renewed.ping().await;
    renewed.expect_none("__close", Duration::from_millis(100)).await;
    others.still_served("after alice's token expired").await;
}

/// base64url without padding (JWT segments).
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn tokens_with_alg_none_or_another_algorithm_than_hs256_get_401() {
    let stack = Stack::start(one_gateway(&[])).await;
    let mut others = Bystanders::connect(&stack, 0).await;
    let alice = harness::user();
    let claims = json!({ "sub": alice.to_string(), "exp": now_secs() + 3600 });
    let payload = b64url(claims.to_string().as_bytes());
    let signed = |alg| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(stack.secret.as_bytes()),
        )
        .expect("signing")
    };
    let hs256 = signed(jsonwebtoken::Algorithm::HS256);
    let hs256_signature = hs256.rsplit('.').next().expect("a signature").to_string();
    let refused = [
        ("HS384 with the right secret", signed(jsonwebtoken::Algorithm::HS384)),
        ("HS512 with the right secret", signed(jsonwebtoken::Algorithm::HS512)),
        (
            "alg none",
            format!("{}.{payload}.", b64url(br#"{"alg":"none","typ":"JWT"}"#)),
        ),
        (
            "alg None",
            format!("{}.{payload}.", b64url(br#"{"alg":"None","typ":"JWT"}"#)),
        ),
        (
            "alg none with a valid HS256 signature",
            format!(
                "{}.{payload}.{hs256_signature}",
                b64url(br#"{"alg":"none","typ":"JWT"}"#)
            ),
        ),
        (
            "HS256 without a signature",
            format!("{}.{payload}.", b64url(br#"{"alg":"HS256","typ":"JWT"}"#)),
        ),
    ];
    let api = stack.http(0);
    for (what, token) in &refused {
        assert_eq!(
            stack.try_connect_raw(0, Some(token)).await.err(),
            Some(401),
            "{what} (header)"
        );
        assert_eq!(
            stack.try_connect_query(0, Some(token)).await.err(),
            Some(401),
            "{what} (query)"
        );
        let (status, body) = api.request(reqwest::Method::GET, "/v1/chats", Some(token), None).await;
        assert_eq!((status, &body["code"]), (401, &json!("unauthorized")), "{what}: {body}");
    }
    // The same claims signed with HS256 are accepted.
    let mut client = stack
        .try_connect_raw(0, Some(&hs256))
        .await
        .expect("an HS256 token upgrades");
    client.ping().await;
    others.still_served("after the forged tokens").await;
}

#[tokio::test]
async fn origins_off_the_allowlist_get_403_and_allowed_or_absent_origins_upgrade() {
    // Gateway 0 has no allowlist (development); gateway 1 has one.
    let mut stack = Stack::start(one_gateway(&[])).await;
    let gw = stack
        .add_gateway(&[(
            "GATEWAY_ALLOWED_ORIGINS",
            "https://chat.example.com, https://app.example.com/",
        )])
        .await;
    let token = stack.token(harness::user());
    let with_origin = |origin: Option<&str>| ConnectOptions {
        origin: origin.map(str::to_string),
        ..ConnectOptions::default()
    };
    let status = |result: Result<Client, u16>| result.map(|_| 101).unwrap_or_else(|s| s);
    let cases = [
        (Some("https://evil.example.com"), 403),
        (Some("null"), 403),
        (Some("http://chat.example.com"), 403),
        (Some("https://chat.example.com.evil.example"), 403),
        (Some("https://chat.example.com"), 101),
        (Some("https://app.example.com"), 101),
        (None, 101),
    ];
    let mut others = Bystanders::connect(&stack, gw).await;
    for (origin, expected) in cases {
        let got = status(stack.try_connect_options(gw, Some(&token), &with_origin(origin)).await);
        assert_eq!(got, expected, "Origin {origin:?} on the gateway with an allowlist");
    }
    others.still_served("after refused origins").await;
    let foreign = with_origin(Some("https://evil.example.com"));
    assert_eq!(
        status(stack.try_connect_options(0, Some(&token), &foreign).await),
        101,
        "without an allowlist any Origin upgrades"
    );
}

/// The upgrade request a browser would send, by hand.
fn upgrade_request(addr: SocketAddr, token: &str) -> String {
    format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n"
    )
}

/// A raw TCP connection that completed the WebSocket handshake; the
/// response was read up to its blank line, and nothing after it.
async fn raw_websocket(addr: SocketAddr, token: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connecting");
    stream
        .write_all(upgrade_request(addr, token).as_bytes())
        .await
        .expect("writing the upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(DEFAULT_TIMEOUT, stream.read_u8())
            .await
            .expect("the upgrade response took too long")
            .expect("reading the upgrade response");
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream
}

/// The opcodes of the server frames in `bytes` (unmasked, as servers send).
fn opcodes(mut bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let (len, header) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (
                u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        out.push(bytes[0] & 0x0f);
        bytes = &bytes[(header + len).min(bytes.len())..];
    }
    out
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_dropped() {
    let stack = Stack::start(one_gateway(&[
        ("GATEWAY_PING_INTERVAL_SECS", "1"),
        ("GATEWAY_PING_TIMEOUT_SECS", "1"),
    ]))
    .await;
    let mut others = Bystanders::connect(&stack, 0).await;
    // Neither reads nor writes after the handshake: a half-open connection
    // looks the same from the server.
    let mut silent = raw_websocket(stack.gateways[0].addr, &stack.token(harness::user())).await;

    // The bystanders keep talking (and their clients answer pings) while
    // the gateway gives up on the silent one.
    let retry = Retry::new("the silent connection dropped", Duration::from_secs(15));
    while stack.metric(0, "gateway_silent_drops_total", "").await < 1.0 {
        others.still_served("while a silent client is connected").await;
        retry.pause().await;
    }

    // What the server sent before it closed: pings, and then the end.
    let mut received = Vec::new();
    let ended = loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(DEFAULT_TIMEOUT, silent.read(&mut chunk)).await {
            Err(_) => panic!("the server dropped the connection but the socket is still open"),
            Ok(Ok(0)) => break "end of stream".to_string(),
            Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => break e.to_string(),
        }
    };
    let frames = opcodes(&received);
    assert!(
        frames.contains(&0x9),
        "no ping before the drop (frames {frames:?}, {ended})"
    );
    others.still_served("after the silent client was dropped").await;
}

/// The other half-open case: a client that keeps sending (pings here) but
/// never reads. Its replies back up until the gateway's writes stall; a
/// write stalled as long as a silent client may stay drops it. Each ping
/// carries a 4 KB `ref`, which the `pong` echoes, so the kernel's send
/// buffer (autotuned up to MiBs) fills after a few thousand.
#[tokio::test]
async fn a_client_that_sends_but_never_reads_is_dropped() {
    const BATCH: usize = 200;
    let stack = Stack::start(one_gateway(&[
        ("GATEWAY_PING_INTERVAL_SECS", "1"),
        ("GATEWAY_PING_TIMEOUT_SECS", "1"),
    ]))
    .await;
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut deaf = stack
        .try_connect_options(0, Some(&stack.token(harness::user())), &options)
        .await
        .expect("upgrade");
    let mut others = Bystanders::connect(&stack, 0).await;

    let retry = Retry::new("the deaf connection dropped", Duration::from_secs(30));
    let mut sent = 0;
    let ping = json!({ "type": "ping", "ref": "r".repeat(4096) });
    while stack.metric(0, "gateway_silent_drops_total", "").await < 1.0 {
        for _ in 0..BATCH {
            deaf.send_json(ping.clone()).await;
        }
        sent += BATCH;
        others.still_served("while a client sends without reading").await;
        retry.pause().await;
    }
    println!("deaf client: dropped after {sent} pings it did not read the answers to");
    others.still_served("after the deaf client was dropped").await;
}

#[tokio::test]
async fn a_handshake_trickled_byte_by_byte_is_cut_off_before_its_headers_end() {
    const SLOW_CLIENTS: usize = 10;
    let stack = Stack::start(one_gateway(&[("GATEWAY_HANDSHAKE_TIMEOUT_SECS", "1")])).await;
    let mut others = Bystanders::connect(&stack, 0).await;
    let addr = stack.gateways[0].addr;
    let request = upgrade_request(addr, &stack.token(harness::user()));

    // One byte every 300 ms: the whole request would take minutes.
    let trickle = |request: String| async move {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        for (sent, byte) in request.bytes().enumerate() {
            if stream.write_all(&[byte]).await.is_err() {
                return sent;
            }
            let mut buf = [0u8; 256];
            tokio::select! {
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return sent + 1,
                    Ok(_) => {} // an error response; the close follows
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
            }
        }
        request.len()
    };
    let slow: Vec<_> = (0..SLOW_CLIENTS)
        .map(|_| tokio::spawn(trickle(request.clone())))
        .collect();

    // Meanwhile the node serves others, new connections included.
    others.still_served("during slowloris handshakes").await;
    stack.connect(0, harness::user()).await.ping().await;

    let mut cut_at = Vec::new();
    for task in slow {
        let sent = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a trickled handshake was still open after 30 s")
            .expect("the trickle task");
        assert!(sent < request.len(), "the server waited for all {sent} header bytes");
        cut_at.push(sent);
    }
    println!("slowloris: cut off after {cut_at:?} of {} header bytes", request.len());
    others.still_served("after the slowloris handshakes").await;
}

#[tokio::test]
async fn the_token_never_appears_in_the_gateways_logs_even_at_trace() {
    let mut stack = Stack::start(one_gateway(&[("RUST_LOG", "trace")])).await;
    let (alice, bob) = (harness::user(), harness::user());
    let token = stack.token(alice);
    let mut bob_conn = stack.connect(0, bob).await;

    // The browser way: the token in the query string, on WebSocket and REST.
    let mut client = stack.try_connect_query(0, Some(&token)).await.expect("upgrade");
    let ack = client
        .request(json!({ "type": "send", "to": bob.to_string(), "body": "hi" }))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    bob_conn.expect("message", DEFAULT_TIMEOUT).await;
    let api = stack.http(0);
    let (status, body) = api
        .request(reqwest::Method::GET, &format!("/v1/chats?token={token}"), None, None)
        .await;
    assert_eq!(status, 200, "{body}");
    // Refusals, which are likelier to log what they refused.
    let wrong = stack.token_signed_with(alice, "another-secret-0123456789");
    assert_eq!(stack.try_connect_query(0, Some(&wrong)).await.err(), Some(401));
    let (status, _) = api
        .request(reqwest::Method::GET, &format!("/v1/chats?token={wrong}"), None, None)
        .await;
    assert_eq!(status, 401);
    // A token in events: `auth`, a refused `auth`, and a malformed frame.
    let fresh = harness::mint_token(&stack.secret, alice, now_secs() + 7200);
    assert_eq!(client.auth(&fresh).await["type"], "authed");
    assert_eq!(client.auth(&wrong).await["code"], "forbidden");
    client
        .send_text(&format!(r#"{{"type":"auth","token":"{fresh}","ref":"x""#))
        .await;
    assert_eq!(client.expect("error", DEFAULT_TIMEOUT).await["code"], "bad_request");
    client.close().await;

    // Stop the gateway so everything it wrote has been written.
    stack.gateways[0].terminate(Duration::from_secs(15)).await;
    let retry = Retry::new("the gateway's last log lines", DEFAULT_TIMEOUT);
    let logs = loop {
        let logs = stack.gateways[0].logs();
        if logs.contains("draining") {
            break logs;
        }
        retry.pause().await;
    };
    assert!(logs.contains(" TRACE "), "RUST_LOG=trace wrote no trace line:\n{logs}");
    // The harness keeps the last MiB of a process's output: all of it is here.
    assert!(
        logs.len() < 1 << 19,
        "{} bytes of logs: the start may be cut off",
        logs.len()
    );
    for (what, secret) in [("token", &token), ("refused token", &wrong), ("auth token", &fresh)] {
        let signature = secret.rsplit('.').next().expect("a signature");
        for needle in [secret.as_str(), signature] {
            assert!(
                !logs.contains(needle),
                "the {what} is in the gateway's logs:\n{}",
                logs.lines()
                    .filter(|l| l.contains(needle))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}

/// nginx's access log must not record the query string (`?token=`): no
/// `log_format` uses a variable that holds it, and every `access_log` names
/// one of those formats (nginx's default `combined` logs `$request`).
#[test]
fn nginx_access_logs_leave_out_the_query_string() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/nginx.conf");
    let conf = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // Directives without comments, each up to its `;`.
    let text: String = conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join(" ");
    let directives: Vec<&str> = text.split([';', '{', '}']).map(str::trim).collect();

    let mut formats = Vec::new();
    for d in directives.iter().filter(|d| d.starts_with("log_format ")) {
        let name = d.split_whitespace().nth(1).expect("a format name");
        for var in [
            "$request_uri",
            "$args",
            "$query_string",
            "$arg_",
            "$is_args",
            "$http_authorization",
        ] {
            assert!(!d.contains(var), "log_format {name} logs {var}: {d}");
        }
        // `$request` (the request line) but not `$request_method` and the like.
        let leaks_request_line = d
            .match_indices("$request")
            .any(|(i, m)| !d[i + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_'));
        assert!(!leaks_request_line, "log_format {name} logs $request: {d}");
        formats.push(name.to_string());
    }
    let access_logs: Vec<&&str> = directives.iter().filter(|d| d.starts_with("access_log ")).collect();
    assert!(
        !access_logs.is_empty(),
        "no access_log directive: nginx would use `combined`"
    );
    for d in access_logs {
        let words: Vec<&str> = d.split_whitespace().collect();
        let off = words.get(1) == Some(&"off");
        let format = words.get(2).map(|f| f.to_string());
        assert!(
            off || format.as_ref().is_some_and(|f| formats.contains(f)),
            "`{d}` does not use one of the checked formats {formats:?}"
        );
    }
}
