//! The chat gateway: WebSocket and HTTP front of the chat service.
//!
//! The path of one message through a gateway, by module:
//! `ws` (the client's session) → `queue` (accepted into the Redis Stream and
//! published, one Lua script) → `bus` (Redis pub/sub to every node with
//! interest) → `hub` (the shards that own local connections) → `ws` (written
//! to each recipient). The persister, a separate process, stores the queue in
//! PostgreSQL; `history` reads it back for the REST API.
//!
//! `App::build` binds and wires everything; `App::run` serves until the
//! shutdown token fires, then drains.

pub mod auth;
pub mod bus;
pub mod chats;
pub mod clock;
pub mod config;
pub mod history;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod queue;
pub mod redis_pool;
pub mod run_script;
pub mod server;
pub mod telemetry;
pub mod typing;
pub mod web;
pub mod ws;

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::bus::Origin;
use crate::chats::Chats;
use crate::clock::Clock;
use crate::config::Config;
use crate::history::cache::{CacheSettings, RecentCache};
use crate::history::db::Db;
use crate::history::History;
use crate::hub::Hub;
use crate::limits::{ConnLimits, Limits, RateLimiter};
use crate::metrics::Metrics;
use crate::queue::{Queue, QueueSettings};
use crate::redis_pool::RedisPool;
use crate::typing::Typing;
use crate::ws::drain::DrainPacer;

/// Everything a request or a session needs, shared by all of them.
pub struct Services {
    pub config: Config,
    pub verifier: Verifier,
    pub hub: Hub,
    pub queue: Queue,
    pub chats: Chats,
    pub typing: Typing,
    pub history: History,
    /// This node's clock against Redis's, for readiness.
    pub clock: Clock,
    pub origin: Origin,
    pub metrics: Metrics,
    pub next_conn: AtomicU64,
    /// Fires when the node starts draining.
    pub shutdown: CancellationToken,
    /// Every WebSocket session, so a drain can wait for their 1001 closes
    /// (the HTTP server stops tracking a connection once it is upgraded).
    pub sessions: TaskTracker,
    /// Paces the 1001 closes of a drain.
    pub drain: DrainPacer,
    pub limits: Arc<Limits>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot reach redis at start: {0}")]
    Redis(#[from] redis_pool::RedisError),
    #[error("bad DATABASE_URL: {0}")]
    Database(String),
}

pub struct App {
    listener: TcpListener,
    services: Arc<Services>,
    bus_stop: CancellationToken,
}

impl App {
    /// Connects to Redis, prepares the PostgreSQL pool, starts the hub and
    /// the bus, and binds the listener.
    pub async fn build(config: Config) -> Result<App, StartError> {
        let metrics = Metrics::install(&config.node_id);
        let redis = RedisPool::connect(&config.redis_url, config.redis_connections, config.redis_timeout).await?;
        run_script::require_redis_7(&redis).await?;
        let pool = pg_pool(&config)?;
        let shutdown = CancellationToken::new();
        // The bus outlives the drain: sockets not yet closed keep receiving.
        let bus_stop = CancellationToken::new();
        let origin = Origin::new();

        let mut interest_tx = Vec::with_capacity(config.shards);
        let mut interest_rx = Vec::with_capacity(config.shards);
        for _ in 0..config.shards {
            let (tx, rx) = mpsc::channel(1024);
            interest_tx.push(tx);
            interest_rx.push(rx);
        }
        let hub = Hub::start(interest_tx, 4096);
        for (shard, rx) in interest_rx.into_iter().enumerate() {
            bus::subscriber::spawn(
                redis.client().clone(),
                shard,
                hub.clone(),
                origin.clone(),
                rx,
                bus::subscriber::BusSettings {
                    heartbeat: config.bus_heartbeat,
                    connect_timeout: config.redis_timeout,
                },
                bus_stop.clone(),
            );
        }

        let queue = Queue::new(
            redis.clone(),
            QueueSettings {
                idempotency_ttl_secs: config.idempotency_ttl_secs,
                seq_restart_gap: config.seq_restart_gap,
                cache_size: config.cache_size,
                cache_ttl_secs: config.cache_ttl_secs,
            },
        );
        let services = Arc::new(Services {
            verifier: Verifier::new(config.jwt_secret.expose()),
            queue: queue.clone(),
            chats: Chats::new(redis.clone(), config.seq_restart_gap),
            typing: Typing::new(redis.clone(), config.typing_interval_ms),
            history: History::new(
                Db::new(pool),
                RecentCache::new(
                    redis.clone(),
                    CacheSettings {
                        size: config.cache_size,
                        ttl_secs: config.cache_ttl_secs,
                    },
                ),
                queue,
            ),
            hub,
            clock: Clock::new(redis),
            origin,
            metrics,
            next_conn: AtomicU64::new(1),
            shutdown,
            sessions: TaskTracker::new(),
            drain: DrainPacer::new(config.drain_close_rate, config.drain),
            limits: Arc::new(Limits {
                sends: RateLimiter::new(config.send_rate),
                joins: RateLimiter::new(config.join_rate),
                rest: RateLimiter::new(config.rest_rate),
                conns: ConnLimits::new(config.max_conns_per_user, config.max_conns),
            }),
            config,
        });
        Limits::spawn_sweeper(services.limits.clone());
        let addr = services.config.listen;
        let listener = listen(addr).map_err(|source| StartError::Bind { addr, source })?;
        Ok(App {
            listener,
            services,
            bus_stop,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` resolves, then drains: `/readyz` turns 503, new
    /// WebSocket handshakes get 503, sessions close with 1001 at the paced rate
    /// (each keeps working until its turn, then answers what it has received),
    /// and the server stops within the grace period.
    pub async fn run(self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let services = self.services.clone();
        let grace = services.config.drain;
        let shutdown = services.shutdown.clone();
        let routes = http::routes(services.clone());
        let handshake_timeout = services.config.handshake_timeout;
        // The listener stays open through the drain, so probes and load
        // balancers read `/readyz` 503 (and new WebSockets get 503) rather
        // than a refused connection; it closes once the sessions are gone.
        let listener_stop = CancellationToken::new();
        let server = tokio::spawn(server::serve(
            self.listener,
            routes,
            handshake_timeout,
            listener_stop.clone(),
        ));
        stop.await;
        tracing::info!("draining");
        shutdown.cancel();
        // Sessions see the token, take their turn, finish their current
        // event and close with 1001, within the grace period.
        services.sessions.close();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, services.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(left = services.sessions.len(), "grace period over; closing the rest");
        }
        listener_stop.cancel();
        let _ = tokio::time::timeout_at(
            deadline.max(tokio::time::Instant::now() + Duration::from_secs(1)),
            server,
        )
        .await;
        self.bus_stop.cancel();
    }
}

fn pg_pool(config: &Config) -> Result<Pool, StartError> {
    let pg = tokio_postgres::Config::from_str(&config.database_url).map_err(|e| StartError::Database(e.to_string()))?;
    let manager = Manager::from_config(
        pg,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(config.db_pool)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| StartError::Database(e.to_string()))
}

/// A random number, for node tags and for spreading waits (uuid's
/// generator: a per-thread ChaCha seeded from the OS, no system call).
pub(crate) fn random_u64() -> u64 {
    uuid::Uuid::new_v4().as_u128() as u64
}

/// Handshakes the kernel may complete before the server accepts them. A
/// burst of clients reconnecting after a node went away arrives at once;
/// `TcpListener::bind`'s 128 made the kernel drop SYNs from 128 on (each
/// retried a second later). The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}
