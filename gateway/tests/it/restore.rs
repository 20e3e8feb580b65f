//! `persister restore-redis` (docs/operations.md, "Restoring Redis"):
//! after Redis lost every key, the chats come back from PostgreSQL, and the
//! service behaves as it did, in the contract's words: members send, others
//! are refused, chat lists and history are as before, and new messages
//! number after the stored ones.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{self, canonical_uuid, process, Api, Client, Stack, StackOptions, DEFAULT_TIMEOUT};

/// How long the persister may take to store what was sent.
const STORED: Duration = Duration::from_secs(15);
/// `CHAT_SEQ_RESTART_GAP`'s default.
const RESTART_GAP: i64 = 1_000_000;

async fn create_group(api: &Api, owner: Uuid, visibility: &str, members: &[Uuid]) -> Uuid {
    let (status, body) = api.create_chat(owner, "a group", visibility, members).await;
    assert_eq!(status, 201, "creating a {visibility} group: {body}");
    canonical_uuid(&body["id"], "the new chat's id")
}

/// (messages, chats, active memberships, inactive memberships) in PostgreSQL.
async fn stored(stack: &Stack) -> (i64, i64, i64, i64) {
    let (client, connection) = tokio_postgres::connect(stack.db_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM chats),
                    (SELECT count(*) FROM chat_members WHERE active),
                    (SELECT count(*) FROM chat_members WHERE NOT active)",
            &[],
        )
        .await
        .expect("counting stored rows");
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// Runs `persister restore-redis` against the stack; its summary line as
/// name → number. Fails the test if it fails.
async fn restore_redis(stack: &Stack) -> HashMap<String, f64> {
    let env = vec![
        ("REDIS_URL".to_string(), stack.redis.url()),
        ("DATABASE_URL".to_string(), stack.db_url().to_string()),
    ];
    let out = process::run_persister(&["restore-redis"], env).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`persister restore-redis` failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: HashMap<String, f64> = stdout
        .split_whitespace()
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect();
    assert!(summary.contains_key("chats_restored"), "no summary line in:\n{stdout}");
    summary
}

/// The count `name` of a summary.
fn count(summary: &HashMap<String, f64>, name: &str) -> u64 {
    summary[name] as u64
}

/// Every key but the queue's, with its serialized value (DUMP): what the
/// service's state in Redis is.
async fn redis_state(stack: &Stack) -> Vec<(String, Vec<u8>)> {
    let mut redis = stack.redis.connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(&mut redis).await.expect("KEYS");
    keys.retain(|k| k != "chat:queue");
    keys.sort();
    let mut state = Vec::with_capacity(keys.len());
    for key in keys {
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .expect("DUMP");
        state.push((key, dump));
    }
    state
}

/// `send` to a chat id; the reply (`ack` or `error`).
async fn send_to(client: &mut Client, chat: Uuid, body: &str) -> Value {
    client
        .request(json!({ "type": "send", "chat": chat.to_string(), "body": body }))
        .await
}

fn assert_refused(reply: &Value, code: &str, what: &str) {
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some(code)),
        "{what}: {reply}"
    );
}

fn seq(ack: &Value) -> i64 {
    ack["seq"].as_i64().unwrap_or_else(|| panic!("no seq in {ack}"))
}

/// (id, seq) of each message of a history, in its order.
fn positions(history: &[Value]) -> Vec<(String, i64)> {
    history
        .iter()
        .map(|m| (m["id"].as_str().expect("an id").to_string(), seq(m)))
        .collect()
}

#[tokio::test]
async fn after_a_flushall_restore_redis_brings_back_every_chat_from_postgresql() {
    let stack = Stack::start(StackOptions::default()).await;
    let api = stack.http(0);
    let (alice, bob, carol, dave) = (harness::user(), harness::user(), harness::user(), harness::user());

    // A public group (alice, bob), a private one (alice, carol; dave was
    // added and left), and the private chat of alice and bob.
    let public = create_group(&api, alice, "public", &[bob]).await;
    let private = create_group(&api, alice, "private", &[carol]).await;
    assert_eq!(api.add_member(alice, private, dave).await.0, 204);
    assert_eq!(api.remove_member(dave, private, dave).await.0, 204);
    let direct = harness::private_chat(alice, bob);

    let mut alice_ws = stack.connect(0, alice).await;
    let mut bob_ws = stack.connect(0, bob).await;
    let mut carol_ws = stack.connect(0, carol).await;
    let mut dave_ws = stack.connect(0, dave).await;
    alice_ws.send_to_chat(public, "public 1").await;
    bob_ws.send_to_chat(public, "public 2").await;
    alice_ws.send_to_chat(private, "private 1").await;
    carol_ws.send_to_chat(private, "private 2").await;
    carol_ws.send_to_chat(private, "private 3").await;
    alice_ws.send_message_to(bob, "direct 1").await;
    bob_ws.send_message_to(alice, "direct 2").await;

    stack
        .eventually("everything stored in PostgreSQL", STORED, async || {
            (stored(&stack).await == (7, 3, 4, 1)).then_some(())
        })
        .await;
    let mut lists = Vec::new();
    for user in [alice, bob, carol, dave] {
        let (status, list) = api.list_chats(user).await;
        assert_eq!(status, 200, "{list}");
        lists.push(list);
    }
    let chats = [(public, alice, 2), (private, carol, 3), (direct, bob, 2)];
    let mut histories = Vec::new();
    for (chat, member, n) in chats {
        histories.push(positions(&stack.wait_for_history(member, chat, n, STORED).await));
    }

    // Redis loses everything: groups are gone, lists are empty.
    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await.expect("FLUSHALL");
    assert_refused(
        &send_to(&mut alice_ws, public, "lost").await,
        "not_found",
        "a group after FLUSHALL",
    );
    assert_eq!(api.list_chats(bob).await.1, json!([]), "bob's chats after FLUSHALL");

    let summary = restore_redis(&stack).await;
    assert_eq!(
        (
            count(&summary, "chats_restored"),
            count(&summary, "chats_skipped"),
            count(&summary, "memberships"),
            count(&summary, "private_unrestored"),
        ),
        (3, 0, 4, 0),
        "first restore: {summary:?}"
    );

    // Chat lists are as they were.
    for (user, before) in [alice, bob, carol, dave].into_iter().zip(&lists) {
        let (status, list) = api.list_chats(user).await;
        assert_eq!(
            (status, &list),
            (200, before),
            "GET /v1/chats of {user} after the restore"
        );
    }

    // Members send again, each chat's seq jumping past every stored one as
    // after a Redis restart; others are refused.
    let ack = bob_ws.send_to_chat(public, "public 3").await;
    assert_eq!(seq(&ack), 2 + RESTART_GAP + 1, "{ack}");
    alice_ws
        .wait_for("public 3", DEFAULT_TIMEOUT, |e| e["body"] == "public 3")
        .await;
    assert_refused(
        &send_to(&mut carol_ws, public, "no").await,
        "forbidden",
        "carol in the public group",
    );
    assert_refused(
        &send_to(&mut dave_ws, private, "no").await,
        "forbidden",
        "dave, removed before the loss",
    );

    // A connection opened now is subscribed to the restored groups.
    let mut carol_again = stack.connect(0, carol).await;
    let ack = alice_ws.send_to_chat(private, "private 4").await;
    assert_eq!(seq(&ack), 3 + RESTART_GAP + 1, "{ack}");
    carol_again
        .wait_for("private 4", DEFAULT_TIMEOUT, |e| e["body"] == "private 4")
        .await;

    // The private chat works both ways, by user and by chat id; a third user
    // is refused.
    let ack = alice_ws.send_message_to(bob, "direct 3").await;
    assert_eq!(seq(&ack), 2 + RESTART_GAP + 1, "{ack}");
    bob_ws
        .wait_for("direct 3", DEFAULT_TIMEOUT, |e| e["body"] == "direct 3")
        .await;
    let ack = send_to(&mut bob_ws, direct, "direct 4").await;
    assert_eq!(
        (ack["type"].as_str(), seq(&ack)),
        (Some("ack"), 2 + RESTART_GAP + 2),
        "{ack}"
    );
    assert_refused(
        &send_to(&mut carol_ws, direct, "no").await,
        "forbidden",
        "carol in alice and bob's chat",
    );
    let (status, body) = api.history(carol, direct, "").await;
    assert_eq!(status, 403, "carol reading alice and bob's chat: {body}");

    // History holds every stored message, in order, then the new ones.
    for ((chat, member, n), before) in chats.into_iter().zip(&histories) {
        let after = positions(&stack.wait_for_history(member, chat, n + 1, STORED).await);
        assert_eq!(&after[..n], &before[..], "the stored history of {chat}");
        assert!(after.windows(2).all(|w| w[0].1 < w[1].1), "seqs of {chat}: {after:?}");
    }

    // A membership change jumps too (the restored mver has no run id), so
    // it outranks every stored version: dave's rejoin is stored as active
    // over his leave (versions: alice 1, carol 2, dave 3 and 4).
    assert_eq!(api.add_member(alice, private, dave).await.0, 204);
    let (client, connection) = tokio_postgres::connect(stack.db_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    stack
        .eventually("dave's rejoin stored", STORED, async || {
            let row = client
                .query_one(
                    "SELECT active, version FROM chat_members WHERE chat = $1 AND user_id = $2",
                    &[&private, &dave],
                )
                .await
                .expect("dave's membership row");
            let now: (bool, i64) = (row.get(0), row.get(1));
            (now == (true, 4 + RESTART_GAP + 1)).then_some(())
        })
        .await;

    // A second run finds every chat in Redis and changes nothing.
    stack
        .eventually("the new messages stored", STORED, async || {
            (stored(&stack).await.0 == 11).then_some(())
        })
        .await;
    let state = redis_state(&stack).await;
    let again = restore_redis(&stack).await;
    assert_eq!(
        (
            count(&again, "chats_restored"),
            count(&again, "chats_skipped"),
            count(&again, "chats_behind"),
            count(&again, "counters_only"),
        ),
        (0, 3, 0, 0),
        "second restore: {again:?}"
    );
    assert_eq!(redis_state(&stack).await, state, "Redis after a second restore");
}

#[tokio::test]
async fn a_private_chat_whose_row_was_lost_continues_above_its_stored_messages() {
    // The chat job of a private chat and its first message are separate
    // queue entries: the message may be stored while the chat job was lost
    // with Redis. The restore keeps the chat's seq counter, so its next
    // message (which creates the chat again) takes no stored seq.
    let stack = Stack::start(StackOptions::default()).await;
    let (alice, bob) = (harness::user(), harness::user());
    let direct = harness::private_chat(alice, bob);
    let mut alice_ws = stack.connect(0, alice).await;
    alice_ws.send_message_to(bob, "one").await;
    alice_ws.send_message_to(bob, "two").await;
    stack
        .eventually("both messages stored", STORED, async || {
            (stored(&stack).await.0 == 2).then_some(())
        })
        .await;
    let (client, connection) = tokio_postgres::connect(stack.db_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
        .execute("DELETE FROM chats WHERE id = $1", &[&direct])
        .await
        .expect("deleting the chat's row");

    let mut redis = stack.redis.connection().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await.expect("FLUSHALL");
    let summary = restore_redis(&stack).await;
    assert_eq!(
        (count(&summary, "chats_restored"), count(&summary, "counters_only")),
        (0, 1),
        "{summary:?}"
    );

    let ack = alice_ws.send_message_to(bob, "three").await;
    assert_eq!(seq(&ack), 2 + RESTART_GAP + 1, "{ack}");
    let history = positions(&stack.wait_for_history(bob, direct, 3, STORED).await);
    assert_eq!(
        history.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(),
        [1, 2, 2 + RESTART_GAP + 1]
    );
    stack
        .eventually("the chat's row stored again", STORED, async || {
            (stored(&stack).await.1 == 1).then_some(())
        })
        .await;
}
