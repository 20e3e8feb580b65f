//! Graceful drain (issue 8), with real processes: what a gateway does
//! between SIGTERM and its exit, and what a persister does with the batch it
//! holds when SIGTERM comes.
//!
//! Gateway: from SIGTERM on it is not ready (`/readyz` answers 503; the
//! listener stays open until the sessions are gone), takes no new WebSocket (503), finishes the event each
//! session is handling (a send gets its `ack` or `unavailable`), closes
//! every WebSocket with 1001 and exits 0 within `GATEWAY_DRAIN_SECS`. A send
//! the client wrote but the gateway had not read yet gets no answer and was
//! not accepted: the client resends it (same `id`) after reconnecting.
//!
//! Persister: the batch in hand is stored and acknowledged before it exits
//! 0, so nothing stays pending under its consumer name.
//!
//! To make a drain last long enough to look at, a test pauses Redis's writes
//! (`CLIENT PAUSE <ms> WRITE`: scripts and PUBLISH wait, PING answers), or
//! locks the `messages` table so a persister's batch waits in PostgreSQL.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::queue::{GROUP, STREAM};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::harness::client::ConnectError;
use crate::harness::{self, env, Client, Persister, Stack, StackOptions, DEFAULT_TIMEOUT};

fn send_event(to: Uuid, id: Uuid, body: &str, reference: &str) -> Value {
    json!({ "type": "send", "to": to.to_string(), "body": body, "id": id.to_string(), "ref": reference })
}

/// The message ids in the queue stream, with how many entries each has.
async fn queued_message_ids(stack: &Stack) -> HashMap<Uuid, usize> {
    let entries = stack.stream_entries(STREAM).await;
    let mut ids = HashMap::new();
    for (_, fields) in entries {
        let fields: HashMap<&str, &str> = fields
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((k.as_str(), v.as_str())),
                _ => None,
            })
            .collect();
        if fields.get("kind") == Some(&"message") {
            let id = Uuid::parse_str(fields["id"]).expect("a message entry's id");
            *ids.entry(id).or_default() += 1;
        }
    }
    ids
}

/// Entries of the consumer group read and not acknowledged by the persister
/// named `consumer`: its consumer `consumer` and, when it runs several
/// lanes (`PERSISTER_CONCURRENCY`), its consumers `consumer/<n>`.
async fn pending_of(stack: &Stack, consumer: &str) -> usize {
    let mut redis = stack.redis.connection().await;
    let summary: Result<redis::Value, redis::RedisError> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query_async(&mut redis)
        .await;
    let summary = match summary {
        Ok(summary) => summary,
        // No group yet: no persister has started reading.
        Err(e) if e.code() == Some("NOGROUP") => return 0,
        Err(e) => panic!("XPENDING: {e}"),
    };
    let redis::Value::Array(parts) = summary else {
        panic!("XPENDING answered {summary:?}");
    };
    let Some(redis::Value::Array(consumers)) = parts.get(3) else {
        return 0; // nothing pending at all
    };
    let lane_prefix = format!("{consumer}/");
    consumers
        .iter()
        .map(|entry| {
            let (name, count): (String, String) =
                redis::from_redis_value(entry).unwrap_or_else(|e| panic!("XPENDING consumer {entry:?}: {e}"));
            if name == consumer || name.starts_with(&lane_prefix) {
                count.parse::<usize>().expect("a pending count")
            } else {
                0
            }
        })
        .sum()
}

/// What a plain HTTP/1.1 request got.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// No listener: the TCP connection was refused.
    Refused,
    /// The connection was closed (or reset) before an answer.
    Closed(String),
}

/// `GET path` on a new connection.
async fn http_get(addr: SocketAddr, path: &str) -> Answer {
    match TcpStream::connect(addr).await {
        Ok(mut stream) => request_on(&mut stream, path).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Answer::Refused,
        Err(e) => Answer::Closed(format!("connect: {e}")),
    }
}

/// `GET path` on an open (keep-alive) connection; reads the whole answer so
/// the connection can carry the next request.
async fn request_on(stream: &mut TcpStream, path: &str) -> Answer {
    let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\n\r\n");
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Answer::Closed(format!("write: {e}"));
    }
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())
                            .flatten()
                    })
                    .unwrap_or(0);
                while buf.len() < end + 4 + length {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                return Answer::Status(status);
            }
            match stream.read(&mut chunk).await {
                Ok(0) => return Answer::Closed("end of stream".into()),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Answer::Closed(format!("read: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .unwrap_or_else(|_| Answer::Closed("no answer within 2 s".into()))
}

/// Every event of `client` up to and including the end of the connection.
async fn events_until_close(client: &mut Client, who: &str, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.try_next_event(left).await {
            Some(event) => {
                let end = event["type"] == "__close";
                events.push(event);
                if end {
                    return events;
                }
            }
            None => panic!(
                "{who}: the connection did not end within {timeout:?}; the last events: {:?}",
                &events[events.len().saturating_sub(3)..]
            ),
        }
    }
}

#[tokio::test]
async fn a_draining_gateway_takes_no_new_connection_finishes_the_send_in_flight_and_closes_with_1001() {
    const PAUSE_MS: u64 = 3000;
    let mut stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        // The send held by Redis must not time out into `unavailable`.
        env: env(&[("GATEWAY_DRAIN_SECS", "10"), ("GATEWAY_REDIS_TIMEOUT_MS", "8000")]),
        ..StackOptions::default()
    })
    .await;
    let addr = stack.gateways[0].addr;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = stack.connect(0, alice).await;
    let mut bob_ws = stack.connect(0, bob).await;
    alice_ws.ping().await;
    bob_ws.ping().await;
    assert_eq!(
        http_get(addr, "/readyz").await,
        Answer::Status(200),
        "/readyz before the drain"
    );
    // A keep-alive connection opened before the drain, as a health checker
    // reusing its connection would hold.
    let mut kept = TcpStream::connect(addr).await.expect("connecting to the gateway");
    assert_eq!(request_on(&mut kept, "/readyz").await, Answer::Status(200));

    stack.redis.pause_writes(PAUSE_MS).await;
    let paused_at = Instant::now();
    let id = Uuid::new_v4();
    alice_ws
        .send_json(send_event(bob, id, "in flight at SIGTERM", "in-flight"))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.gateways[0].signal(libc::SIGTERM);

    // Bob had nothing in flight: closed at once.
    let closed = bob_ws.expect("__close", Duration::from_secs(2)).await;
    assert_eq!(closed["code"], 1001, "Bob's socket: {closed}");

    // The drain is still on (Alice's send waits in Redis): look at it.
    let readyz_new = http_get(addr, "/readyz").await;
    let readyz_kept = request_on(&mut kept, "/readyz").await;
    let handshake = Client::connect(&stack.gateways[0].ws_url(), Some(&stack.token(harness::user())), false).await;
    let observed_at = paused_at.elapsed();
    let still_running = stack.gateways[0].try_exit().is_none();
    eprintln!(
        "during the drain: /readyz on a new connection: {readyz_new:?}; on a kept one: {readyz_kept:?}; \
         WebSocket handshake: {}",
        match &handshake {
            Ok(_) => "accepted".to_string(),
            Err(e) => e.to_string(),
        }
    );
    assert!(
        observed_at < Duration::from_millis(PAUSE_MS - 500),
        "the checks took {observed_at:?}, past the Redis pause: they did not look at a drain"
    );
    assert!(
        still_running,
        "the gateway exited with a send in flight:\n{}",
        stack.gateways[0].logs_tail(30)
    );
    for (what, answer) in [
        ("a new connection", &readyz_new),
        ("a kept-alive connection", &readyz_kept),
    ] {
        assert!(
            matches!(answer, Answer::Status(503)),
            "/readyz during the drain on {what}: {answer:?} (want 503: the listener stays open while draining)"
        );
    }
    match handshake {
        Ok(_) => panic!("a draining gateway accepted a new WebSocket"),
        Err(ConnectError::Status(status)) => assert_eq!(status, 503, "handshake refused with {status}"),
        Err(e) => panic!("a draining gateway must answer a handshake with 503, got {e}"),
    }

    // Alice's send completes when Redis resumes: acked, then 1001.
    let reply = alice_ws
        .wait_for(
            "the reply to the send in flight",
            Duration::from_millis(PAUSE_MS + 3000),
            |e| e["ref"] == "in-flight",
        )
        .await;
    assert_eq!(reply["type"], "ack", "the send in flight: {reply}");
    assert_eq!(reply["id"], json!(id.to_string()), "{reply}");
    let closed = alice_ws.expect("__close", Duration::from_secs(3)).await;
    assert_eq!(closed["code"], 1001, "Alice's socket after her ack: {closed}");

    let status = stack.gateways[0].wait(Duration::from_secs(12)).await;
    assert_eq!(status.code(), Some(0), "the gateway exited with {status}");
    assert_eq!(
        queued_message_ids(&stack).await.get(&id),
        Some(&1),
        "the acked send is not in the queue once"
    );
}

/// Four clients each write a burst of sends (with ids) to a gateway, which
/// gets SIGTERM as soon as the last client's first send is answered. Every
/// answer must be an `ack` or `unavailable`, at most one per send; acked
/// sends are in the queue exactly once. Then each client reconnects to the
/// other gateway and resends every send without an ack (same id): all are
/// acked, and the queue holds each message exactly once.
#[tokio::test]
async fn a_burst_cut_by_sigterm_ends_with_1001_after_the_ack_of_every_accepted_send() {
    const CLIENTS: usize = 4;
    // Large enough that a burst cannot all be in the gateway's socket buffer
    // when the drain starts: the drain answers what it has received, and the
    // rest must be cut off (and resent elsewhere).
    const BURST: usize = 6000;
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        persister: false,
        env: env(&[("GATEWAY_DRAIN_SECS", "10")]),
        ..StackOptions::default()
    })
    .await;
    let users: Vec<Uuid> = (0..CLIENTS).map(|_| harness::user()).collect();
    let ids: Vec<Vec<Uuid>> = (0..CLIENTS)
        .map(|_| (0..BURST).map(|_| Uuid::new_v4()).collect())
        .collect();
    let mut clients = Vec::new();
    for &user in &users {
        let mut client = stack.connect(0, user).await;
        client.ping().await;
        clients.push(client);
    }

    for (c, client) in clients.iter_mut().enumerate() {
        for (i, id) in ids[c].iter().enumerate() {
            client
                .send_json(send_event(users[c], *id, &format!("burst {c}/{i}"), &i.to_string()))
                .await;
        }
    }
    let first = clients[CLIENTS - 1].next_event(DEFAULT_TIMEOUT).await;
    stack.gateways[0].signal(libc::SIGTERM);
    let terminated = Instant::now();

    let mut acked: Vec<HashSet<Uuid>> = vec![HashSet::new(); CLIENTS];
    let mut unavailable: Vec<HashSet<Uuid>> = vec![HashSet::new(); CLIENTS];
    let mut cut_short = 0;
    for (c, client) in clients.iter_mut().enumerate() {
        let who = format!("client {c}");
        let mut events = events_until_close(client, &who, Duration::from_secs(12)).await;
        if c == CLIENTS - 1 {
            events.insert(0, first.clone());
        }
        let close = events.pop().expect("the close event");
        assert_eq!(
            close["code"],
            1001,
            "{who}: the connection ended with {close} (after {} replies)",
            events.len()
        );
        let mut replied = HashSet::new();
        for event in &events {
            let Some(i) = event["ref"].as_str().and_then(|r| r.parse::<usize>().ok()) else {
                panic!("{who}: an event that answers no send: {event}");
            };
            assert!(replied.insert(i), "{who}: send {i} answered twice; again: {event}");
            match event["type"].as_str() {
                Some("ack") => {
                    assert_eq!(event["id"], json!(ids[c][i].to_string()), "{who}: {event}");
                    acked[c].insert(ids[c][i]);
                }
                Some("error") if event["code"] == "unavailable" => {
                    unavailable[c].insert(ids[c][i]);
                }
                _ => panic!("{who}: send {i} answered with {event}: neither ack nor unavailable"),
            }
        }
        if replied.len() < BURST {
            cut_short += 1;
        }
        eprintln!(
            "{who}: {} acked, {} unavailable, {} unanswered, then {close}",
            acked[c].len(),
            unavailable[c].len(),
            BURST - replied.len()
        );
    }
    let status = stack.gateways[0].wait(Duration::from_secs(12)).await;
    assert_eq!(status.code(), Some(0), "the gateway exited with {status}");
    eprintln!("drained and exited {:?} after SIGTERM", terminated.elapsed());
    assert!(
        cut_short > 0,
        "every burst was fully answered before SIGTERM took effect: the test looked at no cut"
    );

    // Acked means in the queue, once. Unanswered should mean not accepted.
    let queued = queued_message_ids(&stack).await;
    for c in 0..CLIENTS {
        for id in &ids[c] {
            let count = queued.get(id).copied().unwrap_or(0);
            if acked[c].contains(id) {
                assert_eq!(count, 1, "client {c}: acked {id} is in the queue {count} times");
            } else if !unavailable[c].contains(id) {
                assert_eq!(
                    count, 0,
                    "client {c}: {id} was accepted into the queue, but its ack never reached the client"
                );
            }
        }
    }
    let unanswered: usize = (0..CLIENTS)
        .map(|c| BURST - acked[c].len() - unavailable[c].len())
        .sum();
    eprintln!("{unanswered} sends cut off by the drain, none of them accepted; every connection closed with 1001");

    // The clients reconnect elsewhere and resend what was not acked.
    for (c, &user) in users.iter().enumerate() {
        let mut client = stack.connect(1, user).await;
        for (i, id) in ids[c].iter().enumerate().filter(|(_, id)| !acked[c].contains(id)) {
            let reply = client
                .request(send_event(user, *id, &format!("burst {c}/{i}"), &format!("again {i}")))
                .await;
            assert_eq!(reply["type"], "ack", "client {c}: resending {id}: {reply}");
        }
    }
    let queued = queued_message_ids(&stack).await;
    for (c, client_ids) in ids.iter().enumerate() {
        for id in client_ids {
            assert_eq!(
                queued.get(id),
                Some(&1),
                "client {c}: {id} is not in the queue exactly once"
            );
        }
    }
}

#[tokio::test]
async fn the_grace_period_bounds_a_drain_stuck_on_redis_and_a_resend_completes_the_send() {
    const PAUSE_MS: u64 = 5000;
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        persister: false,
        env: env(&[("GATEWAY_DRAIN_SECS", "1"), ("GATEWAY_REDIS_TIMEOUT_MS", "8000")]),
        ..StackOptions::default()
    })
    .await;
    let alice = harness::user();
    let mut alice_ws = stack.connect(0, alice).await;
    alice_ws.ping().await;
    let id = Uuid::new_v4();

    stack.redis.pause_writes(PAUSE_MS).await;
    let paused_at = Instant::now();
    alice_ws.send_json(send_event(alice, id, "stuck", "stuck")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.gateways[0].signal(libc::SIGTERM);
    let terminated = Instant::now();
    let status = stack.gateways[0].wait(Duration::from_secs(4)).await;
    let took = terminated.elapsed();
    assert_eq!(status.code(), Some(0), "the gateway exited with {status}");
    assert!(
        took < Duration::from_millis(2500),
        "GATEWAY_DRAIN_SECS=1, yet the gateway took {took:?} to exit"
    );
    assert!(
        paused_at.elapsed() < Duration::from_millis(PAUSE_MS),
        "Redis resumed before the gateway exited: the drain was not stuck"
    );
    let events = events_until_close(&mut alice_ws, "Alice", Duration::from_secs(2)).await;
    assert!(
        events.iter().all(|e| e["ref"] != "stuck"),
        "the stuck send was answered though Redis was paused: {events:?}"
    );

    // Not acked, so Alice sends it again (same id) through the other node,
    // once Redis serves again: one message, acked.
    let mut alice_1 = stack.connect(1, alice).await;
    let reply = tokio::time::timeout(Duration::from_millis(PAUSE_MS + 3000), async {
        loop {
            let reply = alice_1.request(send_event(alice, id, "stuck", "again")).await;
            if reply["type"] == "ack" {
                return reply;
            }
            assert_eq!(reply["code"], "unavailable", "resending: {reply}");
        }
    })
    .await
    .expect("the resend was not acked once Redis resumed");
    assert_eq!(reply["id"], json!(id.to_string()), "{reply}");
    assert_eq!(queued_message_ids(&stack).await.get(&id), Some(&1));
}

/// A gateway and no persister, its queue filled with `n` acked messages (a
/// user to themselves; the first entry is the private chat's creation),
/// none stored yet; returns their ids.
async fn stack_with_queue(n: usize) -> (Stack, Vec<Uuid>) {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let user = harness::user();
    let mut client = stack.connect(0, user).await;
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        client
            .send_json(send_event(user, *id, &format!("queued {i}"), &i.to_string()))
            .await;
    }
    for _ in 0..n {
        let reply = client.next_event(DEFAULT_TIMEOUT).await;
        assert_eq!(reply["type"], "ack", "filling the queue: {reply}");
    }
    assert_eq!(queued_message_ids(&stack).await.len(), n);
    (stack, ids)
}

/// Locks `messages` against writes in a transaction of the returned
/// connection, until it runs `COMMIT`.
async fn lock_messages(stack: &Stack) -> tokio_postgres::Client {
    let pg = stack.db().await;
    pg.batch_execute("BEGIN; LOCK TABLE messages IN SHARE MODE")
        .await
        .expect("locking messages");
    pg
}

#[tokio::test]
async fn a_persister_stopped_mid_batch_stores_and_acks_its_batch_then_exits_0() {
    const MESSAGES: usize = 600;
    const BATCH: usize = 100;
    let (stack, ids) = stack_with_queue(MESSAGES).await;
    // The lock holds the persister's first batch in PostgreSQL.
    let pg = lock_messages(&stack).await;
    let mut penv = stack.persister_env("p1");
    penv.push(("PERSISTER_BATCH_SIZE".into(), BATCH.to_string()));
    let mut persister = Persister::start("p1", penv).await;

    // SIGTERM once every lane holds its batch: the pending count is above
    // zero and has not moved for half a second (no lane is between reads).
    // A lane caught inside a blocking read at SIGTERM is another case: see
    // docs/operations.md, "A persister".
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut held, mut since) = (0, Instant::now());
    loop {
        let n = pending_of(&stack, "p1").await;
        if n != held {
            (held, since) = (n, Instant::now());
        } else if n > 0 && since.elapsed() >= Duration::from_millis(500) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p1 held {held} entries, still changing, after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    persister.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        persister.try_exit().is_none(),
        "p1 exited while its batch of {held} entries was still being written:\n{}",
        persister.logs_tail(30)
    );
    pg.batch_execute("COMMIT").await.expect("releasing the lock");

    let stored = exits_0_having_stored_all_it_held(&stack, &mut persister, held, &ids).await;
    // Its batch (the first entry is the private chat's creation, not a message).
    assert!(
        stored.len() >= held - 1,
        "p1 held {held} entries but stored {} messages",
        stored.len()
    );

    // The next persister stores the rest, each message once.
    let mut p2 = Persister::start("p2", stack.persister_env("p2")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = pg
            .query_one("SELECT count(*), count(DISTINCT id) FROM messages", &[])
            .await
            .expect("counting messages");
        let (all, distinct): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(all, distinct);
        if all as usize == MESSAGES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "p2 stored {all} of {MESSAGES} messages within 30 s:\n{}",
            p2.logs_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = p2.terminate(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "p2 exited with {status}");
}

/// A lane whose write failed before SIGTERM holds more than one batch: the
/// one it was writing and the one it had read ahead. It stores all of it
/// before it exits, not just one batch.
#[tokio::test]
async fn a_persister_whose_writes_failed_before_sigterm_stores_all_its_lane_holds_then_exits_0() {
    const BATCH: usize = 20;
    const MESSAGES: usize = 3 * BATCH;
    let (stack, ids) = stack_with_queue(MESSAGES).await;
    // The lock, and a 200 ms lock_timeout on the persister's sessions: each
    // write of its batch fails, and its one lane, which read a full batch
    // and then the next one ahead, retries with a backoff doubling from
    // 100 ms to 5 s, holding both.
    let pg = lock_messages(&stack).await;
    let mut penv = stack.persister_env("p1");
    penv.extend([
        ("PERSISTER_BATCH_SIZE".to_string(), BATCH.to_string()),
        ("PERSISTER_CONCURRENCY".to_string(), "1".to_string()),
        (
            "DATABASE_URL".to_string(),
            format!("{}?options=-c%20lock_timeout%3D200", stack.db_url()),
        ),
    ]);
    let mut persister = Persister::start("p1", penv).await;
    let longest_waits = |p: &Persister| p.logs().matches("retry_in_ms=5000").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    while longest_waits(&persister) == 0 {
        assert!(
            Instant::now() < deadline,
            "p1 did not back off to 5 s within 30 s:\n{}",
            persister.logs_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held = pending_of(&stack, "p1").await;
    assert_eq!(held, 2 * BATCH, "p1's lane holds its batch and the one read ahead");

    // Right after the next failure, the lane sleeps 5 s: release the lock
    // and stop it then, so its retries store nothing before SIGTERM.
    let seen = longest_waits(&persister);
    while longest_waits(&persister) == seen {
        assert!(
            Instant::now() < deadline + Duration::from_secs(10),
            "p1 did not fail again:\n{}",
            persister.logs_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    pg.batch_execute("COMMIT").await.expect("releasing the lock");
    persister.signal(libc::SIGTERM);

    // What it held is stored (less the chat's creation entry); the third
    // batch, never read, is still queued.
    let stored = exits_0_having_stored_all_it_held(&stack, &mut persister, held, &ids).await;
    assert_eq!(stored.len(), held - 1, "messages stored of the {held} entries held");
}

/// After SIGTERM to `persister` (named p1), which held `held` entries:
/// it exits 0 with none of them pending, and each message of `ids` is
/// either stored or still queued, not both and not neither. Returns the
/// ids stored.
async fn exits_0_having_stored_all_it_held(
    stack: &Stack,
    persister: &mut Persister,
    held: usize,
    ids: &[Uuid],
) -> HashSet<Uuid> {
    let status = persister.wait(Duration::from_secs(15)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "p1 exited with {status}:\n{}",
        persister.logs_tail(30)
    );
    let left = pending_of(stack, "p1").await;
    assert_eq!(
        left,
        0,
        "p1 exited with {left} of the {held} entries it held at SIGTERM read and not acknowledged:\n{}",
        persister.logs_tail(30)
    );
    let rows = stack
        .db()
        .await
        .query("SELECT id FROM messages", &[])
        .await
        .expect("reading messages");
    let stored: HashSet<Uuid> = rows.iter().map(|r| r.get::<_, Uuid>(0)).collect();
    let queued = queued_message_ids(stack).await;
    eprintln!(
        "p1 held {held} entries at SIGTERM; stored {} messages; {} still queued",
        stored.len(),
        queued.len()
    );
    for id in ids {
        assert!(
            stored.contains(id) != queued.contains_key(id),
            "message {id}: stored {}, still queued {}",
            stored.contains(id),
            queued.contains_key(id)
        );
    }
    stored
}
