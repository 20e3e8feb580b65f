//! The persister: moves jobs from the Redis Stream `chat:queue` into PostgreSQL.
//!
//! Gateways append one entry per accepted change; any number of persister
//! processes read them through the consumer group `persisters`, each under
//! its own consumer name, store them in batches, and acknowledge and delete
//! an entry only after its transaction committed (see `worker`). Jobs are
//! stored idempotently (see `store`), so an entry delivered twice (after a
//! crash between commit and ack, or a takeover) is harmless.
//!
//! This file wires the parts together: `Persister::build` binds the metrics
//! port, `run_until_stopped` connects and runs the worker until the shutdown
//! token fires, `migrate` applies the schema, and `restore_redis` rebuilds
//! Redis's chat state from PostgreSQL. It holds no logic of its
//! own and must never read the environment or print: `main` does that.
//!
//! Modules: `config` (settings), `migrate` (schema), `worker` (stream
//! consumption, ack, claim, retries), `retry` (retry and dead-letter
//! policy), `dead` (the dead-letter stream: format, move, list, replay),
//! `reply` (Redis reply parsing), `batch` (isolating refused entries,
//! backoff), `store` (PostgreSQL batch write), `http` (metrics and health),
//! `restore` (`persister restore-redis`).

pub mod batch;
pub mod config;
pub mod dead;
pub mod http;
pub mod migrate;
pub mod reply;
pub mod restore;
pub mod retry;
pub mod store;
pub mod worker;

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use batch::Backoff;
pub use config::{Config, LogFormat};
pub use dead::{DeadError, DeadLetter, Replayed};
pub use migrate::MigrateError;
pub use restore::{RestoreError, Summary as RestoreSummary};
pub use retry::RetryPolicy;
pub use store::StoreError;
pub use worker::{RedisConns, Settings, Worker, WorkerError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on PERSISTER_METRICS_LISTEN={addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error(transparent)]
    Dead(#[from] DeadError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot reach Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// How often the queue gauges (`persister_pending`,
/// `persister_stream_length`, `persister_oldest_pending_age_seconds`) are
/// refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(2);

/// Applies the pending migrations; returns the versions applied.
pub async fn migrate(config: &Config) -> Result<Vec<&'static str>, Error> {
    Ok(migrate::migrate(config.database_url.expose()).await?)
}

/// A persister with its metrics port bound, not yet connected.
pub struct Persister {
    config: Config,
    listener: TcpListener,
    metrics_addr: SocketAddr,
    metrics: PrometheusHandle,
}

impl Persister {
    /// Installs the metrics recorder and binds the metrics port.
    pub async fn build(config: Config) -> Result<Persister, Error> {
        let metrics = http::install_recorder(&config.consumer);
        let addr = config.metrics_listen;
        let listener = http::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let metrics_addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        Ok(Persister {
            config,
            listener,
            metrics_addr,
            metrics,
        })
    }

    /// The bound metrics address (the real port when 0 was asked for).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Serves metrics, connects (retrying while Redis is down), and consumes
    /// the queue with `PERSISTER_CONCURRENCY` workers ("lanes", each a
    /// consumer of its own in the group, so one lane's batch is read and
    /// parsed while another's is written) until `shutdown` fires; the batches
    /// in hand are finished and acked first.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Persister {
            config,
            listener,
            metrics,
            ..
        } = self;
        let tasks = TaskTracker::new();
        tasks.spawn(http::serve(listener, metrics.clone(), shutdown.clone()));

        let store = store::Store::new(config.database_url.expose(), config.db_pool)?;
        if let Some(redis) = connect_redis(&config, &shutdown).await {
            tasks.spawn(refresh_gauges(redis.commands.clone(), metrics, shutdown.clone()));
            let mut lanes = Vec::with_capacity(config.concurrency);
            for lane in 0..config.concurrency {
                // Each lane blocks in its own XREADGROUP: it needs its own connections.
                let redis = if lane == 0 {
                    redis.clone()
                } else {
                    match connect_redis(&config, &shutdown).await {
                        Some(redis) => redis,
                        None => break,
                    }
                };
                let settings = Settings {
                    consumer: lane_consumer(&config.consumer, lane),
                    batch_size: config.batch_size,
                    block: config.block,
                    linger: config.linger,
                    claim_idle: config.claim_idle,
                    retry: config.retry,
                };
                let mut worker = Worker::new(redis, store.clone(), settings, shutdown.clone());
                lanes.push(tokio::spawn(async move { worker.run().await }));
            }
            tracing::info!(
                consumer = %config.consumer,
                lanes = lanes.len(),
                batch_size = config.batch_size,
                "persister running"
            );
            for lane in lanes {
                if let Err(e) = lane.await {
                    tracing::error!(error = %e, "a worker lane failed");
                }
            }
        }
        // The worker only returns once shutdown fired; the tasks follow it.
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        Ok(())
    }
}

/// The consumer name of lane `lane`: the configured name for the first
/// lane, `<name>/<lane>` for the others (unique as long as names are).
pub fn lane_consumer(consumer: &str, lane: usize) -> String {
    if lane == 0 {
        consumer.to_string()
    } else {
        format!("{consumer}/{lane}")
    }
}

/// Connects to Redis, retrying with backoff; `None` if shutdown came first.
async fn connect_redis(config: &Config, shutdown: &CancellationToken) -> Option<RedisConns> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let attempt = tokio::select! {
            c = RedisConns::connect(config.redis_url.expose(), config.block) => c,
            _ = shutdown.cancelled() => return None,
        };
        match attempt {
            Ok(conns) => return Some(conns),
            Err(e) => {
                let wait = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot connect to Redis; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

/// Refreshes the queue gauges and runs the recorder's upkeep.
async fn refresh_gauges(
    mut commands: redis::aio::ConnectionManager,
    metrics: PrometheusHandle,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match worker::queue_stats(&mut commands).await {
            Ok(stats) => {
                metrics::gauge!("persister_pending").set(stats.pending as f64);
                metrics::gauge!("persister_stream_length").set(stats.length as f64);
                metrics::gauge!("persister_oldest_pending_age_seconds").set(stats.oldest_age.as_secs_f64());
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the queue's lag"),
        }
        metrics.run_upkeep();
    }
}

/// `persister dead-letters list`: the oldest `limit` dead letters.
pub async fn dead_letters_list(config: &Config, limit: usize) -> Result<Vec<DeadLetter>, Error> {
    let mut conn = cli_connection(config).await?;
    Ok(dead::list(&mut conn, limit).await?)
}

/// `persister dead-letters replay`: the given ids, or every dead letter
/// when `ids` is `None`. Each outcome goes to `report` as it happens, so
/// an error part way leaves the caller knowing what was moved; a malformed
/// id moves nothing (`dead::check_id`).
pub async fn dead_letters_replay(
    config: &Config,
    ids: Option<&[String]>,
    report: impl FnMut(Replayed),
) -> Result<(), Error> {
    if let Some(ids) = ids {
        // Before connecting: a malformed id is refused even without Redis.
        for id in ids {
            dead::check_id(id)?;
        }
    }
    let mut conn = cli_connection(config).await?;
    match ids {
        Some(ids) => dead::replay_ids(&mut conn, ids, report).await?,
        None => dead::replay_all(&mut conn, report).await?,
    }
    Ok(())
}

/// `persister restore-redis`: rebuilds the chats' state in Redis from
/// PostgreSQL, `page` chats per query and per pipelined round trip,
/// skipping every chat Redis still holds (see `restore`).
pub async fn restore_redis(config: &Config, page: usize) -> Result<RestoreSummary, Error> {
    let mut conn = cli_connection(config).await?;
    Ok(restore::restore(config.database_url.expose(), &mut conn, page).await?)
}

async fn cli_connection(config: &Config) -> Result<redis::aio::MultiplexedConnection, Error> {
    let client = redis::Client::open(config.redis_url.expose())?;
    Ok(client.get_multiplexed_async_connection().await?)
}
