//! A flood on one gateway: one client sends as fast as it can while another
//! user exchanges messages on the same node. The test prints the other
//! user's send→delivery latency (median, alone and during the flood, in
//! the same run) and asserts only the contract: every one of their messages
//! is acked and arrives, in order.
//!
//! The flooder's send rate limit is lifted (GATEWAY_SEND_RATE): with the
//! default limit most of the flood would be refused in the session before
//! touching Redis, and the test would measure the limiter rather than the
//! node under load. Many users each at their limit make the same load, so
//! this is the case where fairness between connections has to hold.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::harness::{self, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// Messages the measured user sends in each phase, and their spacing.
const SAMPLES: usize = 40;
const SPACING: Duration = Duration::from_millis(20);
/// Sends the flooder has in flight before it reads their acks.
const WINDOW: usize = 64;

/// Alice sends `SAMPLES` messages to Bob, one per `SPACING`, while Bob's
/// connection is read by a task of its own; returns the latencies (Bob's
/// arrival minus Alice's send), after checking that every message was acked
/// and arrived, in order.
async fn measure(alice: &mut Client, bob: Client, bob_id: Uuid, phase: &str) -> (Vec<Duration>, Client) {
    let reader = tokio::spawn(async move {
        let mut bob = bob;
        let mut arrivals = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let message = bob.expect("message", DEFAULT_TIMEOUT).await;
            arrivals.push((Instant::now(), message));
        }
        (arrivals, bob)
    });
    let mut sent = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let body = format!("{phase} {i}");
        let started = Instant::now();
        let ack = alice.send_message_to(bob_id, &body).await;
        sent.push((started, body, ack));
        tokio::time::sleep(SPACING).await;
    }
    let (arrivals, bob) = reader.await.expect("bob's reader");

    let mut latencies = Vec::with_capacity(SAMPLES);
    let mut last_seq = 0;
    for ((started, body, ack), (arrived, message)) in sent.iter().zip(&arrivals) {
        assert_eq!(
            (&message["id"], &message["body"]),
            (&ack["id"], &json!(body)),
            "{phase}: bob's messages are not alice's, in order"
        );
        let seq = message["seq"].as_i64().expect("a seq");
        assert!(seq > last_seq, "{phase}: seq {seq} after {last_seq}");
        last_seq = seq;
        latencies.push(arrived.saturating_duration_since(*started));
    }
    (latencies, bob)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_messages_arrive_in_order_while_one_client_floods_the_node() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        env: vec![
            ("GATEWAY_SEND_RATE".into(), "1000000".into()),
            ("GATEWAY_SEND_BURST".into(), "1000000".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let (alice, bob, flooder_id, sink_id) = (harness::user(), harness::user(), harness::user(), harness::user());
    let mut alice_conn = stack.connect(0, alice).await;
    let bob_conn = stack.connect(0, bob).await;
    let mut flooder = stack.connect(0, flooder_id).await;
    let mut sink = stack.connect(0, sink_id).await;

    let (alone, bob_conn) = measure(&mut alice_conn, bob_conn, bob, "alone").await;

    // The flood: WINDOW sends at a time, their acks read before the next
    // window, until told to stop. Its recipient reads everything.
    let stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn({
        let stop = stop.clone();
        async move {
            let started = Instant::now();
            let mut acked = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..WINDOW {
                    let body = format!("flood {acked} {i}");
                    flooder
                        .send_json(json!({ "type": "send", "to": sink_id.to_string(), "body": body }))
                        .await;
                }
                let replies = flooder.expect_n("ack", WINDOW, DEFAULT_TIMEOUT).await;
                acked += replies.len();
            }
            (acked, started.elapsed())
        }
    });
    let drain = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut received = 0usize;
            loop {
                match sink.try_next_event(Duration::from_millis(200)).await {
                    Some(event) if event["type"] == "message" => received += 1,
                    Some(event) => panic!("the flood's recipient got {event}"),
                    None if stop.load(Ordering::Relaxed) => return received,
                    None => {}
                }
            }
        }
    });
    // Let the flood get going before measuring.
    while !flood.is_finished() && frames_out(&stack).await < 500.0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (flooded, _bob_conn) = measure(&mut alice_conn, bob_conn, bob, "flooded").await;
    stop.store(true, Ordering::Relaxed);
    let (acked, took) = flood.await.expect("the flood task");
    let received = drain.await.expect("the flood recipient's task");

    println!(
        "flood: another user's send→delivery median {:?} alone, {:?} during the flood ({SAMPLES} messages each); \
         the flooder had {acked} messages acked in {took:.1?} ({:.0}/s), its recipient read {received} live",
        median(alone),
        median(flooded),
        acked as f64 / took.as_secs_f64()
    );
    assert!(acked > 0, "the flood sent nothing");
}

/// Frames the gateway has written so far (its metric), to see the flood going.
async fn frames_out(stack: &Stack) -> f64 {
    let (_, text) = stack.http(0).get_text("/metrics").await;
    text.lines()
        .filter(|l| l.starts_with("gateway_frames_out_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
}
