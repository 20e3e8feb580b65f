//! One bus subscriber per hub shard: a Redis pub/sub connection carrying the
//! channels of that shard's users and chats.
//!
//! Two tasks per shard. The supervisor owns the set of channels the shard
//! wants and the subscribing half of the connection; it (re)connects with
//! backoff and re-subscribes everything after Redis comes back. The reader
//! decodes publications and hands them to the shard, waiting when the shard
//! is busy (backpressure reaches Redis's output buffer, never memory here).
//! The supervisor never sends to the shard, so shard → supervisor and
//! reader → shard cannot wait on each other.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

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
        sink: None,
        reader: None,
    };
    tokio::spawn(supervisor.run(interest, shutdown));
}

struct Supervisor {
    client: redis::Client,
    shard: usize,
    hub: Hub,
    origin: Origin,
    channels: HashSet<String>,
    sink: Option<PubSubSink>,
    /// The reader of the current connection; there is never more than one.
    reader: Option<Reader>,
}

/// The reading half's task, and a signal that it ended (connection lost).
struct Reader {
    gone: oneshot::Receiver<()>,
    task: tokio::task::AbortHandle,
}

/// Interest requests handled in one round of Redis calls.
const INTEREST_BATCH: usize = 512;
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Supervisor {
    async fn run(mut self, mut interest: mpsc::Receiver<Interest>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            if self.sink.is_none() {
                match self.connect().await {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(e) => tracing::warn!(shard = self.shard, error = %e, "bus subscriber cannot reach redis"),
                }
            }
            tokio::select! {
                cmd = interest.recv() => match cmd {
                    Some(cmd) => self.handle(cmd, &mut interest).await,
                    None => return,
                },
                _ = wait_gone(&mut self.reader) => {
                    tracing::warn!(shard = self.shard, "bus subscriber lost redis; reconnecting");
                    metrics::counter!("gateway_bus_reconnects_total").increment(1);
                    self.disconnect();
                }
                _ = tokio::time::sleep(backoff), if self.sink.is_none() => {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Handles `first` and whatever else the shard has queued (up to a
    /// batch): one SUBSCRIBE and one UNSUBSCRIBE round trip for all of it,
    /// rather than one per channel, so connections opening together wait
    /// for Redis once. Barriers are answered after the batch is in effect.
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
        if let Some(sink) = &self.sink {
            if let Err(e) = each(sink, Change::Subscribe, subscribe.iter()).await {
                tracing::warn!(error = %e, "subscribe failed; will resubscribe on reconnect");
                self.disconnect();
            }
        }
        if let Some(sink) = &self.sink {
            if each(sink, Change::Unsubscribe, unsubscribe.iter()).await.is_err() {
                self.disconnect();
            }
        }
        if barriers.is_empty() {
            return;
        }
        if self.sink.is_none() {
            // Subscribes everything wanted, this batch included.
            let _ = self.connect().await;
        }
        let answer = if self.sink.is_some() { Ok(()) } else { Err(BusDown) };
        for ready in barriers {
            let _ = ready.send(answer.clone());
        }
    }

    /// Opens a new connection subscribed to every channel wanted, in place
    /// of the current one.
    async fn connect(&mut self) -> Result<(), redis::RedisError> {
        self.disconnect();
        let pubsub = self.client.get_async_pubsub().await?;
        let (sink, stream) = pubsub.split();
        let channels: Vec<&String> = self.channels.iter().collect();
        for chunk in channels.chunks(INTEREST_BATCH) {
            each(&sink, Change::Subscribe, chunk.iter().copied()).await?;
        }
        let (gone_tx, gone) = oneshot::channel();
        let task = tokio::spawn(read(stream, self.shard, self.hub.clone(), self.origin.clone(), gone_tx));
        self.sink = Some(sink);
        self.reader = Some(Reader {
            gone,
            task: task.abort_handle(),
        });
        Ok(())
    }

    /// Abandons the current connection. Its reader is stopped too: a reader
    /// left running on a connection still subscribed would deliver every
    /// publication a second time once a new connection subscribes.
    fn disconnect(&mut self) {
        self.sink = None;
        if let Some(reader) = self.reader.take() {
            reader.task.abort();
        }
    }
}

#[derive(Clone, Copy)]
enum Change {
    Subscribe,
    Unsubscribe,
}

/// Subscribes to (or unsubscribes from) `channels`, pipelined: one command
/// per channel, all sent before the first reply is read, and returns once
/// Redis has confirmed every one.
///
/// One command per channel because redis-rs 0.32 matches confirmations to
/// requests one for one: `SUBSCRIBE a b` gets two confirmations, the call
/// returns on the first, and the second would be taken as the answer to
/// the next request, reporting a later subscription in effect too early.
async fn each<'a>(
    sink: &PubSubSink,
    change: Change,
    channels: impl Iterator<Item = &'a String>,
) -> redis::RedisResult<()> {
    let calls = channels.map(|channel| {
        let mut sink = sink.clone();
        async move {
            match change {
                Change::Subscribe => sink.subscribe(channel).await,
                Change::Unsubscribe => sink.unsubscribe(channel).await,
            }
        }
    });
    futures_util::future::try_join_all(calls).await.map(|_| ())
}

async fn wait_gone(reader: &mut Option<Reader>) {
    match reader {
        Some(reader) => {
            let _ = (&mut reader.gone).await;
        }
        None => std::future::pending().await,
    }
}

async fn read(mut stream: PubSubStream, shard: usize, hub: Hub, origin: Origin, gone: oneshot::Sender<()>) {
    while let Some(msg) = stream.next().await {
        match super::decode(msg.get_channel_name(), msg.get_payload_bytes(), &origin) {
            Ok(delivery) => hub.deliver(shard, delivery).await,
            Err(e) => {
                metrics::counter!("gateway_bus_bad_envelopes_total").increment(1);
                tracing::warn!(error = %e, "dropping an undecodable publication");
            }
        }
    }
    let _ = gone.send(());
}
