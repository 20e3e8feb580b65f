//! Queue entries an operator deletes by hand (`XDEL chat:queue <id>`) while
//! they are pending: each becomes one dead letter of class `deleted` in
//! `chat:dead`, counted in `persister_dead_letters_total{reason="deleted"}`,
//! whichever persister comes across it (docs/queue.md, "Failures and what
//! the persister does"). A takeover (XAUTOCLAIM) or a retry (XCLAIM) is the
//! only one to learn of it: Redis drops such an entry from the pending list
//! there. An entry that is gone because another persister stored it is not
//! one of them.
//!
//! Entries are messages sent through a gateway; PostgreSQL refuses a message
//! whose body holds `POISON` once a test adds the operator's rule
//! [`REFUSE_POISON`]. Each test prints what it saw (`--nocapture`).
//!
//! Also: `persister dead-letters replay` refuses a malformed `--id` before
//! it moves any letter.

use std::time::Duration;

use shared::queue::{DEAD_LETTERS, GROUP, STREAM};
use uuid::Uuid;

use crate::harness::{self, env, process, Persister, Stack, StackOptions};

/// A bound on what the persisters do by themselves (the waits end as soon
/// as it is done).
const WITHIN: Duration = Duration::from_secs(30);

/// What a persister records for an entry gone from the stream.
const DELETED_REASON: &str = "the entry was deleted from the stream while pending";

/// A rule that makes PostgreSQL refuse one message, as an operator might add.
const REFUSE_POISON: &str = "ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (body NOT LIKE '%POISON%') NOT VALID";

/// A refused entry is retried 2 s after its first refusal: time for the
/// test to act in between, never waited for as such.
const SLOW_RETRY: [(&str, &str); 2] = [("PERSISTER_RETRY_MS", "2000"), ("PERSISTER_RETRY_MAX_MS", "2000")];

/// A persister that takes over entries idle for 100 ms.
const QUICK_TAKEOVER: (&str, &str) = ("PERSISTER_CLAIM_IDLE_MS", "100");

/// Starts persister `name` beside the stack's, with `extra` env on top of
/// the stack's; its output shows with the others' when a test fails.
async fn start_persister(stack: &mut Stack, name: &str, extra: Vec<(String, String)>) {
    let mut penv = stack.persister_env(name);
    penv.extend(extra);
    stack.extra_persisters.push(Persister::start(name, penv).await);
}

fn message_id(ack: &serde_json::Value) -> Uuid {
    harness::canonical_uuid(&ack["id"], "the ack's message id")
}

/// Rows of message `id` in PostgreSQL.
async fn stored(stack: &Stack, id: Uuid) -> i64 {
    let client = stack.db().await;
    client
        .query_one("SELECT count(*) FROM messages WHERE id = $1", &[&id])
        .await
        .expect("counting a message's rows")
        .get(0)
}

/// The id in `chat:queue` of the entry of message `message`, if there is one.
async fn queue_entry_of(stack: &Stack, message: Uuid) -> Option<String> {
    let entries = stack.stream_entries(STREAM).await;
    let message = message.to_string();
    entries
        .into_iter()
        .find(|(_, fields)| fields.chunks(2).any(|kv| kv[0] == "id" && kv[1] == message))
        .map(|(id, _)| id)
}

/// One row of `XPENDING chat:queue persisters`.
#[derive(Debug)]
struct Pending {
    consumer: String,
    deliveries: u64,
}

/// Every entry delivered to a persister and not acknowledged, by id.
async fn pending(stack: &Stack) -> Vec<(String, Pending)> {
    let mut redis = stack.redis.connection().await;
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(1000)
        .query_async(&mut redis)
        .await
        .expect("XPENDING chat:queue persisters");
    rows.into_iter()
        .map(|(id, consumer, _, deliveries)| (id, Pending { consumer, deliveries }))
        .collect()
}

/// Deletes `entry` from `chat:queue` as an operator would (XDEL); returns
/// its delivery count at that instant (XPENDING in the same MULTI), `None`
/// when it was not pending.
async fn delete_by_hand(stack: &Stack, entry: &str) -> Option<u64> {
    let mut redis = stack.redis.connection().await;
    let (rows, deleted): (Vec<(String, String, u64, u64)>, u64) = redis::pipe()
        .atomic()
        .cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .arg(entry)
        .arg(entry)
        .arg(1)
        .cmd("XDEL")
        .arg(STREAM)
        .arg(entry)
        .query_async(&mut redis)
        .await
        .expect("XPENDING and XDEL");
    assert_eq!(deleted, 1, "XDEL chat:queue {entry} deleted nothing");
    rows.first().map(|row| row.3)
}

/// A dead letter: its leading fields, read by position.
#[derive(Debug)]
struct Letter {
    id: String,
    reason: String,
    class: String,
    source_id: String,
    /// Empty when the count is unknown.
    deliveries: String,
    /// The original entry's fields.
    original: Vec<String>,
}

/// Every entry of `chat:dead`, oldest first.
async fn dead_letters(stack: &Stack) -> Vec<Letter> {
    let entries = stack.stream_entries(DEAD_LETTERS).await;
    entries
        .into_iter()
        .map(|(id, mut fields)| {
            let names: Vec<&str> = fields.iter().step_by(2).take(4).map(String::as_str).collect();
            assert_eq!(
                names,
                ["reason", "class", "source_id", "deliveries"],
                "dead letter {id}: {fields:?}"
            );
            let original = fields.split_off(8);
            let mut values = fields.into_iter().skip(1).step_by(2);
            let mut next = || values.next().expect("four leading fields");
            Letter {
                reason: next(),
                class: next(),
                source_id: next(),
                deliveries: next(),
                id,
                original,
            }
        })
        .collect()
}

/// The dead letter of queue entry `entry`, once there is one.
async fn dead_letter_of(stack: &Stack, entry: &str) -> Option<Letter> {
    dead_letters(stack).await.into_iter().find(|l| l.source_id == entry)
}

/// What `persister`'s `/metrics` shows for `name`, once it is above zero.
async fn counted(stack: &Stack, persister: &Persister, name: &str, label: &str) -> f64 {
    let what = format!("{name}{{{label}}} above 0 on {}", persister.name);
    stack
        .eventually(&what, WITHIN, async || {
            let n = persister.metric(name, label).await;
            (n > 0.0).then_some(n)
        })
        .await
}

/// A `deleted` letter holds its metadata and nothing else.
fn assert_deleted_letter(letter: &Letter, entry: &str) {
    assert_eq!(letter.class, "deleted", "{letter:?}");
    assert_eq!(letter.source_id, entry, "{letter:?}");
    assert_eq!(letter.reason, DELETED_REASON, "{letter:?}");
    assert!(letter.original.is_empty(), "the entry's fields are gone: {letter:?}");
}

#[tokio::test]
async fn an_entry_deleted_while_another_persister_held_it_becomes_a_deleted_dead_letter() {
    // p1 keeps the default PERSISTER_CLAIM_IDLE_MS (30 s): it takes nothing
    // over from itself during the test.
    let mut stack = Stack::start_dedicated(StackOptions::default()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = stack.connect(0, alice).await;
    // Their private chat comes into being and is stored: the queue is empty.
    let first = message_id(&alice_ws.send_message_to(bob, "hello").await);
    stack
        .eventually("first message stored and the queue empty", WITHIN, async || {
            (stored(&stack, first).await == 1 && stack.queue_length().await == 0).then_some(())
        })
        .await;

    // PostgreSQL stops: p1 reads the next message and cannot store it, so
    // it stays pending to p1.
    stack.pg.as_ref().expect("a dedicated cluster").stop().await;
    let message = message_id(&alice_ws.send_message_to(bob, "held by p1").await);
    let (entry, held) = stack
        .eventually("p1 holding the message", WITHIN, async || {
            let entry = queue_entry_of(&stack, message).await?;
            let (_, held) = pending(&stack).await.into_iter().find(|(id, _)| *id == entry)?;
            Some((entry, held))
        })
        .await;
    // p1 dies with it in hand (SIGKILL), and an operator deletes it.
    stack.persister.as_mut().expect("p1").kill().await;
    let deliveries_at_delete = delete_by_hand(&stack, &entry).await;

    // p2 starts and takes over what p1 left (XAUTOCLAIM); PostgreSQL returns.
    start_persister(&mut stack, "p2", env(&[QUICK_TAKEOVER])).await;
    stack.pg.as_ref().expect("a dedicated cluster").start().await;
    let letter = stack
        .eventually("dead letter for the deleted entry", WITHIN, async || {
            dead_letter_of(&stack, &entry).await
        })
        .await;
    let p2 = &stack.extra_persisters[0];
    let deleted = counted(&stack, p2, "persister_dead_letters_total", "reason=\"deleted\"").await;
    let letters = dead_letters(&stack).await;
    let left = pending(&stack).await;

    println!(
        "takeover: entry {entry} (message {message}) held by {} at {} deliveries; p1 killed, entry deleted by \
         hand at {deliveries_at_delete:?} deliveries; p2 wrote dead letter {} class {} source_id {} deliveries \
         {:?}; chat:dead holds {}; p2 counts persister_dead_letters_total{{reason=\"deleted\"}} {deleted}; \
         pending after: {}",
        held.consumer,
        held.deliveries,
        letter.id,
        letter.class,
        letter.source_id,
        letter.deliveries,
        letters.len(),
        left.len(),
    );
    assert!(
        held.consumer == "p1" || held.consumer.starts_with("p1/"),
        "the test's premise: p1 held the entry, not {held:?}"
    );
    assert_deleted_letter(&letter, &entry);
    assert_eq!(
        letter.deliveries, "",
        "Redis dropped the delivery count with the pending entry"
    );
    assert_eq!(letters.len(), 1, "one dead letter, and only one: {letters:?}");
    assert_eq!(deleted, 1.0, "p2 counts one `deleted` dead letter");
    assert!(left.is_empty(), "nothing is left pending: {left:?}");
    assert_eq!(stored(&stack, message).await, 0, "a deleted entry is not stored");
}

#[tokio::test]
async fn an_entry_deleted_while_waiting_for_its_retry_becomes_a_deleted_dead_letter() {
    let stack = Stack::start(StackOptions {
        env: env(&SLOW_RETRY),
        ..StackOptions::default()
    })
    .await;
    stack.sql(REFUSE_POISON).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = stack.connect(0, alice).await;
    let message = message_id(&alice_ws.send_message_to(bob, "POISON").await);

    // PostgreSQL refuses the message: p1 keeps it pending for a retry ...
    let p1 = stack.persister.as_ref().expect("p1");
    let entry = stack
        .eventually("p1 refusing the message", WITHIN, async || {
            if p1.metric("persister_retries_total", "").await < 1.0 {
                return None;
            }
            queue_entry_of(&stack, message).await
        })
        .await;
    // ... and an operator deletes it before p1 retries it (XCLAIM).
    let deliveries_at_delete = delete_by_hand(&stack, &entry).await;

    let letter = stack
        .eventually("dead letter for the deleted entry", WITHIN, async || {
            dead_letter_of(&stack, &entry).await
        })
        .await;
    let deleted = counted(&stack, p1, "persister_dead_letters_total", "reason=\"deleted\"").await;
    let retries = p1.metric("persister_retries_total", "").await;
    let letters = dead_letters(&stack).await;
    let left = pending(&stack).await;

    println!(
        "retry: entry {entry} (message {message}) refused by p1, deleted by hand at {deliveries_at_delete:?} \
         deliveries; p1's retry wrote dead letter {} class {} source_id {} deliveries {:?}; chat:dead holds {}; \
         p1 counts {retries} retries and persister_dead_letters_total{{reason=\"deleted\"}} {deleted}; pending \
         after: {}",
        letter.id,
        letter.class,
        letter.source_id,
        letter.deliveries,
        letters.len(),
        left.len(),
    );
    assert_eq!(
        deliveries_at_delete,
        Some(1),
        "the test's premise: deleted after its first refusal and before its retry"
    );
    assert_deleted_letter(&letter, &entry);
    assert_eq!(letter.deliveries, "1", "read once, refused once, then deleted");
    assert_eq!(letters.len(), 1, "one dead letter, and only one: {letters:?}");
    assert_eq!(deleted, 1.0, "p1 counts one `deleted` dead letter");
    assert_eq!(retries, 1.0, "the retry found the entry deleted: no second refusal");
    assert!(left.is_empty(), "nothing is left pending: {left:?}");
    assert_eq!(stored(&stack, message).await, 0, "a deleted entry is not stored");
}

/// The line p1 logs (at debug) for each retry: `retrying refused entries
/// asked=N got=N deleted=N`.
const RETRY_LOG: &str = "retrying refused entries";

#[tokio::test]
async fn an_entry_another_persister_stored_while_it_waited_for_its_retry_is_not_dead_lettered() {
    let mut stack = Stack::start(StackOptions {
        persister: false,
        env: env(&SLOW_RETRY),
        ..StackOptions::default()
    })
    .await;
    // p1 logs its retries, so the test sees the one that matters happen.
    let filter = format!(
        "{},persister::worker=debug",
        harness::test_log().unwrap_or_else(|| "warn".into())
    );
    let mut p1_env = stack.persister_env("p1");
    p1_env.push(("RUST_LOG".into(), filter));
    stack.persister = Some(Persister::start("p1", p1_env).await);
    stack.sql(REFUSE_POISON).await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = stack.connect(0, alice).await;
    let message = message_id(&alice_ws.send_message_to(bob, "POISON").await);

    // PostgreSQL refuses the message: p1 keeps it pending for a retry, and
    // is stopped (SIGSTOP) before the retry, so what follows comes first.
    let p1 = stack.persister.as_ref().expect("p1");
    let (entry, refused) = stack
        .eventually("p1 refusing the message", WITHIN, async || {
            if p1.metric("persister_retries_total", "").await < 1.0 {
                return None;
            }
            let entry = queue_entry_of(&stack, message).await?;
            let (_, refused) = pending(&stack).await.into_iter().find(|(id, _)| *id == entry)?;
            Some((entry, refused))
        })
        .await;
    p1.signal(libc::SIGSTOP);

    // The operator lifts the rule; p2 takes the entry over and stores it
    // (acknowledged and deleted from the stream).
    stack.sql("ALTER TABLE messages DROP CONSTRAINT no_poison").await;
    start_persister(&mut stack, "p2", env(&[QUICK_TAKEOVER])).await;
    stack
        .eventually("p2 storing the message and the queue empty", WITHIN, async || {
            let done = stored(&stack, message).await == 1 && stack.queue_length().await == 0;
            (done && pending(&stack).await.is_empty()).then_some(())
        })
        .await;
    let p2 = &stack.extra_persisters[0];
    let p2_stored = counted(&stack, p2, "persister_jobs_stored_total", "kind=\"message\"").await;

    // p1 resumes: its retry finds the entry neither pending nor in the
    // stream. Then it stops (SIGTERM), writing any letter it holds first.
    let p1 = stack.persister.as_ref().expect("p1");
    p1.signal(libc::SIGCONT);
    let retry = stack
        .eventually("p1's retry after the takeover", WITHIN, async || {
            let logs = p1.logs();
            let line = logs.lines().find(|l| l.contains(RETRY_LOG) && l.contains("got=0"))?;
            Some(line[line.find(RETRY_LOG).expect("found above")..].to_string())
        })
        .await;
    let status = stack.persister.as_mut().expect("p1").terminate(WITHIN).await;
    let letters = dead_letters(&stack).await;

    println!(
        "stored meanwhile: entry {entry} (message {message}) refused by {} at {} deliveries; p1 stopped, p2 took \
         it over and stored it (persister_jobs_stored_total{{kind=\"message\"}} {p2_stored}); p1 resumed and \
         logged `{retry}`, then exited ({status}); chat:dead holds {}",
        refused.consumer,
        refused.deliveries,
        letters.len(),
    );
    assert!(status.success(), "p1 exits 0 on SIGTERM: {status}");
    assert!(letters.is_empty(), "no dead letter for {entry}: {letters:?}");
    assert_eq!(stored(&stack, message).await, 1, "stored once");
    assert!(pending(&stack).await.is_empty(), "nothing is left pending");
}

#[tokio::test]
async fn a_replay_with_a_malformed_id_moves_nothing_and_says_why() {
    // Redis refuses a malformed stream id only when its turn comes: the
    // letters named before it were moved and the command failed without
    // saying so, and a rerun answered `missing` for them.
    let stack = Stack::start(StackOptions {
        persister: false,
        ..StackOptions::default()
    })
    .await;
    let mut redis = stack.redis.connection().await;
    let letter: String = redis::cmd("XADD")
        .arg(DEAD_LETTERS)
        .arg("*")
        .arg(&[
            ("reason", "refused by hand"),
            ("class", "refused"),
            ("source_id", "1-0"),
            ("deliveries", "5"),
            ("v", "1"),
            ("kind", "message"),
        ])
        .query_async(&mut redis)
        .await
        .expect("XADD a dead letter");
    let ops_env = env(&[("REDIS_URL", &stack.redis.url()), ("DATABASE_URL", stack.db_url())]);
    let text = |out: &std::process::Output| {
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let refused = process::run_persister(
        &["dead-letters", "replay", "--id", &letter, "--id", "typo"],
        ops_env.clone(),
    )
    .await;
    let (stdout, stderr) = text(&refused);
    println!("replay --id {letter} --id typo: {}\n{stdout}{stderr}", refused.status);
    assert!(!refused.status.success(), "a malformed id fails the command");
    assert!(
        stderr.contains("\"typo\" is not a dead-letter id") && stderr.contains("nothing was replayed"),
        "the refusal names the id: {stderr}"
    );
    assert_eq!(stdout, "", "nothing was replayed, so nothing is reported");
    let dead: Vec<String> = dead_letters(&stack).await.into_iter().map(|l| l.id).collect();
    assert_eq!(dead, vec![letter.clone()], "the letter is still dead");
    assert_eq!(stack.queue_length().await, 0, "nothing went to the queue");

    // Corrected, the same call replays it and reports a well-formed id it
    // does not hold.
    let replayed = process::run_persister(&["dead-letters", "replay", "--id", &letter, "--id", "0-1"], ops_env).await;
    let (stdout, stderr) = text(&replayed);
    assert!(replayed.status.success(), "{}: {stdout}{stderr}", replayed.status);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(lines[0].starts_with(&format!("replayed {letter} ")), "{stdout}");
    assert_eq!(lines[1], "missing 0-1");
    assert!(dead_letters(&stack).await.is_empty());
    assert_eq!(stack.queue_length().await, 1);
}

/// An entry that cannot be moved to the dead letters (here: not a job, and
/// with more fields than the dead-letter script can pass to one XADD) stays
/// pending and is tried again later, and the persister's only lane goes on
/// storing what comes after it instead of reading that entry again forever.
#[tokio::test]
async fn an_entry_that_cannot_be_dead_lettered_does_not_stop_the_lane_behind_it() {
    let mut stack = Stack::start(StackOptions {
        persister: false,
        ..StackOptions::default()
    })
    .await;
    start_persister(&mut stack, "p1", env(&[("PERSISTER_CONCURRENCY", "1")])).await;
    let mut redis = stack.redis.connection().await;
    stack
        .eventually("p1 to have made its consumer group", WITHIN, async || {
            let groups: redis::RedisResult<Vec<redis::Value>> = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(STREAM)
                .query_async(&mut redis)
                .await;
            groups.ok().filter(|g| !g.is_empty()).map(|_| ())
        })
        .await;
    let mut xadd = redis::cmd("XADD");
    xadd.arg(STREAM).arg("*");
    for i in 0..5_000 {
        xadd.arg(format!("f{i}")).arg("x");
    }
    let foreign: String = xadd.query_async(&mut redis).await.expect("XADD of a foreign entry");
    let tries = stack
        .eventually("p1 to have read the foreign entry", WITHIN, async || {
            pending(&stack)
                .await
                .into_iter()
                .find(|(id, _)| *id == foreign)
                .map(|(_, p)| p.deliveries)
        })
        .await;
    println!("the foreign entry {foreign} was delivered {tries} time(s)");

    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_ws = stack.connect(0, alice).await;
    let message = message_id(&alice_ws.send_message_to(bob, "after the foreign entry").await);
    stack
        .eventually("the message behind the foreign entry stored", WITHIN, async || {
            (stored(&stack, message).await == 1).then_some(())
        })
        .await;
    let failures = counted(
        &stack,
        &stack.extra_persisters[0],
        "persister_dead_letter_failures_total",
        "",
    )
    .await;
    println!("dead-letter moves that failed: {failures}");
    // Still pending, not lost, and tried again later (the retry's XCLAIM
    // raises its delivery count).
    let retried = stack
        .eventually("the foreign entry tried again", WITHIN, async || {
            let (_, p) = pending(&stack).await.into_iter().find(|(id, _)| *id == foreign)?;
            (p.deliveries > tries).then_some(p.deliveries)
        })
        .await;
    println!("the foreign entry is still pending, delivered {retried} time(s)");
}

/// A client may choose its message ids. The gateway refuses an id it still
/// remembers for another message, but that record expires
/// (`CHAT_IDEMPOTENCY_TTL_SECS`) and a Redis may lose it; a second message
/// under an id already stored is then acked. PostgreSQL's `ON CONFLICT (id)
/// DO NOTHING` would take it for a redelivery of the first and drop it
/// without a trace: it becomes a dead letter instead, saying why, and the
/// first message stays as it was.
#[tokio::test]
async fn a_second_message_under_a_stored_id_becomes_a_dead_letter_not_a_silent_drop() {
    second_message_under_one_id(false).await;
}

/// The same, with both messages waiting in the queue (the persister down
/// meanwhile), so that one batch holds both.
#[tokio::test]
async fn a_second_message_under_the_id_of_one_in_the_same_batch_becomes_a_dead_letter() {
    second_message_under_one_id(true).await;
}

async fn second_message_under_one_id(same_batch: bool) {
    let mut stack = Stack::start(StackOptions {
        persister: !same_batch,
        env: env(&[
            ("PERSISTER_MAX_DELIVERIES", "2"),
            ("PERSISTER_RETRY_MS", "100"),
            ("PERSISTER_RETRY_MAX_MS", "100"),
        ]),
        ..StackOptions::default()
    })
    .await;
    let (alice, bob, carol) = (harness::user(), harness::user(), harness::user());
    let id = Uuid::now_v7();
    let send = |to: Uuid, body: &str| serde_json::json!({ "type": "send", "to": to.to_string(), "body": body, "id": id.to_string() });

    let mut alice_ws = stack.connect(0, alice).await;
    let ack = alice_ws.request(send(carol, "alice's message")).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    if !same_batch {
        stack
            .eventually("alice's message stored", WITHIN, async || {
                (stored(&stack, id).await == 1).then_some(())
            })
            .await;
    }

    // The gateway's record of the id is gone (expired, or a Redis that lost it).
    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("msg:{id}"))
        .query_async(&mut redis)
        .await
        .expect("DEL");
    let mut bob_ws = stack.connect(0, bob).await;
    let ack = bob_ws.request(send(carol, "bob's message")).await;
    assert_eq!(ack["type"], "ack", "bob's send under the same id is acked: {ack}");
    if same_batch {
        stack.start_persister().await;
    }

    let letter = stack
        .eventually("bob's message dead-lettered", WITHIN, async || {
            dead_letters(&stack)
                .await
                .into_iter()
                .find(|l| l.original.iter().any(|f| f == "bob's message"))
        })
        .await;
    println!("bob's message: {letter:?}");
    assert!(letter.reason.contains("reused"), "{letter:?}");
    stack
        .eventually("alice's message stored", WITHIN, async || {
            (stored(&stack, id).await == 1).then_some(())
        })
        .await;
    let client = stack.db().await;
    let row = client
        .query_one("SELECT sender, body FROM messages WHERE id = $1", &[&id])
        .await
        .expect("the stored message");
    let (sender, body): (Uuid, String) = (row.get(0), row.get(1));
    assert_eq!((sender, body.as_str()), (alice, "alice's message"));
}
