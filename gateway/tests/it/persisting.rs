//! How the persister batches (PERSISTER_LINGER_MS): after a read that
//! drained the stream it waits before reading again, so messages that
//! arrive meanwhile are stored together in one transaction. And that a
//! persister started while Redis is full still drains the queue.

use std::time::{Duration, Instant};

use shared::queue::{DEAD_LETTERS, GROUP, STREAM};

use crate::harness::{self, Stack, StackOptions};

/// Rows in `messages`.
async fn stored(stack: &Stack) -> i64 {
    let client = stack.db().await;
    client
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .expect("count messages")
        .get(0)
}

/// Batches the persister has written so far (`persister_batches_total`).
async fn batches(stack: &Stack) -> u64 {
    let url = stack.persister.as_ref().expect("a persister").metrics_url();
    let text = reqwest::get(url)
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|l| l.starts_with("persister_batches_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn wait_stored(stack: &Stack, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while stored(stack).await < n {
        assert!(Instant::now() < deadline, "{n} messages not stored within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn messages_sent_while_the_persister_lingers_are_stored_in_one_or_two_batches() {
    // One lane, a long linger (1 s): five messages 50 ms apart span about
    // 200 ms (more on a loaded machine: each waits for its ack), well inside
    // it. Without the linger each would be read, and written, alone.
    let stack = Stack::start(StackOptions {
        env: vec![
            ("PERSISTER_LINGER_MS".into(), "1000".into()),
            ("PERSISTER_CONCURRENCY".into(), "1".into()),
        ],
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut sender = stack.connect(0, alice).await;
    sender.send_message_to(bob, "first").await;
    wait_stored(&stack, 1).await;
    let before = batches(&stack).await;

    for i in 0..5 {
        let ack = sender.send_message_to(bob, &format!("burst {i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_stored(&stack, 6).await;
    // The first of the five may be caught by a read already waiting; the
    // others arrive during the linger that follows it.
    let used = batches(&stack).await - before;
    assert!((1..=2).contains(&used), "5 messages took {used} batches");
}

/// Redis at `maxmemory` with `noeviction` (docs/queue.md: a long
/// PostgreSQL outage, or the persisters down) refuses the gateways' sends
/// until the persisters drain the queue. A persister started then (a
/// rollout, a restart) must get to its reads, acks and deletes, which Redis
/// still takes, though it refuses `XGROUP CREATE` even for a group that
/// exists, and every command inside `MULTI`. An entry deleted by hand while
/// pending has a letter that cannot be written to `chat:dead` yet: it waits,
/// and does not hold up the rest.
#[tokio::test]
async fn a_persister_started_while_redis_is_full_drains_the_queue() {
    const QUEUED: i64 = 100;
    let mut stack = Stack::start(StackOptions {
        // One lane: with several, the others would store what a blocked
        // lane does not.
        env: harness::env(&[("PERSISTER_CLAIM_IDLE_MS", "200"), ("PERSISTER_CONCURRENCY", "1")]),
        ..StackOptions::default()
    })
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut sender = stack.connect(0, alice).await;
    sender.send_message_to(bob, "before").await;
    wait_stored(&stack, 1).await;

    // The persister goes away (its group stays). Another consumer of the
    // group holds an entry, which an operator deletes; messages wait.
    stack.persister.as_mut().expect("a persister").kill().await;
    let mut redis = stack.redis.connection().await;
    let ghost: String = redis::cmd("XADD")
        .arg(STREAM)
        .arg("*")
        .arg("not")
        .arg("a job")
        .query_async(&mut redis)
        .await
        .expect("XADD");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg("gone")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query_async(&mut redis)
        .await
        .expect("XREADGROUP");
    let _: i64 = redis::cmd("XDEL")
        .arg(STREAM)
        .arg(&ghost)
        .query_async(&mut redis)
        .await
        .expect("XDEL");
    for i in 0..QUEUED {
        sender.send_message_to(bob, &format!("queued {i}")).await;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut redis)
        .await
        .expect("CONFIG SET maxmemory");
    let refused = sender
        .request(serde_json::json!({ "type": "send", "to": bob.to_string(), "body": "while full" }))
        .await;
    assert_eq!(refused["code"], "unavailable", "a send while Redis is full: {refused}");

    stack.start_persister().await;
    wait_stored(&stack, 1 + QUEUED).await;
    // Acked and deleted after the commit: the memory Redis gets back.
    stack
        .eventually(
            "the stored entries acked and deleted",
            Duration::from_secs(15),
            async || {
                let length: i64 = redis::cmd("XLEN").arg(STREAM).query_async(&mut redis).await.ok()?;
                (length == 0).then_some(())
            },
        )
        .await;

    // Room again: the deleted entry's letter is written.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut redis)
        .await
        .expect("CONFIG SET maxmemory 0");
    stack
        .eventually(
            "the deleted entry's letter in chat:dead",
            Duration::from_secs(15),
            async || {
                let letters = stack.stream_entries(DEAD_LETTERS).await;
                letters.iter().any(|(_, fields)| fields.contains(&ghost)).then_some(())
            },
        )
        .await;
}
