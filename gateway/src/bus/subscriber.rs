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
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

impl Supervisor {
    async fn run(mut self, mut interest: mpsc::Receiver<Interest>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut reader_gone: Option<oneshot::Receiver<()>> = None;
        loop {
            if self.sink.is_none() {
                match self.connect().await {
                    Ok(gone) => {
                        reader_gone = Some(gone);
                        backoff = BACKOFF_MIN;
                    }
                    Err(e) => {
                        tracing::warn!(shard = self.shard, error = %e, "bus subscriber cannot reach redis");
                        reader_gone = None;
                    }
                }
            }
            tokio::select! {
                cmd = interest.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => return,
                },
                _ = wait_gone(&mut reader_gone) => {
                    tracing::warn!(shard = self.shard, "bus subscriber lost redis; reconnecting");
                    metrics::counter!("gateway_bus_reconnects_total").increment(1);
                    self.sink = None;
                    reader_gone = None;
                }
                _ = tokio::time::sleep(backoff), if self.sink.is_none() => {
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn handle(&mut self, cmd: Interest) {
        match cmd {
            Interest::Subscribe(channel) => {
                if self.channels.insert(channel.clone()) {
                    if let Some(sink) = &mut self.sink {
                        if let Err(e) = sink.subscribe(&channel).await {
                            tracing::warn!(error = %e, "subscribe failed; will resubscribe on reconnect");
                            self.sink = None;
                        }
                    }
                }
            }
            Interest::Unsubscribe(channel) => {
                if self.channels.remove(&channel) {
                    if let Some(sink) = &mut self.sink {
                        if sink.unsubscribe(&channel).await.is_err() {
                            self.sink = None;
                        }
                    }
                }
            }
            Interest::Barrier(ready) => {
                if self.sink.is_none() {
                    // A new connection asks: try once now rather than at the
                    // next backoff tick.
                    let _ = self.connect().await;
                }
                let _ = ready.send(if self.sink.is_some() { Ok(()) } else { Err(BusDown) });
            }
        }
    }

    /// Opens a pub/sub connection, subscribes every wanted channel and starts
    /// its reader; the receiver fires when the reader ends.
    async fn connect(&mut self) -> Result<oneshot::Receiver<()>, redis::RedisError> {
        let pubsub = self.client.get_async_pubsub().await?;
        let (mut sink, stream) = pubsub.split();
        let channels: Vec<&String> = self.channels.iter().collect();
        for chunk in channels.chunks(512) {
            sink.subscribe(chunk).await?;
        }
        let (gone_tx, gone_rx) = oneshot::channel();
        tokio::spawn(read(stream, self.shard, self.hub.clone(), self.origin.clone(), gone_tx));
        self.sink = Some(sink);
        Ok(gone_rx)
    }
}

async fn wait_gone(gone: &mut Option<oneshot::Receiver<()>>) {
    match gone {
        Some(rx) => {
            let _ = rx.await;
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
