//! One bus subscriber per hub shard: a Redis pub/sub connection carrying the
//! channels of that shard's users and chats.
//!
//! Two tasks per shard. The supervisor owns the set of channels the shard
//! wants and the writing half of the connection (`resp`); it (re)connects
//! with backoff and re-subscribes everything after Redis comes back. The
//! reader owns the reading half: it decodes publications and hands them to
//! the shard, waiting when the shard is busy, so backpressure reaches the
//! socket and Redis's output buffer, never memory here. It counts Redis's
//! confirmations of subscription changes, and the supervisor answers a
//! barrier once the count covers every change made before it.
//!
//! The supervisor waits only on Redis (its writes and connects), never on
//! the reader or the shard: it keeps taking the shard's requests while
//! confirmations are outstanding. So shard → supervisor, supervisor →
//! reader (confirmations) and reader → shard cannot wait on each other in a
//! circle, however full each queue is. A confirmation does queue behind the
//! publications the shard has not taken yet, so an overloaded shard also
//! slows the handshakes that wait for it.
//!
//! A dead link (a network split, a host gone without FIN or RST) is found
//! by a heartbeat: the supervisor PINGs every `heartbeat`, and the reader
//! gives the connection up once it has waited on the socket for
//! `DEAD_AFTER_BEATS` intervals without a frame. Only its waits on the
//! socket are timed, never its waits on the shard, so a shard working
//! through a backlog (frames already in the socket) is never taken for a
//! dead link. Every wait of the supervisor on Redis is bounded too: a
//! connect by `connect_timeout`, a write by the dead-link time.
//!
//! What was published while a connection was lost is missed. For messages
//! that is the contract (clients catch up from history), but a missed
//! `joined` or `left` would leave a connection receiving the wrong chats for
//! as long as it lives. So once a new connection has confirmed every
//! channel it subscribed again, the reader tells the shard to resync its
//! users' connections (`Hub::resync`), each of which reads its user's
//! groups again.

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::resp::{self, Commands, Push, Pushes};
use super::Origin;
use crate::hub::{BusDown, Hub, Interest};

/// How the subscribers watch their connections.
#[derive(Debug, Clone, Copy)]
pub struct BusSettings {
    /// `GATEWAY_BUS_HEARTBEAT_MS`: a live connection is PINGed this often;
    /// one silent for `DEAD_AFTER_BEATS` intervals is given up.
    pub heartbeat: Duration,
    /// Bound of one connect (TCP or Unix, AUTH, PING and re-subscribing):
    /// `GATEWAY_REDIS_TIMEOUT_MS`, as for the command connections.
    pub connect_timeout: Duration,
}

impl BusSettings {
    /// How long a reader waits on a silent socket, and a write may block,
    /// before the connection counts as lost.
    fn dead_after(&self) -> Duration {
        self.heartbeat * DEAD_AFTER_BEATS
    }
}

/// Heartbeats a connection may miss before it counts as lost: one late
/// answer is not a dead link, three in a row are.
const DEAD_AFTER_BEATS: u32 = 3;

/// Starts the supervisor of shard `shard`; it runs until `shutdown`.
pub fn spawn(
    client: redis::Client,
    shard: usize,
    hub: Hub,
    origin: Origin,
    interest: mpsc::Receiver<Interest>,
    settings: BusSettings,
    shutdown: CancellationToken,
) {
    let supervisor = Supervisor {
        client,
        shard,
        hub,
        origin,
        settings,
        channels: HashSet::new(),
        live: None,
        lost_one: false,
        waiting: Vec::new(),
        retry: Retry {
            wait: BACKOFF_MIN,
            at: Instant::now(),
        },
    };
    tokio::spawn(supervisor.run(interest, shutdown));
}

struct Supervisor {
    client: redis::Client,
    shard: usize,
    hub: Hub,
    origin: Origin,
    settings: BusSettings,
    channels: HashSet<String>,
    live: Option<Live>,
    /// A connection was lost since the last one came up: the next one's
    /// subscriptions end with a resync.
    lost_one: bool,
    /// Barriers waiting for confirmations: answered once the connection has
    /// confirmed this many channel changes.
    waiting: Vec<(u64, oneshot::Sender<Result<(), BusDown>>)>,
    retry: Retry,
}

/// The current connection: its writing half, its reader task, how many
/// channel changes were sent on it and confirmed so far (the count closes
/// when the reader ends, i.e. when the connection is gone), and when to
/// PING it next.
struct Live {
    commands: Commands,
    sent: u64,
    confirmed: watch::Receiver<u64>,
    reader: tokio::task::AbortHandle,
    ping_at: Instant,
}

/// When to try connecting again: 50 ms after a failure, doubling to 2 s,
/// back to 50 ms once a connection confirms a subscription (a server that
/// accepts the connection but refuses SUBSCRIBE is not retried in a tight
/// loop).
struct Retry {
    wait: Duration,
    at: Instant,
}

impl Retry {
    fn failed(&mut self) {
        self.at = Instant::now() + self.wait;
        self.wait = (self.wait * 2).min(BACKOFF_MAX);
    }

    fn succeeded(&mut self) {
        self.wait = BACKOFF_MIN;
    }
}

/// Interest requests handled in one round of Redis calls.
const INTEREST_BATCH: usize = 512;
/// Channels per SUBSCRIBE command when subscribing everything again.
const CHANNELS_PER_COMMAND: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Supervisor {
    async fn run(mut self, mut interest: mpsc::Receiver<Interest>, shutdown: CancellationToken) {
        loop {
            if self.live.is_none() && Instant::now() >= self.retry.at {
                self.reconnect().await;
            }
            let ping_at = self.live.as_ref().map(|live| live.ping_at);
            tokio::select! {
                cmd = interest.recv() => match cmd {
                    Some(cmd) => self.handle(cmd, &mut interest).await,
                    None => return,
                },
                confirmed = next_confirmation(&mut self.live) => {
                    if confirmed {
                        self.retry.succeeded();
                        self.answer_confirmed();
                    } else {
                        tracing::warn!(shard = self.shard, "bus subscriber lost redis; reconnecting");
                        metrics::counter!("gateway_bus_reconnects_total").increment(1);
                        self.disconnect();
                        // Sessions waiting at their handshake get 503 now
                        // rather than wait for Redis to come back.
                        self.fail_waiting();
                        self.retry.failed();
                    }
                }
                _ = sleep_until_some(ping_at) => self.heartbeat().await,
                _ = tokio::time::sleep_until(self.retry.at), if self.live.is_none() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// PINGs the connection; its answer (or its absence) is the reader's.
    async fn heartbeat(&mut self) {
        let bound = self.settings.dead_after();
        let Some(live) = &mut self.live else { return };
        live.ping_at = Instant::now() + self.settings.heartbeat;
        if let Err(e) = bounded(bound, live.commands.ping()).await {
            self.write_failed(e);
        }
    }

    /// A write on the connection failed or blocked past the dead-link time:
    /// it is abandoned (its barriers wait for the next connection, or fail
    /// with it).
    fn write_failed(&mut self, e: std::io::Error) {
        tracing::warn!(shard = self.shard, error = %e, "bus write failed; will resubscribe on reconnect");
        metrics::counter!("gateway_bus_reconnects_total").increment(1);
        self.disconnect();
    }

    /// Handles `first` and whatever else the shard has queued (up to a
    /// batch): one SUBSCRIBE and one UNSUBSCRIBE for all of it, rather than
    /// one per channel, so connections opening together wait for Redis once.
    /// Barriers are answered once the batch is confirmed, not here.
    async fn handle(&mut self, first: Interest, interest: &mut mpsc::Receiver<Interest>) {
        // Let the other tasks that are ready run first. Tokio runs a task
        // that a wake-up has just readied before the rest, so the subscriber
        // would otherwise take each opening connection's channel on its own,
        // one write to Redis per connection; after the yield, connections
        // that opened together have queued theirs and go out in one command.
        tokio::task::yield_now().await;
        let mut subscribe = HashSet::new();
        let mut unsubscribe = HashSet::new();
        let mut barriers = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next.take() {
            match cmd {
                // Net changes only: a channel wanted and dropped within the
                // batch costs Redis nothing.
                Interest::Subscribe(channel) => {
                    if self.channels.insert(channel.clone()) && !unsubscribe.remove(&channel) {
                        subscribe.insert(channel);
                    }
                }
                Interest::Unsubscribe(channel) => {
                    if self.channels.remove(&channel) && !subscribe.remove(&channel) {
                        unsubscribe.insert(channel);
                    }
                }
                Interest::Barrier(ready) => barriers.push(ready),
            }
            taken += 1;
            if taken < INTEREST_BATCH {
                next = interest.try_recv().ok();
            }
        }
        let bound = self.settings.dead_after();
        if let Some(live) = &mut self.live {
            let subscribe: Vec<&str> = subscribe.iter().map(String::as_str).collect();
            let unsubscribe: Vec<&str> = unsubscribe.iter().map(String::as_str).collect();
            let sent = async {
                live.commands.subscribe(&subscribe).await?;
                live.commands.unsubscribe(&unsubscribe).await
            };
            match bounded(bound, sent).await {
                Ok(()) => live.sent += (subscribe.len() + unsubscribe.len()) as u64,
                Err(e) => self.write_failed(e),
            }
        }
        if barriers.is_empty() {
            return;
        }
        let target = self.live.as_ref().map_or(0, |live| live.sent);
        self.waiting.extend(barriers.into_iter().map(|ready| (target, ready)));
        // Without a connection, one that subscribes everything wanted (this
        // batch included) re-targets the barriers; failing, it answers them.
        // While backing off from a failed attempt the barriers fail at once:
        // a burst of handshakes during an outage must neither hammer Redis
        // with connects nor hold the supervisor a connect bound per batch.
        let connected = match self.live {
            Some(_) => true,
            None if Instant::now() >= self.retry.at => self.reconnect().await,
            None => {
                self.fail_waiting();
                false
            }
        };
        if connected {
            self.answer_confirmed();
        }
    }

    /// `connect`, within the connect bound; if it fails, answers the waiting
    /// barriers with `BusDown` and backs off.
    async fn reconnect(&mut self) -> bool {
        match self.connect().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(shard = self.shard, error = %e, "bus subscriber cannot reach redis");
                self.fail_waiting();
                self.retry.failed();
                false
            }
        }
    }

    /// Answers the barriers whose changes the connection has confirmed.
    fn answer_confirmed(&mut self) {
        let Some(live) = &self.live else { return };
        let confirmed = *live.confirmed.borrow();
        let (done, still): (Vec<_>, Vec<_>) = self.waiting.drain(..).partition(|(target, _)| *target <= confirmed);
        self.waiting = still;
        for (_, ready) in done {
            let _ = ready.send(Ok(()));
        }
    }

    /// Barriers of a connection that is gone get `BusDown`.
    fn fail_waiting(&mut self) {
        for (_, ready) in self.waiting.drain(..) {
            let _ = ready.send(Err(BusDown));
        }
    }

    /// Opens a new connection subscribed to every channel wanted, in place
    /// of the current one, all within the connect bound. Barriers still
    /// waiting now wait for the new connection's subscriptions.
    async fn connect(&mut self) -> std::io::Result<()> {
        self.disconnect();
        let bound = self.settings.connect_timeout;
        let deadline = Instant::now() + bound;
        let (mut commands, pushes) = resp::connect(self.client.get_connection_info(), bound).await?;
        let channels: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        let subscribed = async {
            for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
                commands.subscribe(chunk).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        match tokio::time::timeout_at(deadline, subscribed).await {
            Ok(result) => result?,
            Err(_) => return Err(timed_out("re-subscribing", bound)),
        }
        let sent = channels.len() as u64;
        let (confirmed_tx, confirmed) = watch::channel(0);
        let reader = Reader {
            pushes,
            shard: self.shard,
            hub: self.hub.clone(),
            origin: self.origin.clone(),
            confirmed: confirmed_tx,
            dead_after: self.settings.dead_after(),
            // Without channels there are no connections to resync.
            resync_after: (self.lost_one && sent > 0).then_some(sent),
        };
        self.lost_one = false;
        let task = tokio::spawn(reader.run());
        for (target, _) in &mut self.waiting {
            *target = sent;
        }
        self.live = Some(Live {
            commands,
            sent,
            confirmed,
            reader: task.abort_handle(),
            ping_at: Instant::now() + self.settings.heartbeat,
        });
        Ok(())
    }

    /// Abandons the current connection. Its reader is stopped too: a reader
    /// left running on a connection still subscribed would deliver every
    /// publication a second time once a new connection subscribes.
    fn disconnect(&mut self) {
        if let Some(live) = self.live.take() {
            live.reader.abort();
            self.lost_one = true;
        }
    }
}

/// True when the current connection confirms more channel changes, false
/// when it is gone (its reader ended); never, without a connection.
async fn next_confirmation(live: &mut Option<Live>) -> bool {
    match live {
        Some(live) => live.confirmed.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Resolves at `at`; never, without it.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `io` unless it takes longer than `bound`.
async fn bounded(bound: Duration, io: impl std::future::Future<Output = std::io::Result<()>>) -> std::io::Result<()> {
    match tokio::time::timeout(bound, io).await {
        Ok(result) => result,
        Err(_) => Err(timed_out("a write", bound)),
    }
}

fn timed_out(what: &str, bound: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} on the bus connection took over {bound:?}"),
    )
}

/// The reading half's task; its end (dropping `confirmed`) tells the
/// supervisor the connection is gone.
struct Reader {
    pushes: Pushes,
    shard: usize,
    hub: Hub,
    origin: Origin,
    confirmed: watch::Sender<u64>,
    /// A wait on the socket longer than this (several heartbeats without
    /// an answer) ends the connection.
    dead_after: Duration,
    /// On a connection that replaced a lost one: once this many
    /// confirmations (the channels subscribed again) have come, the shard's
    /// connections resync their membership.
    resync_after: Option<u64>,
}

impl Reader {
    async fn run(mut self) {
        loop {
            // Only this wait is timed: a wait in `deliver` is the shard's,
            // and the frames behind it are already in the socket.
            let Ok(push) = tokio::time::timeout(self.dead_after, self.pushes.next()).await else {
                tracing::warn!(
                    shard = self.shard,
                    silent_for = ?self.dead_after,
                    "bus connection silent past its heartbeats; taking it for dead"
                );
                return;
            };
            match push {
                Ok(Push::Message { channel, payload }) => match super::decode(&channel, &payload, &self.origin) {
                    Ok(delivery) => self.hub.deliver(self.shard, delivery).await,
                    Err(e) => {
                        metrics::counter!("gateway_bus_bad_envelopes_total").increment(1);
                        tracing::warn!(error = %e, "dropping an undecodable publication");
                    }
                },
                Ok(Push::Confirmed) => {
                    self.confirmed.send_modify(|n| *n += 1);
                    if self.resync_after.is_some_and(|after| *self.confirmed.borrow() >= after) {
                        self.resync_after = None;
                        self.hub.resync(self.shard).await;
                    }
                }
                Ok(Push::Pong) => {}
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        tracing::warn!(shard = self.shard, error = %e, "bus connection failed");
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;
    use std::sync::Arc;

    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::hub::{Conn, Outbound};

    /// A publication to `user` as Redis pushes it to a subscriber.
    fn publication(user: uuid::Uuid, n: i64) -> Vec<u8> {
        let payload = rmp_serde::to_vec(&(
            "m",
            Origin::new().of(1),
            uuid::Uuid::now_v7().to_string(),
            uuid::Uuid::now_v7().to_string(),
            user.to_string(),
            uuid::Uuid::now_v7().to_string(),
            n,
            "hi",
            1000i64,
        ))
        .unwrap();
        let channel = format!("u:{user}");
        let mut frame = format!(
            "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n",
            channel.len(),
            payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(&payload);
        frame.extend_from_slice(b"\r\n");
        frame
    }

    // Real time (tokio's test-util clock is not enabled in this workspace),
    // so the dead-link time is short.
    #[tokio::test]
    async fn a_shard_busy_far_past_the_heartbeats_is_no_dead_link_but_a_silent_socket_is() {
        let dead_after = Duration::from_millis(300);
        // One shard whose bus side nobody reads yet: attaching a user fills
        // the interest queue, and the shard stalls on the barrier behind it.
        let (interest_tx, mut interest) = mpsc::channel(1);
        let queue_full = interest_tx.clone();
        let hub = Hub::start(vec![interest_tx], 1);
        let user = uuid::Uuid::new_v4();
        let (out_tx, mut out) = mpsc::channel(64);
        let conn = Conn::new(1, user, out_tx, Arc::new(AtomicU8::new(0)), CancellationToken::new());
        let attached = tokio::spawn({
            let hub = hub.clone();
            async move { hub.attach_user(conn).await }
        });
        while queue_full.capacity() > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(queue_full);

        // Ten publications already in the socket.
        let (mut redis, socket) = tokio::io::duplex(64 * 1024);
        for n in 0..10 {
            redis.write_all(&publication(user, n)).await.unwrap();
        }
        let (confirmed_tx, confirmed) = watch::channel(0);
        let reader = tokio::spawn(
            Reader {
                pushes: Pushes::from_reader(socket),
                shard: 0,
                hub: hub.clone(),
                origin: Origin::new(),
                confirmed: confirmed_tx,
                dead_after,
                resync_after: None,
            }
            .run(),
        );

        // The reader waits on the stalled shard for five times the dead-link
        // time, and is still there.
        tokio::time::sleep(dead_after * 5).await;
        assert!(!reader.is_finished(), "a busy shard was taken for a dead link");
        // The shard moves again and gets all ten, read from the socket.
        assert!(matches!(interest.recv().await, Some(Interest::Subscribe(_))));
        let Some(Interest::Barrier(ready)) = interest.recv().await else {
            panic!("no barrier")
        };
        ready.send(Ok(())).unwrap();
        attached.await.unwrap().unwrap();
        for _ in 0..10 {
            assert!(matches!(out.recv().await, Some(Outbound::Frame(_))));
        }
        assert!(!reader.is_finished());

        // Then nothing comes on the socket: given up after the dead-link time.
        let silent = Instant::now();
        tokio::time::timeout(dead_after * 5, reader)
            .await
            .expect("the reader gave up a silent socket")
            .unwrap();
        assert!(silent.elapsed() >= dead_after, "{:?}", silent.elapsed());
        assert!(confirmed.has_changed().is_err(), "the supervisor learns of it");
        drop(redis);
    }
}
