//! Redis unavailable (contract: `unavailable`, `/readyz`): a gateway that
//! cannot reach Redis refuses sends with `unavailable`, keeps its
//! connections, and recovers by itself when Redis returns.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, Api, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// How long the cluster may take to recover once Redis is back.
const RECOVERY: Duration = Duration::from_secs(30);

/// A `send` with `id` to `address`: `("to", user)` or `("chat", group)`.
fn send((field, target): (&str, Uuid), id: Uuid, reference: &str) -> Value {
    let mut event = json!({ "type": "send", "body": format!("message {id}"), "id": id.to_string(), "ref": reference });
    event[field] = json!(target.to_string());
    event
}

/// The subscriber (pub/sub) connections Redis has open now.
async fn subscriber_connections(redis: &mut ::redis::aio::MultiplexedConnection) -> ::redis::RedisResult<usize> {
    let list: String = ::redis::cmd("CLIENT")
        .arg(&["LIST", "TYPE", "pubsub"])
        .query_async(redis)
        .await?;
    Ok(list.lines().count())
}

/// Polls `/readyz` until it answers `status`; fails after `RECOVERY`.
async fn wait_ready_status(api: &Api, gateway: &str, status: u16) {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let (got, body) = api.get_text("/readyz").await;
        if got == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{gateway}: /readyz still answers {got} ({body}), expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads `client`'s events until the message `id` arrives (true) or
/// `within` passes (false); other messages are skipped.
async fn receives(client: &mut Client, id: &Value, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Some(event) = client.try_next_event(left).await else {
            return false;
        };
        assert_ne!(event["type"], "__close", "the connection ended: {event}");
        if event["type"] == "message" && event["id"] == *id {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn without_redis_sends_get_unavailable_connections_stay_and_all_recovers_when_it_returns() {
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(1, bob).await;
    let ack = alice_0.send_message_to(bob, "before").await;
    assert!(receives(&mut bob_1, &ack["id"], DEFAULT_TIMEOUT).await);

    stack.redis.stop().await;

    // A send is refused, not left hanging: `request` fails the test if no
    // reply comes within DEFAULT_TIMEOUT.
    let id = Uuid::new_v4();
    let reply = alice_0.request(send(("to", bob), id, "while down")).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert_eq!(reply["ref"], "while down", "{reply}");
    let reply = bob_1.request(send(("to", alice), Uuid::new_v4(), "other node")).await;
    assert_eq!(reply["code"], "unavailable", "{reply}");

    // The connections stay: ping is answered by the node itself.
    alice_0.ping().await;
    bob_1.ping().await;
    for (i, name) in ["gateway 0", "gateway 1"].into_iter().enumerate() {
        wait_ready_status(&stack.http(i), name, 503).await;
        let (status, _) = stack.http(i).get_text("/healthz").await;
        assert_eq!(status, 200, "{name}: /healthz while Redis is down");
    }
    alice_0.ping().await;

    stack.redis.restart().await;

    // Nothing was accepted: the client retries with the same id until the
    // node is back, and that id is then accepted.
    let deadline = Instant::now() + RECOVERY;
    let accepted = loop {
        let reply = alice_0.request(send(("to", bob), id, "retry")).await;
        match (reply["type"].as_str(), reply["code"].as_str()) {
            (Some("ack"), _) => break reply,
            (Some("error"), Some("unavailable")) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            _ => panic!("a resend after Redis returned got {reply}"),
        }
    };
    assert_eq!(accepted["id"], json!(id.to_string()), "{accepted}");

    // And delivery to the other node resumes once its bus has reconnected.
    until_one_arrives_live(
        &mut alice_0,
        &mut bob_1,
        ("to", bob),
        "a message to Bob on the other gateway after Redis returned",
    )
    .await;
    for (i, name) in ["gateway 0", "gateway 1"].into_iter().enumerate() {
        wait_ready_status(&stack.http(i), name, 200).await;
    }
    // Bob's node sends again too.
    let ack = bob_1.send_message_to(alice, "back").await;
    assert!(receives(&mut alice_0, &ack["id"], DEFAULT_TIMEOUT).await);

    // Once each: no subscription of the connection lost with Redis is
    // still delivering beside the new one.
    let ack = alice_0.send_message_to(bob, "once").await;
    assert!(receives(&mut bob_1, &ack["id"], DEFAULT_TIMEOUT).await);
    assert!(
        !receives(&mut bob_1, &ack["id"], Duration::from_secs(1)).await,
        "a message reached Bob twice after Redis returned"
    );
}

#[tokio::test]
async fn a_send_without_an_id_whose_answer_came_too_late_is_acked_once_because_redis_ran_it() {
    // Writes wait out a pause longer than the gateway's Redis timeout (500
    // ms) and then run: the accept script's answer comes too late, yet the
    // script accepted the message.
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        env: harness::env(&[("GATEWAY_REDIS_TIMEOUT_MS", "500")]),
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    // Timed out by the gateway or by the Redis client's own response timeout.
    let timeouts_before = stack.metric(0, "gateway_redis_errors_total", "").await;

    stack.redis.pause_writes(800).await;
    // No `id`: a resend after `unavailable` would be a second message.
    let reply = alice_0
        .request(json!({ "type": "send", "to": bob.to_string(), "body": "late but accepted" }))
        .await;
    let timeouts = stack.metric(0, "gateway_redis_errors_total", "").await - timeouts_before;
    println!("late answer: {timeouts} script timeout(s), reply {reply}");
    assert!(timeouts >= 1.0, "the test's premise: the script's answer timed out");
    assert_eq!(
        reply["type"], "ack",
        "the script ran, so the send was accepted: `unavailable` would say nothing was: {reply}"
    );
    let got = bob_0.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(got["id"], reply["id"], "{got}");
    bob_0.expect_none("message", Duration::from_millis(300)).await;
}

/// The accept script refuses to queue a message it runs more than the
/// accept deadline (10 s) after the gateway stamped it: nothing is queued,
/// the sender gets `unavailable`, and the resend with the same `id` is
/// accepted. (History relies on the bound: history::holes.)
#[tokio::test]
async fn a_send_whose_script_runs_past_the_accept_deadline_is_refused_and_nothing_is_queued() {
    // Past the 10 s deadline with room for the frame's way to the gateway.
    const PAUSE_MS: u64 = 12_000;
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        // The gateway waits out the pause for the script's answer.
        env: harness::env(&[("GATEWAY_REDIS_TIMEOUT_MS", "20000")]),
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut redis = stack.redis.connection().await;
    stack.redis.pause_writes(PAUSE_MS).await;
    let id = Uuid::new_v4();
    let sent = Instant::now();
    alice_0.send_json(send(("to", bob), id, "late")).await;
    let reply = alice_0.next_event(Duration::from_millis(PAUSE_MS) + RECOVERY).await;
    println!("answered after {:?}: {reply}", sent.elapsed());
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let queued: usize = redis::cmd("XLEN")
        .arg(shared::queue::STREAM)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(queued, 0, "the refused message was queued");

    let reply = alice_0.request(send(("to", bob), id, "resent")).await;
    assert_eq!(reply["type"], "ack", "the resend with the same id: {reply}");
}

#[tokio::test]
async fn a_silent_redis_link_is_found_dead_by_the_bus_heartbeat_and_handshakes_get_503_meanwhile() {
    // Gateway 0 talks to Redis directly; gateway 1 through a proxy that can
    // turn into a black hole (a network split, a host gone without FIN or
    // RST): its sockets stay open and nothing comes back.
    const HEARTBEAT_MS: u64 = 200;
    const OPEN_BOUND: Duration = Duration::from_secs(3);
    let mut stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let proxy = harness::Proxy::start(([127, 0, 0, 1], stack.redis.port()).into()).await;
    let gw = stack
        .add_gateway(&[
            ("REDIS_URL", &proxy.redis_url()),
            ("GATEWAY_BUS_HEARTBEAT_MS", &HEARTBEAT_MS.to_string()),
            ("GATEWAY_HANDSHAKE_TIMEOUT_SECS", &OPEN_BOUND.as_secs().to_string()),
        ])
        .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_1 = stack.connect(gw, bob).await;
    let ack = alice_0.send_message_to(bob, "before").await;
    assert!(receives(&mut bob_1, &ack["id"], DEFAULT_TIMEOUT).await);
    let reconnects_before = stack.metric(gw, "gateway_bus_reconnects_total", "").await;

    proxy.black_hole();

    // Nothing closes the bus's sockets: only the heartbeat's missing
    // answers tell the gateway they are dead, within about 3 intervals.
    let found_dead = Instant::now();
    stack
        .eventually("bus reconnect on gateway 1", Duration::from_secs(5), async || {
            let n = stack.metric(gw, "gateway_bus_reconnects_total", "").await;
            (n > reconnects_before).then_some(())
        })
        .await;
    println!(
        "black hole found dead by the heartbeat after {:?}",
        found_dead.elapsed()
    );

    // A handshake is answered 503 within the bound rather than left
    // hanging on a subscription no one will confirm.
    let started = Instant::now();
    let refused = stack.try_connect_raw(gw, Some(&stack.token(harness::user()))).await;
    let took = started.elapsed();
    assert_eq!(refused.err(), Some(503), "a handshake during the black hole");
    assert!(took <= OPEN_BOUND + Duration::from_secs(1), "the 503 took {took:?}");
    println!("handshake during the black hole: 503 after {took:?}");

    // Replacements connect only once the black hole ends: counted from here,
    // they include those of the membership resync's reads.
    let replaced_before = stack.metric(gw, "gateway_redis_reconnects_total", "").await;
    // New connections get through again; the old ones stay black holes.
    proxy.restore();

    // The bus is back on its own: a message from the other gateway reaches
    // Bob live, though the socket it was on is still open and silent.
    until_one_arrives_live(
        &mut alice_0,
        &mut bob_1,
        ("to", bob),
        "a message to Bob on gateway 1 after the black hole ended",
    )
    .await;

    // The command connections are replaced after their calls time out
    // (the proxy never closes the old sockets): the node serves again
    // without waiting for the kernel to give up on them.
    // A new handshake on gateway 1 succeeds, and two users there talk live.
    let carol = harness::user();
    let mut carol_1 = connect_once_recovered(&stack, gw, carol, "a handshake after the black hole").await;
    until_one_arrives_live(
        &mut bob_1,
        &mut carol_1,
        ("to", carol),
        "a message from Bob to Carol on gateway 1",
    )
    .await;
    let ack = carol_1.send_message_to(bob, "and back").await;
    assert!(receives(&mut bob_1, &ack["id"], DEFAULT_TIMEOUT).await);
    let replaced = stack.metric(gw, "gateway_redis_reconnects_total", "").await - replaced_before;
    println!("command connections replaced after timeouts: {replaced}");
    assert!(
        replaced >= 1.0,
        "the node served again by replacing its silent command connections"
    );
}

#[tokio::test]
async fn a_handshake_waiting_on_a_bus_that_has_not_noticed_the_black_hole_gets_503_at_the_handshake_timeout() {
    // A heartbeat slow enough (dead after 3 s) that the handshake's own
    // bound (1 s) answers first; one connection per user, so a slot the
    // abandoned handshake kept would refuse the user's next one.
    let mut stack = Stack::start(StackOptions {
        gateways: 0,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let proxy = harness::Proxy::start(([127, 0, 0, 1], stack.redis.port()).into()).await;
    let gw = stack
        .add_gateway(&[
            ("REDIS_URL", &proxy.redis_url()),
            ("GATEWAY_BUS_HEARTBEAT_MS", "1000"),
            ("GATEWAY_HANDSHAKE_TIMEOUT_SECS", "1"),
            ("GATEWAY_MAX_CONNS_PER_USER", "1"),
        ])
        .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(gw, alice).await;
    let reconnects_before = stack.metric(gw, "gateway_bus_reconnects_total", "").await;

    proxy.black_hole();
    let started = Instant::now();
    let refused = stack.try_connect_raw(gw, Some(&stack.token(bob))).await;
    let took = started.elapsed();
    assert_eq!(refused.err(), Some(503), "a handshake into the black hole");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(2),
        "answered after {took:?}, not at the 1 s handshake timeout"
    );
    let reconnects = stack.metric(gw, "gateway_bus_reconnects_total", "").await;
    assert_eq!(
        reconnects, reconnects_before,
        "the premise: the bus had not noticed yet"
    );
    println!("handshake into a black hole not yet noticed: 503 after {took:?}");

    // Redis comes back (and the silent sockets close in the end, for the
    // command connections: see the test above). Bob's next handshake gets
    // his only slot, and Alice and Bob talk live.
    proxy.restore();
    stack
        .eventually("bus reconnect", Duration::from_secs(10), async || {
            let n = stack.metric(gw, "gateway_bus_reconnects_total", "").await;
            (n > reconnects_before).then_some(())
        })
        .await;
    proxy.close_black_holed();
    let mut bob_0 = connect_once_recovered(&stack, gw, bob, "Bob's handshake after the black hole").await;
    until_one_arrives_live(&mut alice_0, &mut bob_0, ("to", bob), "a message to Bob").await;
}

/// Opens a connection of `user` on gateway `gw`, retrying while the
/// handshake answers 503 (the node still recovering), for up to `RECOVERY`.
async fn connect_once_recovered(stack: &Stack, gw: usize, user: Uuid, what: &str) -> Client {
    let deadline = Instant::now() + RECOVERY;
    let mut client = loop {
        match stack.try_connect_raw(gw, Some(&stack.token(user))).await {
            Ok(client) => break client,
            Err(status) => {
                assert_eq!(status, 503, "{what}");
                assert!(Instant::now() < deadline, "{what}: none succeeded within {RECOVERY:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    client.user = Some(user);
    client
}

/// Sends from `from` to `address` (`("to", user)` or `("chat", group)`)
/// until one message is acked and reaches `to` live, for up to `RECOVERY`;
/// fails naming `what`.
async fn until_one_arrives_live(from: &mut Client, to: &mut Client, address: (&str, Uuid), what: &str) {
    let deadline = Instant::now() + RECOVERY;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = from
            .request(send(address, Uuid::new_v4(), &format!("{what}, attempt {attempt}")))
            .await;
        if reply["type"] == "ack" && receives(to, &reply["id"], Duration::from_secs(1)).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: none arrived within {RECOVERY:?}; last reply {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `joined` or `left` published while a node's bus was cut off from Redis
/// is missed; once the bus is back, the node's connections read their
/// users' groups again: Alice's connection receives the group she was
/// added to meanwhile, and no longer the one she left meanwhile (on another
/// device, over HTTP).
#[tokio::test]
async fn membership_changed_while_the_bus_was_away_is_in_effect_once_it_is_back() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let api = stack.http(0);
    let (alice, bob, carol) = (harness::user(), harness::user(), harness::user());
    let (status, created) = api
        .create_chat(bob, "left while away", "private", &[alice, carol])
        .await;
    assert_eq!(status, 201, "{created}");
    let old_group = harness::canonical_uuid(&created["id"], "the first group's id");
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    let mut carol_0 = stack.connect(0, carol).await;
    let ack = bob_0.send_to_chat(old_group, "before").await;
    assert!(receives(&mut alice_0, &ack["id"], DEFAULT_TIMEOUT).await);
    assert!(receives(&mut carol_0, &ack["id"], DEFAULT_TIMEOUT).await);

    // Cut the node's subscriber connections off, and keep them off.
    let mut redis = stack.redis.connection().await;
    let subscribers = cut_the_bus_off(&stack, &mut redis).await;

    // Meanwhile Alice leaves the first group from another device, and Bob
    // makes a second one with her: both announcements reach no one here.
    let (status, body) = api.remove_member(alice, old_group, alice).await;
    assert_eq!(status, 204, "{body}");
    let (status, created) = api.create_chat(bob, "joined while away", "private", &[alice]).await;
    assert_eq!(status, 201, "{created}");
    let new_group = harness::canonical_uuid(&created["id"], "the second group's id");

    let_the_bus_back(&mut redis).await;

    // The new group reaches Alice live once the node has resynced...
    until_one_arrives_live(
        &mut bob_0,
        &mut alice_0,
        ("chat", new_group),
        "a message to the group Alice was added to while the bus was away",
    )
    .await;
    // ... and the old one no longer does, while Carol still gets it (once
    // every subscriber is back: the old group's may reconnect later).
    stack
        .eventually("every subscriber back", RECOVERY, async || {
            (subscriber_connections(&mut redis).await.ok()? >= subscribers).then_some(())
        })
        .await;
    let ack = bob_0.send_to_chat(old_group, "after").await;
    assert!(receives(&mut carol_0, &ack["id"], DEFAULT_TIMEOUT).await);
    assert!(
        !receives(&mut alice_0, &ack["id"], Duration::from_secs(1)).await,
        "Alice still receives the group she left while the bus was away"
    );
}

/// Cuts gateway 0's subscriber connections off and keeps them off until
/// `let_the_bus_back`: Redis takes no new connection, while the node's
/// command connections (and the test's `redis`) stay open. Returns once
/// the node noticed, with how many subscriber connections it had.
async fn cut_the_bus_off(stack: &Stack, redis: &mut ::redis::aio::MultiplexedConnection) -> usize {
    let info: String = ::redis::cmd("INFO").arg("clients").query_async(redis).await.unwrap();
    let connected: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("connected_clients in INFO clients");
    let subscribers = subscriber_connections(redis).await.unwrap();
    assert!(subscribers > 0, "the node has subscriber connections");
    let reconnects_before = stack.metric(0, "gateway_bus_reconnects_total", "").await;
    let _: () = ::redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", &(connected - subscribers).to_string()])
        .query_async(redis)
        .await
        .unwrap();
    let _: i64 = ::redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "pubsub"])
        .query_async(redis)
        .await
        .unwrap();
    stack
        .eventually("the node to notice its bus is gone", RECOVERY, async || {
            (stack.metric(0, "gateway_bus_reconnects_total", "").await > reconnects_before).then_some(())
        })
        .await;
    subscribers
}

/// Lets the subscriber connections `cut_the_bus_off` kept out in again.
async fn let_the_bus_back(redis: &mut ::redis::aio::MultiplexedConnection) {
    let _: () = ::redis::cmd("CONFIG")
        .arg(&["SET", "maxclients", "10000"])
        .query_async(redis)
        .await
        .unwrap();
}

/// The resync after the bus is back cannot read Alice's groups (her set of
/// groups is, for a while, not a set: every read fails as it would with
/// Redis failing); her connection tries again at its next ping, and the
/// group she was added to while the bus was away reaches her live.
#[tokio::test]
async fn a_resync_that_could_not_read_the_users_groups_is_tried_again_at_the_next_ping() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        // Pings every second; the clients, not read while they wait, are
        // not dropped as silent meanwhile.
        env: harness::env(&[
            ("GATEWAY_PING_INTERVAL_SECS", "1"),
            ("GATEWAY_PING_TIMEOUT_SECS", "120"),
        ]),
        ..StackOptions::default()
    })
    .await;
    let api = stack.http(0);
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;

    let mut redis = stack.redis.connection().await;
    cut_the_bus_off(&stack, &mut redis).await;
    // Bob makes a group with Alice while the bus is away: her `joined` is missed.
    let (status, created) = api.create_chat(bob, "joined while away", "private", &[alice]).await;
    assert_eq!(status, 201, "{created}");
    let group = harness::canonical_uuid(&created["id"], "the group's id");

    // Alice's groups cannot be read: her set is put aside and a string stands in for it.
    let groups_key = format!("user:{alice}:chats");
    let aside = format!("{groups_key}:aside");
    let () = ::redis::cmd("RENAME")
        .arg(&groups_key)
        .arg(&aside)
        .query_async(&mut redis)
        .await
        .unwrap();
    let () = ::redis::cmd("SET")
        .arg(&groups_key)
        .arg("unreadable")
        .query_async(&mut redis)
        .await
        .unwrap();
    let_the_bus_back(&mut redis).await;
    // Her three reads fail, and then her reads at the pings: only hers can
    // (Bob's groups are readable).
    stack
        .eventually("a read of Alice's groups at a ping to fail", RECOVERY, async || {
            let failed = stack
                .metric(0, "gateway_membership_resyncs_total", "outcome=\"retry_failed\"")
                .await;
            (failed >= 1.0).then_some(())
        })
        .await;

    // Her groups can be read again, and nothing else happens to the node:
    // no outage, no membership change, nothing that would resync it again.
    let () = ::redis::cmd("RENAME")
        .arg(&aside)
        .arg(&groups_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    until_one_arrives_live(
        &mut bob_0,
        &mut alice_0,
        ("chat", group),
        "a message to the group Alice was added to, after her resync failed",
    )
    .await;
}
