//! The fault suite (issue 4: nothing lost, nothing stored twice). Each test
//! sends a known set of messages, with ids chosen by the clients, while a
//! fault happens: a persister killed, PostgreSQL stopped, Redis restarted, a
//! gateway killed, a message PostgreSQL refuses. Clients behave as the
//! contract asks: a send answered `unavailable`, or lost with its
//! connection, is sent again with the same `id`, through another gateway if
//! need be, until it is acked. Then the test waits for the persisters to
//! drain the queue and checks that PostgreSQL holds every acked message
//! exactly once, with the chat and seq of its ack, and nothing else. Each
//! prints `sent, acked, stored, duplicated, lost` (`--nocapture` shows it).

mod traffic;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use self::traffic::{queue_state, wait_until_stored, Figures, Ledger, Planned, Sender, Target, Traffic};
use crate::harness::{self, env, process, Api, Client, Stack, StackOptions};

/// How long the persisters may take to store everything once the fault is
/// over (a bound, not a measure: the wait ends as soon as they are done).
const DRAIN: Duration = Duration::from_secs(60);
/// Messages each of the four senders sends.
const PER_SENDER: usize = 250;

/// The people of a run. Ann and Bob write to a group of the five; Dan and
/// Eve write to Carol privately. Carol only reads.
struct Cast {
    ann: Uuid,
    bob: Uuid,
    carol: Uuid,
    dan: Uuid,
    eve: Uuid,
    group: Uuid,
}

impl Cast {
    async fn new(stack: &Stack) -> Cast {
        let [ann, bob, carol, dan, eve] = [(); 5].map(|_| harness::user());
        let (status, created) = stack
            .http(0)
            .create_chat(ann, "faults", "public", &[bob, carol, dan, eve])
            .await;
        assert_eq!(status, 201, "creating the group: {created}");
        let group = harness::canonical_uuid(&created["id"], "the group's id");
        Cast {
            ann,
            bob,
            carol,
            dan,
            eve,
            group,
        }
    }

    /// The four senders, `per_sender` messages each; with two gateways Ann
    /// and Dan start on gateway 0, Bob and Eve on gateway 1.
    fn senders(&self, stack: &Stack, per_sender: usize, tag: &str) -> Vec<Sender> {
        let home = |i: usize| i % stack.gateways.len();
        vec![
            Sender::new(
                stack,
                home(0),
                self.ann,
                Target::Chat(self.group),
                per_sender,
                &format!("{tag} ann"),
            ),
            Sender::new(
                stack,
                home(1),
                self.bob,
                Target::Chat(self.group),
                per_sender,
                &format!("{tag} bob"),
            ),
            Sender::new(
                stack,
                home(0),
                self.dan,
                Target::To(self.carol),
                per_sender,
                &format!("{tag} dan"),
            ),
            Sender::new(
                stack,
                home(1),
                self.eve,
                Target::To(self.carol),
                per_sender,
                &format!("{tag} eve"),
            ),
        ]
    }

    /// The chats Carol reads: the group and her two private chats.
    fn chats(&self) -> [(&'static str, Uuid); 3] {
        [
            ("the group", self.group),
            ("Dan's private chat", harness::private_chat(self.dan, self.carol)),
            ("Eve's private chat", harness::private_chat(self.eve, self.carol)),
        ]
    }
}

/// Entries the group's consumer `consumer` has read and not acknowledged.
async fn pending_of(stack: &Stack, consumer: &str) -> usize {
    let mut redis = stack.redis.connection().await;
    let entries: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(shared::queue::STREAM)
        .arg(shared::queue::GROUP)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .arg(consumer)
        .query_async(&mut redis)
        .await
        .expect("XPENDING");
    entries.len()
}

#[tokio::test]
async fn a_persister_killed_mid_run_leaves_its_jobs_to_the_other_and_every_acked_message_is_stored_once() {
    // No linger: between batches a lane then waits in XREADGROUP, which Redis
    // serves even while the process is stopped, so the kill below reliably
    // catches entries in hand. With the linger a lane sleeps between batches
    // instead and the run is over before a stop lands mid-write; a lane
    // killed while it lingers holds nothing (its last batch is acked).
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        env: env(&[("PERSISTER_CLAIM_IDLE_MS", "2000"), ("PERSISTER_LINGER_MS", "0")]),
        ..StackOptions::default()
    })
    .await;
    let cast = Cast::new(&stack).await;
    let mut senders = cast.senders(&stack, PER_SENDER, "persister-kill");
    for sender in &mut senders {
        sender.interval = Duration::from_millis(4);
    }
    let traffic = Traffic::start(senders);
    traffic.wait_acked(traffic.planned() / 3).await;

    // Kill p1 with jobs in hand: stop it (SIGSTOP) until it holds read but
    // unacknowledged entries (a read it was blocked in is still served while
    // it is stopped), then SIGKILL. If it holds none, let it go on and try
    // again a moment later. p1 consumes alone until then: with a second
    // persister running, Redis may hand every new entry to the second's
    // blocked reads, and the run (about a second) could end before p1 was
    // caught holding any. The second starts once p1 is dead, as a
    // replacement would, and finds p1's entries pending.
    let name = stack.persister.as_ref().expect("p1").name.clone();
    let tried_until = Instant::now() + Duration::from_secs(10);
    let held = loop {
        stack.persister.as_ref().expect("p1").signal(libc::SIGSTOP);
        let until = Instant::now() + Duration::from_millis(300);
        let mut held = pending_of(&stack, &name).await;
        while held == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
            held = pending_of(&stack, &name).await;
        }
        if held > 0 || Instant::now() >= tried_until || traffic.is_finished() {
            stack.persister.as_mut().expect("p1").kill().await;
            break pending_of(&stack, &name).await;
        }
        stack.persister.as_ref().expect("p1").signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(7)).await;
    };
    let acked_at_kill = traffic.progress.acked();
    let planned = traffic.planned();
    stack.start_extra_persister().await;

    let ledger = traffic.finish().await;
    let rows = wait_until_stored(&stack, &ledger, &HashSet::new(), DRAIN).await;
    println!(
        "persister killed: {name} got SIGKILL at {acked_at_kill} of {planned} acked, holding {held} unacked \
         entries; {} claimed them after PERSISTER_CLAIM_IDLE_MS",
        stack.extra_persisters[0].name
    );
    let figures = Figures::of(&ledger, &rows, &HashSet::new());
    figures.assert_exactly_once("persister killed", &ledger, &stack);
    assert!(
        held > 0,
        "the test's premise: {name} was killed holding no unacknowledged entries"
    );
    assert!(
        acked_at_kill < planned,
        "the test's premise: the kill came after the run"
    );
}

#[tokio::test]
async fn while_postgresql_is_down_sends_are_acked_and_queued_and_all_are_stored_once_when_it_returns() {
    let stack = Stack::start_dedicated(StackOptions {
        gateways: 2,
        ..StackOptions::default()
    })
    .await;
    let cast = Cast::new(&stack).await;
    let mut senders = cast.senders(&stack, 300, "postgres-down");
    for sender in &mut senders {
        sender.interval = Duration::from_millis(15);
    }
    let traffic = Traffic::start(senders);
    let planned = traffic.planned();
    traffic.wait_acked(planned / 4).await;

    let pg = stack.pg.as_ref().expect("a dedicated cluster");
    pg.stop().await;
    let stopped = Instant::now();
    let acked_at_stop = traffic.progress.acked();
    // Down for several seconds, and for at least a fifth of the run.
    while (stopped.elapsed() < Duration::from_secs(3) || traffic.progress.acked() < acked_at_stop + planned / 5)
        && !traffic.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked_while_down = traffic.progress.acked() - acked_at_stop;
    let backlog = queue_state(&stack).await.length;
    let down_for = stopped.elapsed();
    pg.start().await;

    let ledger = traffic.finish().await;
    let rows = wait_until_stored(&stack, &ledger, &HashSet::new(), DRAIN).await;
    println!(
        "postgres down: stopped at {acked_at_stop} of {planned} acked for {down_for:.1?}; {acked_while_down} \
         sends acked meanwhile; the queue held {backlog} jobs when it came back"
    );
    let figures = Figures::of(&ledger, &rows, &HashSet::new());
    figures.assert_exactly_once("postgres down", &ledger, &stack);
    assert!(
        acked_while_down > 0,
        "no send was acked while PostgreSQL was down ({down_for:?})"
    );
    assert!(backlog > 0, "the queue held nothing when PostgreSQL came back");
}

#[tokio::test]
async fn a_redis_restart_mid_run_refuses_sends_meanwhile_and_loses_no_acked_message() {
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        redis_aof: true,
        ..StackOptions::default()
    })
    .await;
    let cast = Cast::new(&stack).await;
    let traffic = Traffic::start(cast.senders(&stack, PER_SENDER, "redis-restart"));
    let planned = traffic.planned();
    traffic.wait_acked(planned / 3).await;

    let acked_at_stop = traffic.progress.acked();
    let refused_before = traffic.progress.unavailable();
    stack.redis.stop().await;
    // Down for a few rounds of refused sends (each sender retries every
    // 100 ms), 10 s at most.
    let until = Instant::now() + Duration::from_secs(10);
    while traffic.progress.unavailable() < refused_before + 16 && Instant::now() < until && !traffic.is_finished() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stack.redis.restart().await;
    let refused_while_down = traffic.progress.unavailable() - refused_before;

    let ledger = traffic.finish().await;
    let rows = wait_until_stored(&stack, &ledger, &HashSet::new(), DRAIN).await;
    println!(
        "redis restart: stopped at {acked_at_stop} of {planned} acked; {refused_while_down} sends refused with \
         `unavailable` while down, {} refused in all, {} sent again with the same id, {} reconnects",
        traffic_count(&ledger, "unavailable"),
        traffic_count(&ledger, "resent"),
        traffic_count(&ledger, "reconnects"),
    );
    let mut seqs: Vec<i64> = ledger.acked_in(cast.group).into_values().collect();
    seqs.sort_unstable();
    if let Some(jump) = seqs.windows(2).max_by_key(|w| w[1] - w[0]) {
        println!("redis restart: the group's seq jumped from {} to {}", jump[0], jump[1]);
    }
    let figures = Figures::of(&ledger, &rows, &HashSet::new());
    figures.assert_exactly_once("redis restart", &ledger, &stack);
    assert!(
        refused_while_down > 0,
        "no send was refused with `unavailable` while Redis was down"
    );
}

/// The counters of a finished run, kept in the ledger's progress snapshot.
fn traffic_count(ledger: &Ledger, what: &str) -> usize {
    ledger.counters.get(what).copied().unwrap_or_default()
}

#[tokio::test]
async fn a_gateway_killed_mid_run_loses_nothing_acked_and_its_clients_catch_up_from_history() {
    let mut stack = Stack::start(StackOptions {
        gateways: 2,
        ..StackOptions::default()
    })
    .await;
    let cast = Cast::new(&stack).await;
    // Carol reads on gateway 0, with Ann and Dan; Bob and Eve are on 1.
    let carol = stack.connect(0, cast.carol).await;
    let (stop_reading, stop) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(read_live(
        carol,
        stack.gateways[1].ws_url(),
        stack.token(cast.carol),
        stop,
    ));
    let traffic = Traffic::start(cast.senders(&stack, PER_SENDER, "gateway-kill"));
    let planned = traffic.planned();
    traffic.wait_acked(planned / 3).await;

    // Kill it with sends in flight: stop it (SIGSTOP) until its clients
    // have sends unanswered (some it may have read and passed to Redis
    // already), then SIGKILL.
    let gateway = stack.gateways[0].name.clone();
    stack.gateways[0].signal(libc::SIGSTOP);
    let until = Instant::now() + Duration::from_secs(2);
    while traffic.progress.in_flight() < 8 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let in_flight = traffic.progress.in_flight();
    stack.gateways[0].kill().await;
    let acked_at_kill = traffic.progress.acked();

    let ledger = traffic.finish().await;
    let rows = wait_until_stored(&stack, &ledger, &HashSet::new(), DRAIN).await;
    let _ = stop_reading.send(());
    let reading = reader.await.expect("Carol's reader");
    println!(
        "gateway killed: {gateway} got SIGKILL at {acked_at_kill} of {planned} acked, {in_flight} sends in \
         flight; {} sent again with the same id, {} reconnects",
        traffic_count(&ledger, "resent"),
        traffic_count(&ledger, "reconnects"),
    );
    let figures = Figures::of(&ledger, &rows, &HashSet::new());
    figures.assert_exactly_once("gateway killed", &ledger, &stack);
    assert!(
        acked_at_kill < planned,
        "the test's premise: the kill came after the run"
    );
    assert!(
        traffic_count(&ledger, "resent") > 0,
        "the test's premise: no send was in flight when the gateway died"
    );

    // Carol catches up: for each chat, history `after` the last message she
    // saw live before her gateway died holds every acked message since,
    // once each, in seq order.
    assert!(reading.reconnected, "Carol's connection outlived the gateway it was on");
    let api = stack.http(1);
    let mut caught_up = 0;
    for (what, chat) in cast.chats() {
        let acked = ledger.acked_in(chat);
        let last = reading.before_kill.iter().rev().find(|m| m["chat"] == chat.to_string());
        let (history, last_seq) = match last {
            Some(last) => {
                let id = last["id"].as_str().expect("message.id");
                (
                    history_after(&api, cast.carol, chat, id).await,
                    last["seq"].as_i64().expect("seq"),
                )
            }
            None => {
                let (status, all) = api.history_all(cast.carol, chat).await;
                assert_eq!(status, 200, "history of {what}");
                (all, 0)
            }
        };
        let expected: HashSet<Uuid> = acked
            .iter()
            .filter(|(_, seq)| **seq > last_seq)
            .map(|(id, _)| *id)
            .collect();
        let got: Vec<Uuid> = history
            .iter()
            .map(|m| harness::canonical_uuid(&m["id"], "id"))
            .collect();
        let distinct: HashSet<Uuid> = got.iter().copied().collect();
        let missing = expected.difference(&distinct).count();
        let extra = distinct.difference(&expected).count();
        println!(
            "gateway killed: Carol saw {} message(s) of {what} live before the kill (last seq {last_seq}); \
             history after it holds {}, missing {missing}, extra {extra}, repeated {}",
            reading
                .before_kill
                .iter()
                .filter(|m| m["chat"] == chat.to_string())
                .count(),
            got.len(),
            got.len() - distinct.len()
        );
        assert_eq!(
            (missing, extra, got.len() - distinct.len()),
            (0, 0, 0),
            "Carol's catch-up of {what} from history after seq {last_seq}"
        );
        let seqs: Vec<i64> = history.iter().map(|m| m["seq"].as_i64().expect("seq")).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "history of {what} is not in seq order"
        );
        caught_up += got.len();
    }
    assert!(
        reading.before_kill.iter().any(|m| m["chat"] == cast.group.to_string()),
        "the test's premise: Carol saw group messages live before the kill"
    );
    println!(
        "gateway killed: Carol caught up {caught_up} message(s) from history; {} arrived live on the other \
         gateway",
        reading.after_reconnect
    );
}

/// What Carol read live.
struct Reading {
    /// Messages received before her connection ended.
    before_kill: Vec<Value>,
    /// Whether her connection ended and she reconnected elsewhere.
    reconnected: bool,
    /// Messages received live after reconnecting.
    after_reconnect: usize,
}

/// Reads messages on `client` until `stop`; when the connection ends,
/// reconnects through `fallback` and goes on reading.
async fn read_live(
    mut client: Client,
    fallback: String,
    token: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Reading {
    let mut reading = Reading {
        before_kill: Vec::new(),
        reconnected: false,
        after_reconnect: 0,
    };
    while stop.try_recv().is_err() {
        let Some(event) = client.try_next_event(Duration::from_millis(100)).await else {
            continue;
        };
        match event["type"].as_str() {
            Some("message") if reading.reconnected => reading.after_reconnect += 1,
            Some("message") => reading.before_kill.push(event),
            Some("__close") => {
                assert!(!reading.reconnected, "Carol's second connection ended too: {event}");
                let until = Instant::now() + Duration::from_secs(15);
                client = loop {
                    match Client::connect(&fallback, Some(&token), false).await {
                        Ok(client) => break client,
                        Err(e) if Instant::now() >= until => panic!("Carol cannot reconnect: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                reading.reconnected = true;
            }
            _ => {}
        }
    }
    reading
}

/// `chat`'s history after message `after`, oldest first, 500 per page.
async fn history_after(api: &Api, user: Uuid, chat: Uuid, after: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    let mut cursor = after.to_string();
    loop {
        let query = format!("after={cursor}&limit=500");
        let (status, body) = api.history(user, chat, &query).await;
        assert_eq!(status, 200, "history?{query}: {body}");
        let page = body["messages"].as_array().expect("messages").clone();
        let Some(last) = page.last() else {
            return all;
        };
        cursor = last["id"].as_str().expect("id").to_string();
        all.extend(page);
    }
}

#[tokio::test]
async fn a_message_postgresql_refuses_goes_to_the_dead_letters_and_is_stored_once_when_replayed() {
    let stack = Stack::start(StackOptions {
        gateways: 1,
        env: env(&[("PERSISTER_MAX_DELIVERIES", "3"), ("PERSISTER_CLAIM_IDLE_MS", "500")]),
        ..StackOptions::default()
    })
    .await;
    // What makes the database refuse one row: a rule added by an operator.
    stack
        .sql("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (body NOT LIKE '%POISON%') NOT VALID")
        .await;
    let cast = Cast::new(&stack).await;
    let mut senders: Vec<Sender> = cast.senders(&stack, 150, "poison").into_iter().take(2).collect();
    for sender in &mut senders {
        sender.interval = Duration::from_millis(2);
    }
    let poison = Uuid::new_v4();
    senders[0].messages[75] = Planned {
        id: poison,
        body: format!("POISON {poison}"),
    };
    let ledger = Traffic::start(senders).finish().await;
    assert!(ledger.acks.contains_key(&poison), "the poison message was not acked");
    let only_poison = HashSet::from([poison]);

    // The good ones are stored while the poison message is refused...
    let deadline = Instant::now() + DRAIN;
    let good = loop {
        let rows = traffic::stored_messages(&stack).await;
        let stored: HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
        let all_good = ledger.acks.keys().all(|id| *id == poison || stored.contains(id));
        if all_good || Instant::now() >= deadline {
            break rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Figures::of(&ledger, &good, &only_poison).assert_exactly_once("poison, the good messages", &ledger, &stack);
    // ... and it ends in the dead letters after the retry limit, with
    // nothing left pending.
    let letter = wait_for_dead_letter(&stack, poison, Duration::from_secs(30)).await;
    let rows = wait_until_stored(&stack, &ledger, &only_poison, DRAIN).await;
    let field = |name: &str| letter.get(name).map(String::as_str).unwrap_or("-").to_string();
    let reason: String = field("reason").chars().take(100).collect();
    println!(
        "poison: {poison} is dead letter {} of {} in chat:dead after {} deliveries, class {}, reason {reason:?}",
        field("__id"),
        queue_state(&stack).await.dead,
        field("deliveries"),
        field("class"),
    );
    let figures = Figures::of(&ledger, &rows, &only_poison);
    figures.assert_exactly_once("poison, dead-lettered", &ledger, &stack);
    assert!(
        rows.iter().all(|r| r.id != poison),
        "the poison message was stored despite the constraint"
    );

    // An operator lists the dead letters, fixes the cause, replays them.
    let ops_env = env(&[("REDIS_URL", &stack.redis.url()), ("DATABASE_URL", stack.db_url())]);
    let listed = process::run_persister(&["dead-letters", "list"], ops_env.clone()).await;
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success() && listing.contains(&poison.to_string()),
        "`persister dead-letters list` ({}) does not show {poison}:\n{listing}{}",
        listed.status,
        String::from_utf8_lossy(&listed.stderr)
    );
    stack.sql("ALTER TABLE messages DROP CONSTRAINT no_poison").await;
    let replayed = process::run_persister(&["dead-letters", "replay", "--all"], ops_env).await;
    assert!(
        replayed.status.success(),
        "`persister dead-letters replay --all` failed ({}):\n{}{}",
        replayed.status,
        String::from_utf8_lossy(&replayed.stdout),
        String::from_utf8_lossy(&replayed.stderr)
    );
    let rows = wait_until_stored(&stack, &ledger, &HashSet::new(), DRAIN).await;
    let figures = Figures::of(&ledger, &rows, &HashSet::new());
    figures.assert_exactly_once("poison, after the replay", &ledger, &stack);
}

/// Polls `chat:dead` until an entry holds the message `id`; its fields (and
/// its own id as `__id`). Fails after `timeout`.
async fn wait_for_dead_letter(stack: &Stack, id: Uuid, timeout: Duration) -> HashMap<String, String> {
    let id = id.to_string();
    let deadline = Instant::now() + timeout;
    loop {
        let mut redis = stack.redis.connection().await;
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(shared::queue::DEAD_LETTERS)
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .expect("XRANGE chat:dead");
        if let Some((entry, mut fields)) = entries.into_iter().find(|(_, f)| f.get("id") == Some(&id)) {
            fields.insert("__id".to_string(), entry);
            return fields;
        }
        if Instant::now() >= deadline {
            panic!(
                "message {id}, which PostgreSQL refuses, is not in {} after {timeout:?} \
                 (PERSISTER_MAX_DELIVERIES=3); the queue: {:?}\n{}",
                shared::queue::DEAD_LETTERS,
                queue_state(stack).await,
                stack.logs_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
