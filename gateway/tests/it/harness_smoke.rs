//! The harness itself works: Redis, PostgreSQL, and a whole stack start,
//! answer, stop and come back as the fault tests expect.

use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::client::ConnectError;
use crate::harness::{self, process, Client, Postgres, Redis, Stack, StackOptions, DEFAULT_TIMEOUT};

#[tokio::test]
async fn redis_answers_ping_and_keeps_data_across_a_restart_under_aof() {
    let mut redis = Redis::start_with(true).await;
    assert!(redis.ping().await);
    let mut conn = redis.connection().await;
    let _: () = ::redis::cmd("SET")
        .arg("k")
        .arg("kept")
        .query_async(&mut conn)
        .await
        .unwrap();

    redis.stop().await;
    assert!(!redis.ping().await, "redis still answers after stop()");
    redis.restart().await;

    let mut conn = redis.connection().await;
    let value: Option<String> = ::redis::cmd("GET").arg("k").query_async(&mut conn).await.unwrap();
    assert_eq!(value.as_deref(), Some("kept"));
}

#[tokio::test]
async fn redis_without_aof_starts_empty_after_a_restart() {
    let mut redis = Redis::start().await;
    let mut conn = redis.connection().await;
    let _: () = ::redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let port = redis.port();
    redis.restart().await;
    assert_eq!(redis.port(), port);
    let mut conn = redis.connection().await;
    let value: Option<String> = ::redis::cmd("GET").arg("k").query_async(&mut conn).await.unwrap();
    assert_eq!(value, None);
}

async fn has_messages_table(url: &str) -> bool {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT to_regclass('public.messages') IS NOT NULL", &[])
        .await
        .unwrap();
    row.get(0)
}

#[tokio::test]
async fn each_test_gets_its_own_migrated_database() {
    let pg = tokio::task::spawn_blocking(Postgres::shared).await.unwrap();
    let (a, b) = tokio::join!(pg.create_database(), pg.create_database());
    assert_ne!(a.name, b.name);
    assert!(!has_messages_table(&a.url).await);
    process::migrate(&a.url).await;
    assert!(has_messages_table(&a.url).await);
    assert!(!has_messages_table(&b.url).await, "databases are not separate");
}

#[tokio::test]
async fn a_dedicated_cluster_stops_and_starts_again() {
    let pg = Postgres::dedicated().await;
    let db = pg.create_database().await;
    process::migrate(&db.url).await;
    pg.stop().await;
    assert!(
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.is_err(),
        "PostgreSQL still accepts connections after stop()"
    );
    pg.start().await;
    assert!(has_messages_table(&db.url).await);
}

#[tokio::test]
async fn a_stack_starts_and_serves_a_message_end_to_end() {
    let stack = Stack::start(StackOptions {
        gateways: 2,
        persister: true,
        redis_aof: false,
        env: vec![],
        redis_over_unix_socket: false,
    })
    .await;
    serves_a_message_end_to_end(&stack).await;
}

/// scripts/up's stack: every process on one machine reaches Redis over its
/// unix socket.
#[tokio::test]
async fn a_stack_whose_processes_reach_redis_over_its_unix_socket_serves_a_message_end_to_end() {
    let stack = Stack::start(StackOptions {
        gateways: 2,
        redis_over_unix_socket: true,
        ..StackOptions::default()
    })
    .await;
    serves_a_message_end_to_end(&stack).await;
    // The persister took the message from the queue (it deletes an entry
    // once stored), so it too is connected.
    stack
        .eventually(
            "the persister to empty the queue",
            Duration::from_secs(10),
            async || (stack.queue_length().await == 0).then_some(()),
        )
        .await;

    // Every client of Redis but this test's own TCP connection (which asks)
    // came over the socket: commands, the bus and the persister's reads.
    let clients: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut stack.redis.connection().await)
        .await
        .expect("CLIENT LIST");
    // The test's own: this one, and those of the queue polls above, which
    // may not have closed yet.
    let the_tests_own = |l: &&str| l.contains("cmd=client|list") || l.contains("cmd=xlen");
    let on_tcp: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains("addr=127.0.0.1:") && !the_tests_own(l))
        .collect();
    let on_socket = clients.lines().filter(|l| l.contains("redis.sock")).count();
    assert!(
        on_tcp.is_empty(),
        "only the test's own connections are on TCP:\n{clients}"
    );
    assert!(on_socket >= 5, "two gateways and a persister on the socket:\n{clients}");
}

/// Two users on different gateways: a message is acked, delivered and
/// stored.
async fn serves_a_message_end_to_end(stack: &Stack) {
    let (status, _) = stack.http(0).get_text("/healthz").await;
    assert_eq!(status, 200);

    let (alice, bob) = (harness::user(), harness::user());
    assert_eq!(stack.try_connect_raw(0, None).await.err(), Some(401));
    let mut a = stack.connect(0, alice).await;
    let mut b = stack.connect(1, bob).await;
    a.ping().await;
    b.ping().await;

    let ack = a.send_message_to(bob, "hello").await;
    let message = b.expect("message", DEFAULT_TIMEOUT).await;
    assert_eq!(message["id"], ack["id"]);
    assert_eq!(message["body"], json!("hello"));

    let chat = harness::private_chat(alice, bob);
    assert_eq!(ack["chat"], json!(chat.to_string()));
    let history = stack.wait_for_history(bob, chat, 1, Duration::from_secs(10)).await;
    assert_eq!(history[0]["id"], ack["id"]);
}

#[tokio::test]
async fn processes_stop_on_sigterm_or_sigkill_and_are_replaced() {
    let mut stack = Stack::start(StackOptions {
        gateways: 1,
        persister: true,
        redis_aof: false,
        env: vec![],
        redis_over_unix_socket: false,
    })
    .await;
    let user = harness::user();
    let mut client = stack.connect(0, user).await;
    client.ping().await;

    let status = stack.gateways[0].terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "gateway exited with {status}");
    let closed = client.expect("__close", DEFAULT_TIMEOUT).await;
    assert!(closed["code"].is_u64(), "{closed}");
    assert!(!stack.gateways[0].is_running());

    stack.restart_gateway(0).await;
    assert_eq!(stack.gateways[0].name, "gw2");
    let mut client = stack.connect(0, user).await;
    client.ping().await;

    let persister = stack.persister.as_mut().unwrap();
    let status = persister.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "persister exited with {status}");
    stack.start_persister().await;
    assert_eq!(stack.persister.as_ref().unwrap().name, "p2");

    stack.gateways[0].kill().await;
    assert!(stack.gateways[0].try_exit().is_some());
    let refused = Client::connect(&stack.gateways[0].ws_url(), None, false).await;
    assert!(matches!(refused, Err(ConnectError::Transport(_))));
}

#[tokio::test]
async fn wait_for_history_pages_past_the_apis_500_per_request() {
    let stack = Stack::start(StackOptions::default()).await;
    let user = harness::user();
    let mut client = stack.connect(0, user).await;
    let total = 520;
    for i in 0..total {
        client
            .send_json(
                json!({ "type": "send", "to": user.to_string(), "body": format!("m{i}"), "ref": format!("{i}") }),
            )
            .await;
    }
    let mut acks = client.expect_n("ack", total, DEFAULT_TIMEOUT).await;
    acks.sort_by_key(|a| a["seq"].as_i64());
    let chat = harness::private_chat(user, user);
    let history = stack.wait_for_history(user, chat, total, Duration::from_secs(20)).await;
    assert_eq!(history.len(), total);
    let ids: Vec<&Value> = history.iter().map(|m| &m["id"]).collect();
    let acked: Vec<&Value> = acks.iter().map(|a| &a["id"]).collect();
    assert_eq!(ids, acked, "history is not the acked messages in seq order");
}
