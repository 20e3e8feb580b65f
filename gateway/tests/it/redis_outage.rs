//! Redis unavailable (contract: `unavailable`, `/readyz`): a gateway that
//! cannot reach Redis refuses sends with `unavailable`, keeps its
//! connections, and recovers by itself when Redis returns.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, Api, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// How long the cluster may take to recover once Redis is back.
const RECOVERY: Duration = Duration::from_secs(30);

fn send(to: Uuid, id: Uuid, reference: &str) -> Value {
    json!({ "type": "send", "to": to.to_string(), "body": format!("message {id}"), "id": id.to_string(), "ref": reference })
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
    let reply = alice_0.request(send(bob, id, "while down")).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert_eq!(reply["ref"], "while down", "{reply}");
    let reply = bob_1.request(send(alice, Uuid::new_v4(), "other node")).await;
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
        let reply = alice_0.request(send(bob, id, "retry")).await;
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
    let deadline = Instant::now() + RECOVERY;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reply = alice_0
            .request(send(bob, Uuid::new_v4(), &format!("after {attempt}")))
            .await;
        if reply["type"] == "ack" && receives(&mut bob_1, &reply["id"], Duration::from_secs(1)).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no message reached Bob on the other gateway within {RECOVERY:?} of Redis returning; last reply {reply}"
        );
    }
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

    let mut redis = stack.redis.connection().await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(800)
        .arg("WRITE")
        .query_async(&mut redis)
        .await
        .expect("CLIENT PAUSE");
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
