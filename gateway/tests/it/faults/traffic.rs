//! Traffic for the fault tests, and the check of what PostgreSQL holds.
//!
//! A [`Sender`] is one user's client sending a known list of messages, each
//! with an `id` of its own, at a steady pace with a few sends in flight. It
//! behaves as the contract asks of a client: a send answered `unavailable`
//! is sent again with the same `id`; when the connection ends (its gateway
//! died), it reconnects, to another gateway if its own refuses, and sends
//! again every message that was not acked, with the same `id`. It stops when
//! everything is acked or at a deadline. What it sent and every `ack` it got
//! are recorded in a [`Ledger`].
//!
//! [`wait_until_stored`] waits for the persisters to drain the queue;
//! [`Figures`] compares PostgreSQL's `messages` with the ledger: every acked
//! message stored exactly once, with the `chat` and `seq` of its ack, and
//! nothing else.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shared::queue::{GROUP, STREAM};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::harness::{Client, Stack};

/// Sends one sender has in flight (sent, not yet answered) at most.
const WINDOW: usize = 16;
/// A live connection with sends in flight that says nothing for this long
/// is presumed dead: the sender drops it and reconnects.
const SILENCE: Duration = Duration::from_secs(10);
/// A sender gives up on what is still unacked this long after it started.
const SEND_DEADLINE: Duration = Duration::from_secs(90);
/// Wait before sending again a message answered `unavailable`.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Where a sender's messages go.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Private messages to this user.
    To(Uuid),
    /// Messages to this group.
    Chat(Uuid),
}

/// One message of the known set.
#[derive(Debug, Clone)]
pub struct Planned {
    pub id: Uuid,
    pub body: String,
}

/// What one sender sends, as whom, where, and through which gateways.
pub struct Sender {
    pub user: Uuid,
    pub token: String,
    pub target: Target,
    /// WebSocket URLs of the gateways: its own first, then the others it
    /// may reconnect through.
    pub gateways: Vec<String>,
    pub messages: Vec<Planned>,
    /// Time between two first sends.
    pub interval: Duration,
}

impl Sender {
    /// `count` messages from `user` to `target`, with fresh ids and bodies
    /// that name the test, the sender and the message's number. `home` is the
    /// index of the sender's own gateway in the stack.
    pub fn new(stack: &Stack, home: usize, user: Uuid, target: Target, count: usize, tag: &str) -> Sender {
        let mut gateways: Vec<String> = stack.gateways.iter().map(|g| g.ws_url()).collect();
        gateways.rotate_left(home);
        let messages = (0..count)
            .map(|n| {
                let id = Uuid::new_v4();
                Planned {
                    id,
                    body: format!("{tag} #{n} {id}"),
                }
            })
            .collect();
        Sender {
            user,
            token: stack.token(user),
            target,
            gateways,
            messages,
            interval: Duration::from_millis(8),
        }
    }

    fn send_event(&self, message: &Planned) -> Value {
        let mut event = json!({
            "type": "send",
            "body": message.body,
            "id": message.id.to_string(),
            "ref": message.id.to_string(),
        });
        match self.target {
            Target::To(user) => event["to"] = json!(user.to_string()),
            Target::Chat(chat) => event["chat"] = json!(chat.to_string()),
        }
        event
    }
}

/// Counters shared by the senders of one run, for the test to follow it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Distinct ids sent at least once.
    pub sent: AtomicUsize,
    /// Distinct ids acked.
    pub acked: AtomicUsize,
    /// Sends answered `unavailable`.
    pub unavailable: AtomicUsize,
    /// Sends made again with the same id (after `unavailable` or a lost connection).
    pub resent: AtomicUsize,
    /// Connections lost (and reconnected).
    pub reconnects: AtomicUsize,
    /// Sends not answered yet, on live connections.
    pub in_flight: AtomicUsize,
}

impl Progress {
    pub fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn unavailable(&self) -> usize {
        self.unavailable.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// What was sent and what was acked.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every id sent at least once, with its body.
    pub sent: HashMap<Uuid, String>,
    /// The `ack` of every acked id.
    pub acks: HashMap<Uuid, Value>,
    /// Replies and events the contract does not allow here.
    pub failures: Vec<String>,
    /// The run's [`Progress`] at its end, by name (`unavailable`, `resent`,
    /// `reconnects`).
    pub counters: HashMap<&'static str, usize>,
}

impl Ledger {
    /// The acked ids of `chat`, with their seq.
    pub fn acked_in(&self, chat: Uuid) -> HashMap<Uuid, i64> {
        let chat = json!(chat.to_string());
        self.acks
            .iter()
            .filter(|(_, ack)| ack["chat"] == chat)
            .map(|(id, ack)| (*id, ack["seq"].as_i64().expect("ack.seq")))
            .collect()
    }
}

/// A run of several senders at once.
pub struct Traffic {
    pub progress: Arc<Progress>,
    planned: usize,
    tasks: Vec<JoinHandle<Ledger>>,
}

impl Traffic {
    pub fn start(senders: Vec<Sender>) -> Traffic {
        let progress = Arc::new(Progress::default());
        let planned = senders.iter().map(|s| s.messages.len()).sum();
        let tasks = senders
            .into_iter()
            .map(|sender| tokio::spawn(run_sender(sender, progress.clone())))
            .collect();
        Traffic {
            progress,
            planned,
            tasks,
        }
    }

    pub fn planned(&self) -> usize {
        self.planned
    }

    /// Waits until `n` messages are acked (or every sender has stopped).
    pub async fn wait_acked(&self, n: usize) {
        while self.progress.acked() < n && !self.tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn is_finished(&self) -> bool {
        self.tasks.iter().all(|t| t.is_finished())
    }

    /// Waits for every sender to stop; the merged ledger.
    pub async fn finish(self) -> Ledger {
        let mut all = Ledger::default();
        for task in self.tasks {
            let ledger = task.await.expect("a sender's task panicked");
            all.sent.extend(ledger.sent);
            all.acks.extend(ledger.acks);
            all.failures.extend(ledger.failures);
        }
        let p = &self.progress;
        all.counters = HashMap::from([
            ("unavailable", p.unavailable.load(Ordering::Relaxed)),
            ("resent", p.resent.load(Ordering::Relaxed)),
            ("reconnects", p.reconnects.load(Ordering::Relaxed)),
        ]);
        all
    }
}

/// One sender's loop: see the module's documentation.
async fn run_sender(sender: Sender, progress: Arc<Progress>) -> Ledger {
    let deadline = Instant::now() + SEND_DEADLINE;
    let index: HashMap<String, usize> = sender
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.to_string(), i))
        .collect();
    let mut ledger = Ledger::default();
    let mut client: Option<Client> = None;
    let mut gateway = 0;
    let mut in_flight: HashSet<usize> = HashSet::new();
    let mut retry: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut next = 0;
    let mut next_at = Instant::now();
    let mut last_heard = Instant::now();

    while ledger.acks.len() < sender.messages.len() && Instant::now() < deadline {
        let Some(ws) = client.as_mut() else {
            client = connect_any(&sender, &mut gateway, deadline).await;
            // Whatever was in flight on the lost connection is sent again.
            progress.in_flight.fetch_sub(in_flight.len(), Ordering::Relaxed);
            for i in in_flight.drain() {
                retry.push_front((Instant::now(), i));
            }
            last_heard = Instant::now();
            continue;
        };

        let now = Instant::now();
        while in_flight.len() < WINDOW {
            let i = if retry.front().is_some_and(|(at, _)| *at <= now) {
                progress.resent.fetch_add(1, Ordering::Relaxed);
                retry.pop_front().expect("checked").1
            } else if next < sender.messages.len() && next_at <= now {
                let m = &sender.messages[next];
                ledger.sent.insert(m.id, m.body.clone());
                progress.sent.fetch_add(1, Ordering::Relaxed);
                next_at = now + sender.interval;
                next += 1;
                next - 1
            } else {
                break;
            };
            ws.send_json(sender.send_event(&sender.messages[i])).await;
            in_flight.insert(i);
            progress.in_flight.fetch_add(1, Ordering::Relaxed);
        }

        let mut wake = now + Duration::from_millis(200);
        if next < sender.messages.len() && in_flight.len() < WINDOW {
            wake = wake.min(next_at);
        }
        if let Some((at, _)) = retry.front() {
            wake = wake.min(*at);
        }
        let Some(event) = ws.try_next_event(wake.saturating_duration_since(now)).await else {
            if !in_flight.is_empty() && last_heard.elapsed() > SILENCE {
                progress.reconnects.fetch_add(1, Ordering::Relaxed);
                client = None;
            }
            continue;
        };
        last_heard = Instant::now();
        match event["type"].as_str() {
            Some("ack" | "error") => {
                let which = event["ref"].as_str().and_then(|r| index.get(r)).copied();
                let Some(i) = which.filter(|i| in_flight.remove(i)) else {
                    ledger.failures.push(format!("a reply to no send in flight: {event}"));
                    continue;
                };
                progress.in_flight.fetch_sub(1, Ordering::Relaxed);
                let id = sender.messages[i].id;
                if event["type"] == "error" {
                    if event["code"] == "unavailable" {
                        progress.unavailable.fetch_add(1, Ordering::Relaxed);
                        retry.push_back((Instant::now() + RETRY_AFTER, i));
                    } else {
                        ledger.failures.push(format!("the send of {id} was refused: {event}"));
                    }
                    continue;
                }
                if event["id"] != json!(id.to_string()) {
                    ledger
                        .failures
                        .push(format!("the ack of {id} names another id: {event}"));
                }
                if ledger.acks.insert(id, event).is_none() {
                    progress.acked.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some("__close") => {
                progress.reconnects.fetch_add(1, Ordering::Relaxed);
                client = None;
            }
            // Messages of the others, joined, typing: not this sender's business.
            _ => {}
        }
    }
    let unacked = sender.messages.len() - ledger.acks.len();
    if unacked > 0 {
        ledger.failures.push(format!(
            "{unacked} message(s) of {} still unacked after {SEND_DEADLINE:?}",
            sender.user
        ));
    }
    if let Some(client) = client {
        client.close().await;
    }
    ledger
}

/// Connects to the first gateway that accepts, starting with `gateway` and
/// trying the others in turn, backing off between rounds; `None` at
/// `deadline`. Sets `gateway` to the one that accepted.
async fn connect_any(sender: &Sender, gateway: &mut usize, deadline: Instant) -> Option<Client> {
    let mut pause = Duration::from_millis(20);
    while Instant::now() < deadline {
        for _ in 0..sender.gateways.len() {
            let url = &sender.gateways[*gateway];
            if let Ok(mut client) = Client::connect(url, Some(&sender.token), false).await {
                client.user = Some(sender.user);
                return Some(client);
            }
            *gateway = (*gateway + 1) % sender.gateways.len();
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    None
}

/// One row of `messages`.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub id: Uuid,
    pub chat: Uuid,
    pub seq: i64,
    pub body: String,
}

/// Every row of the stack's `messages` table.
pub async fn stored_messages(stack: &Stack) -> Vec<StoredMessage> {
    let (client, connection) = tokio_postgres::connect(stack.db_url(), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", stack.db_url()));
    tokio::spawn(connection);
    client
        .query("SELECT id, chat, seq, body FROM messages", &[])
        .await
        .expect("SELECT FROM messages")
        .into_iter()
        .map(|row| StoredMessage {
            id: row.get(0),
            chat: row.get(1),
            seq: row.get(2),
            body: row.get(3),
        })
        .collect()
}

/// The queue as the persisters' group sees it.
#[derive(Debug)]
pub struct QueueState {
    /// Entries in the stream (the backlog: stored entries are deleted).
    pub length: i64,
    /// Entries delivered to a persister and not acknowledged.
    pub pending: i64,
    /// Whether every entry ever added has been delivered to the group.
    pub all_delivered: bool,
    /// Entries in `chat:dead`.
    pub dead: i64,
}

impl QueueState {
    /// Nothing waits to be read or acknowledged.
    pub fn idle(&self) -> bool {
        self.pending == 0 && self.all_delivered
    }
}

pub async fn queue_state(stack: &Stack) -> QueueState {
    let mut redis = stack.redis.connection().await;
    let length: i64 = redis::cmd("XLEN")
        .arg(STREAM)
        .query_async(&mut redis)
        .await
        .expect("XLEN");
    let dead: i64 = redis::cmd("XLEN")
        .arg(shared::queue::DEAD_LETTERS)
        .query_async(&mut redis)
        .await
        .expect("XLEN");
    let stream: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(STREAM)
        .query_async(&mut redis)
        .await
        .expect("XINFO STREAM");
    let groups: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(STREAM)
        .query_async(&mut redis)
        .await
        .expect("XINFO GROUPS");
    let group = groups
        .iter()
        .find(|g| g.get("name").map(text).as_deref() == Some(GROUP))
        .unwrap_or_else(|| panic!("no group {GROUP} on {STREAM}: {groups:?}"));
    let pending = redis::from_redis_value(&group["pending"]).expect("pending");
    let last_generated = text(&stream["last-generated-id"]);
    let last_delivered = text(&group["last-delivered-id"]);
    QueueState {
        length,
        pending,
        all_delivered: last_generated == last_delivered,
        dead,
    }
}

fn text(value: &redis::Value) -> String {
    redis::from_redis_value(value).unwrap_or_else(|e| panic!("{value:?} is not text: {e}"))
}

/// Waits until every acked message (but those in `except`) is in
/// PostgreSQL and the queue is idle, or `timeout` passes; returns the rows
/// then. The queue is looked at before the table, so rows read after an
/// idle queue are all there will be.
pub async fn wait_until_stored(
    stack: &Stack,
    ledger: &Ledger,
    except: &HashSet<Uuid>,
    timeout: Duration,
) -> Vec<StoredMessage> {
    let deadline = Instant::now() + timeout;
    loop {
        let idle = queue_state(stack).await.idle();
        let rows = stored_messages(stack).await;
        let ids: HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
        let missing = ledger
            .acks
            .keys()
            .filter(|id| !except.contains(id) && !ids.contains(id))
            .count();
        if (idle && missing == 0) || Instant::now() >= deadline {
            if missing > 0 || !idle {
                eprintln!(
                    "after {timeout:?}: {missing} acked message(s) not stored; queue: {:?}",
                    queue_state(stack).await
                );
            }
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How PostgreSQL's `messages` compares with what was sent and acked.
#[derive(Debug)]
pub struct Figures {
    pub sent: usize,
    pub acked: usize,
    /// Rows in `messages`.
    pub stored: usize,
    /// Rows beyond the first of one message (same body, or same id).
    pub duplicated: usize,
    /// Acked messages not stored.
    pub lost: usize,
    /// Stored messages never acked whose send was in flight.
    pub stored_unacked: usize,
    /// Stored rows of no message this test sent.
    pub unknown: usize,
    /// Stored rows that differ from their ack or their body, and acks
    /// that share a (chat, seq).
    pub mismatched: Vec<String>,
}

impl Figures {
    /// Compares `rows` with `ledger`, leaving out the ids in `except`
    /// (messages the test expects not to be stored yet) from both sides.
    pub fn of(ledger: &Ledger, rows: &[StoredMessage], except: &HashSet<Uuid>) -> Figures {
        let rows: Vec<&StoredMessage> = rows.iter().filter(|r| !except.contains(&r.id)).collect();
        let acks: HashMap<&Uuid, &Value> = ledger.acks.iter().filter(|(id, _)| !except.contains(id)).collect();
        let sent = ledger.sent.keys().filter(|id| !except.contains(id)).count();

        let mut per_body: HashMap<&str, usize> = HashMap::new();
        let mut per_id: HashMap<Uuid, usize> = HashMap::new();
        for row in &rows {
            *per_body.entry(row.body.as_str()).or_default() += 1;
            *per_id.entry(row.id).or_default() += 1;
        }
        let extra = |counts: &mut dyn Iterator<Item = &usize>| counts.map(|n| n - 1).sum::<usize>();
        let duplicated = extra(&mut per_body.values()).max(extra(&mut per_id.values()));
        let lost = acks.keys().filter(|id| !per_id.contains_key(id)).count();
        let stored_unacked = rows
            .iter()
            .filter(|r| !acks.contains_key(&r.id) && ledger.sent.contains_key(&r.id))
            .count();
        let unknown = rows.iter().filter(|r| !ledger.sent.contains_key(&r.id)).count();

        let mut mismatched = Vec::new();
        for row in &rows {
            if let Some(body) = ledger.sent.get(&row.id) {
                if *body != row.body {
                    mismatched.push(format!("{} stored with body {:?}, sent {body:?}", row.id, row.body));
                }
            }
            if let Some(ack) = acks.get(&row.id) {
                if ack["chat"] != json!(row.chat.to_string()) || ack["seq"] != json!(row.seq) {
                    mismatched.push(format!(
                        "{} stored in chat {} at seq {}, acked as {ack}",
                        row.id, row.chat, row.seq
                    ));
                }
            }
        }
        let mut positions: HashMap<(String, i64), Uuid> = HashMap::new();
        for (id, ack) in &acks {
            let position = (ack["chat"].to_string(), ack["seq"].as_i64().unwrap_or(-1));
            if let Some(other) = positions.insert(position.clone(), **id) {
                mismatched.push(format!("{id} and {other} were both acked at {position:?}"));
            }
        }
        Figures {
            sent,
            acked: acks.len(),
            stored: rows.len(),
            duplicated,
            lost,
            stored_unacked,
            unknown,
            mismatched,
        }
    }

    /// The figures on one line.
    pub fn line(&self, what: &str) -> String {
        format!(
            "{what}: sent {}, acked {}, stored {}, duplicated {}, lost {} \
             (stored but unacked {}, unknown {}, mismatched {})",
            self.sent,
            self.acked,
            self.stored,
            self.duplicated,
            self.lost,
            self.stored_unacked,
            self.unknown,
            self.mismatched.len()
        )
    }

    /// Prints the figures and fails unless every acked message is stored
    /// exactly once, as acked, and nothing else is (a stored message that
    /// was never acked must at least have been sent); also fails on the
    /// ledger's failures, among them sends never acked.
    pub fn assert_exactly_once(&self, what: &str, ledger: &Ledger, stack: &Stack) {
        let line = self.line(what);
        println!("{line}");
        let ok = self.duplicated == 0
            && self.lost == 0
            && self.unknown == 0
            && self.mismatched.is_empty()
            && self.stored == self.acked
            && ledger.failures.is_empty();
        if !ok {
            let first = |v: &[String]| v.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ");
            panic!(
                "{line}\nmismatched:\n  {}\nclient failures:\n  {}\n{}",
                first(&self.mismatched),
                first(&ledger.failures),
                stack.logs_tail(40)
            );
        }
    }
}
