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

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::resp::{self, Commands, Push, Pushes};
use super::Origin;
use crate::hub::{BusDown, Hub, Interest};

/// Starts the supervisor of shard `shard`; it runs until `shutdown`.
pub fn spawn(
    client: redis::Client,
    shard: usize,
    hub: Hub,
    origin: Origin,
    interest: mpsc::Receiver<Interest>,
    shutdown: CancellationToken,
) {
    let supervisor = Supervisor {
        client,
        shard,
        hub,
        origin,
        channels: HashSet::new(),
        live: None,
        waiting: Vec::new(),
    };
    tokio::spawn(supervisor.run(interest, shutdown));
}

struct Supervisor {
    client: redis::Client,
    shard: usize,
    hub: Hub,
    origin: Origin,
    channels: HashSet<String>,
    live: Option<Live>,
    /// Barriers waiting for confirmations: answered once the connection has
    /// confirmed this many channel changes.
    waiting: Vec<(u64, oneshot::Sender<Result<(), BusDown>>)>,
}

/// The current connection: its writing half, its reader task, and how many
/// channel changes were sent on it and confirmed so far (the count closes
/// when the reader ends, i.e. when the connection is gone).
struct Live {
    commands: Commands,
    sent: u64,
    confirmed: watch::Receiver<u64>,
    reader: tokio::task::AbortHandle,
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
        let mut retry = Retry {
            wait: BACKOFF_MIN,
            at: Instant::now(),
        };
        loop {
            if self.live.is_none() && Instant::now() >= retry.at && !self.reconnect().await {
                retry.failed();
            }
            tokio::select! {
                cmd = interest.recv() => match cmd {
                    Some(cmd) => self.handle(cmd, &mut interest).await,
                    None => return,
                },
                confirmed = next_confirmation(&mut self.live) => {
                    if confirmed {
                        retry.succeeded();
                        self.answer_confirmed();
                    } else {
                        tracing::warn!(shard = self.shard, "bus subscriber lost redis; reconnecting");
                        metrics::counter!("gateway_bus_reconnects_total").increment(1);
                        self.disconnect();
                        // Sessions waiting at their handshake get 503 now
                        // rather than wait for Redis to come back.
                        self.fail_waiting();
                        retry.failed();
                    }
                }
                _ = tokio::time::sleep_until(retry.at), if self.live.is_none() => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Handles `first` and whatever else the shard has queued (up to a
    /// batch): one SUBSCRIBE and one UNSUBSCRIBE for all of it, rather than
    /// one per channel, so connections opening together wait for Redis once.
    /// Barriers are answered once the batch is confirmed, not here.
    async fn handle(&mut self, first: Interest, interest: &mut mpsc::Receiver<Interest>) {
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
        if let Some(live) = &mut self.live {
            let subscribe: Vec<&str> = subscribe.iter().map(String::as_str).collect();
            let unsubscribe: Vec<&str> = unsubscribe.iter().map(String::as_str).collect();
            let sent = async {
                live.commands.subscribe(&subscribe).await?;
                live.commands.unsubscribe(&unsubscribe).await
            };
            match sent.await {
                Ok(()) => live.sent += (subscribe.len() + unsubscribe.len()) as u64,
                Err(e) => {
                    tracing::warn!(error = %e, "subscription change failed; will resubscribe on reconnect");
                    self.disconnect();
                }
            }
        }
        if barriers.is_empty() {
            return;
        }
        let target = self.live.as_ref().map_or(0, |live| live.sent);
        self.waiting.extend(barriers.into_iter().map(|ready| (target, ready)));
        // Without a connection, one that subscribes everything wanted (this
        // batch included) re-targets the barriers; failing, it answers them.
        if self.live.is_some() || self.reconnect().await {
            self.answer_confirmed();
        }
    }

    /// `connect`, answering the waiting barriers with `BusDown` if it fails.
    async fn reconnect(&mut self) -> bool {
        match self.connect().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(shard = self.shard, error = %e, "bus subscriber cannot reach redis");
                self.fail_waiting();
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
    /// of the current one. Barriers still waiting now wait for the new
    /// connection's subscriptions.
    async fn connect(&mut self) -> std::io::Result<()> {
        self.disconnect();
        let (mut commands, pushes) = resp::connect(self.client.get_connection_info()).await?;
        let channels: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        for chunk in channels.chunks(CHANNELS_PER_COMMAND) {
            commands.subscribe(chunk).await?;
        }
        let sent = channels.len() as u64;
        let (confirmed_tx, confirmed) = watch::channel(0);
        let reader = Reader {
            pushes,
            shard: self.shard,
            hub: self.hub.clone(),
            origin: self.origin.clone(),
            confirmed: confirmed_tx,
        };
        let task = tokio::spawn(reader.run());
        for (target, _) in &mut self.waiting {
            *target = sent;
        }
        self.live = Some(Live {
            commands,
            sent,
            confirmed,
            reader: task.abort_handle(),
        });
        Ok(())
    }

    /// Abandons the current connection. Its reader is stopped too: a reader
    /// left running on a connection still subscribed would deliver every
    /// publication a second time once a new connection subscribes.
    fn disconnect(&mut self) {
        if let Some(live) = self.live.take() {
            live.reader.abort();
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

/// The reading half's task; its end (dropping `confirmed`) tells the
/// supervisor the connection is gone.
struct Reader {
    pushes: Pushes,
    shard: usize,
    hub: Hub,
    origin: Origin,
    confirmed: watch::Sender<u64>,
}

impl Reader {
    async fn run(mut self) {
        loop {
            match self.pushes.next().await {
                Ok(Push::Message { channel, payload }) => match super::decode(&channel, &payload, &self.origin) {
                    Ok(delivery) => self.hub.deliver(self.shard, delivery).await,
                    Err(e) => {
                        metrics::counter!("gateway_bus_bad_envelopes_total").increment(1);
                        tracing::warn!(error = %e, "dropping an undecodable publication");
                    }
                },
                Ok(Push::Confirmed) => self.confirmed.send_modify(|n| *n += 1),
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
