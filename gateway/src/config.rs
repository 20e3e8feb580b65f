//! The gateway's configuration: one typed struct, read once at start.
//!
//! Every setting comes from an environment variable (table in README.md). A
//! bad value stops the process at start with a message naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use shared::config::{self, check, instance_name, or, required, ConfigError, Secret, Source};

/// The longest TTL the accept script may give a key: Redis refuses an
/// `EXPIRE` whose time overflows, and the script would fail after it has
/// queued the message.
const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// The largest seq jump after a Redis restart: seqs are Lua numbers in the
/// scripts, exact up to 2^53, which this leaves room for about 9,000
/// restarts.
const MAX_SEQ_RESTART_GAP: u64 = 1_000_000_000_000;

#[derive(Debug, Clone)]
pub struct Config {
    /// `GATEWAY_LISTEN`: where HTTP and WebSocket clients connect.
    pub listen: SocketAddr,
    /// `GATEWAY_WEB_DIR`: the browser client's files (`index.html`,
    /// `assets/`), served at `/`.
    pub web_dir: PathBuf,
    /// `CHAT_DEV_LOGIN=1`: `POST /v1/dev/login` issues a token for any name.
    /// Development only; off unless set.
    pub dev_login: bool,
    /// `GATEWAY_NODE_ID`: this node's name in logs and metrics.
    pub node_id: String,
    /// `CHAT_JWT_SECRET`: the HS256 key of client tokens.
    pub jwt_secret: Secret,
    /// `REDIS_URL`: pub/sub, the queue stream and chat state.
    pub redis_url: String,
    /// `DATABASE_URL`: PostgreSQL, read for history.
    pub database_url: String,
    /// `GATEWAY_WORKER_THREADS`: threads of the async runtime (default: the
    /// number of cores this process may use). Where several gateways share
    /// a machine, give each its share: a worker thread that has the work
    /// to itself writes queued frames in fewer, larger writes
    /// (docs/benchmarks.md).
    pub worker_threads: usize,
    /// `GATEWAY_SHARDS`: hub shards (default: the number of cores).
    pub shards: usize,
    /// `GATEWAY_REDIS_CONNECTIONS`: multiplexed connections for commands.
    pub redis_connections: usize,
    /// `GATEWAY_REDIS_TIMEOUT_MS`: a Redis call slower than this fails the
    /// event with `unavailable` (the client retries with the same `id`).
    pub redis_timeout: Duration,
    /// `GATEWAY_BUS_HEARTBEAT_MS`: each bus subscriber connection is PINGed
    /// this often; one that answers nothing for 3 intervals is taken for
    /// dead and replaced (a network split or a vanished host sends no FIN).
    pub bus_heartbeat: Duration,
    /// `GATEWAY_DB_POOL`: PostgreSQL connections for history.
    pub db_pool: usize,
    /// `CHAT_MAX_BODY_BYTES`: the largest `body` accepted (`too_large` above).
    pub max_body_bytes: usize,
    /// `GATEWAY_MAX_FRAME_BYTES`: the largest frame read (close 1009 above).
    pub max_frame_bytes: usize,
    /// `GATEWAY_OUTBOUND_QUEUE`: frames queued for one slow reader before it
    /// is closed with 1008.
    pub outbound_queue: usize,
    /// `CHAT_IDEMPOTENCY_TTL_SECS`: how long a message `id` is remembered in
    /// Redis for resends (PostgreSQL's primary key dedupes after that).
    pub idempotency_ttl_secs: u64,
    /// `CHAT_SEQ_RESTART_GAP`: how far a chat's seq, and its membership
    /// version, jump after a Redis restart (docs/architecture.md, Ordering).
    pub seq_restart_gap: u64,
    /// `CHAT_TYPING_INTERVAL_MS`: at most one typing event per sender and
    /// target in this interval.
    pub typing_interval_ms: u64,
    /// `CHAT_CACHE_SIZE`: recent messages kept per chat in Redis (0: off).
    pub cache_size: usize,
    /// `CHAT_CACHE_TTL_SECS`: a chat's cache expires after this long idle.
    pub cache_ttl_secs: u64,
    /// `GATEWAY_SEND_RATE` / `GATEWAY_SEND_BURST`: sends per user per second
    /// on this node, and the burst allowed above it (`rate_limited`).
    pub send_rate: Rate,
    /// `GATEWAY_JOIN_RATE` / `GATEWAY_JOIN_BURST`: joins and leaves per user.
    pub join_rate: Rate,
    /// `GATEWAY_REST_RATE` / `GATEWAY_REST_BURST`: REST calls per user.
    pub rest_rate: Rate,
    /// `GATEWAY_MAX_CONNS_PER_USER`: connections of one user on this node
    /// (HTTP 429 at the handshake above it).
    pub max_conns_per_user: usize,
    /// `GATEWAY_MAX_CONNS`: connections on this node (HTTP 503 above it).
    pub max_conns: usize,
    /// `GATEWAY_ALLOWED_ORIGINS`: comma-separated `Origin`s allowed to open a
    /// WebSocket; empty allows any (development).
    pub allowed_origins: Vec<String>,
    /// `GATEWAY_PING_INTERVAL_SECS`: the server pings an idle connection this often.
    pub ping_interval: Duration,
    /// `GATEWAY_PING_TIMEOUT_SECS`: checked at each ping, a connection that
    /// has been silent longer than interval + timeout is dropped (so at most
    /// 2 × interval + timeout after the last thing it sent).
    pub ping_timeout: Duration,
    /// `GATEWAY_HANDSHAKE_TIMEOUT_SECS`: time to send a request's headers,
    /// and the bound of registering a WebSocket (`ws::open`; 503 after it).
    pub handshake_timeout: Duration,
    /// `GATEWAY_DRAIN_SECS`: the grace period of a shutdown.
    pub drain: Duration,
    /// `GATEWAY_DRAIN_CLOSE_RATE`: sockets closed per second while draining
    /// (0: all at once).
    pub drain_close_rate: f64,
    /// `LOG_FORMAT`: `text` or `json`.
    pub log_json: bool,
    /// `RUST_LOG`: which log events are written, as tracing's `EnvFilter`
    /// directives (`info`, `warn,gateway=debug`, …).
    pub log_filter: String,
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_source(&config::Env)
    }

    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let jwt_secret: Secret = required(src, "CHAT_JWT_SECRET")?;
        if jwt_secret.expose().len() < 16 {
            return Err(ConfigError::Invalid {
                name: "CHAT_JWT_SECRET",
                value: "***".into(),
                reason: "must be at least 16 bytes".into(),
            });
        }
        let log_format: String = or(src, "LOG_FORMAT", "text".to_string())?;
        let log_format = check("LOG_FORMAT", log_format, |f| f == "text" || f == "json", "text or json")?;
        let log_filter: String = or(src, "RUST_LOG", "info".to_string())?;
        if let Err(e) = crate::telemetry::parse_filter(&log_filter) {
            return Err(ConfigError::Invalid {
                name: "RUST_LOG",
                value: log_filter,
                reason: e.to_string(),
            });
        }
        Ok(Config {
            listen: or(src, "GATEWAY_LISTEN", "0.0.0.0:8080".parse().expect("valid literal"))?,
            web_dir: or(src, "GATEWAY_WEB_DIR", crate::web::default_web_dir().to_path_buf())?,
            dev_login: match or(src, "CHAT_DEV_LOGIN", "0".to_string())?.as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                other => {
                    return Err(ConfigError::Invalid {
                        name: "CHAT_DEV_LOGIN",
                        value: other.to_string(),
                        reason: "1 (on) or 0 (off)".into(),
                    })
                }
            },
            node_id: or(src, "GATEWAY_NODE_ID", instance_name("gateway"))?,
            jwt_secret,
            redis_url: or(src, "REDIS_URL", "redis://127.0.0.1:6379".to_string())?,
            database_url: or(
                src,
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/chat".to_string(),
            )?,
            worker_threads: check(
                "GATEWAY_WORKER_THREADS",
                or(src, "GATEWAY_WORKER_THREADS", cores)?,
                |n| (1..=256).contains(n),
                "1..=256",
            )?,
            shards: check(
                "GATEWAY_SHARDS",
                or(src, "GATEWAY_SHARDS", cores)?,
                |n| (1..=1024).contains(n),
                "1..=1024",
            )?,
            redis_connections: check(
                "GATEWAY_REDIS_CONNECTIONS",
                or(src, "GATEWAY_REDIS_CONNECTIONS", cores.clamp(2, 8))?,
                |n| (1..=64).contains(n),
                "1..=64",
            )?,
            redis_timeout: Duration::from_millis(check(
                "GATEWAY_REDIS_TIMEOUT_MS",
                or(src, "GATEWAY_REDIS_TIMEOUT_MS", 2000u64)?,
                |n| *n >= 10,
                "at least 10",
            )?),
            bus_heartbeat: Duration::from_millis(check(
                "GATEWAY_BUS_HEARTBEAT_MS",
                or(src, "GATEWAY_BUS_HEARTBEAT_MS", 5000u64)?,
                |n| (10..=300_000).contains(n),
                "10..=300000 (5 minutes)",
            )?),
            db_pool: check(
                "GATEWAY_DB_POOL",
                or(src, "GATEWAY_DB_POOL", 8usize)?,
                |n| *n >= 1,
                "at least 1",
            )?,
            // A chat message, not a file: the bus refuses publications over
            // 16 MiB (bus::resp), so a body stays far below that.
            max_body_bytes: check(
                "CHAT_MAX_BODY_BYTES",
                or(src, "CHAT_MAX_BODY_BYTES", 4096usize)?,
                |n| (1..=1_048_576).contains(n),
                "1..=1048576 (1 MiB)",
            )?,
            max_frame_bytes: check(
                "GATEWAY_MAX_FRAME_BYTES",
                or(src, "GATEWAY_MAX_FRAME_BYTES", 65536usize)?,
                |n| *n >= 1024,
                "at least 1024",
            )?,
            outbound_queue: check(
                "GATEWAY_OUTBOUND_QUEUE",
                or(src, "GATEWAY_OUTBOUND_QUEUE", 1024usize)?,
                |n| *n >= 8,
                "at least 8",
            )?,
            idempotency_ttl_secs: check(
                "CHAT_IDEMPOTENCY_TTL_SECS",
                or(src, "CHAT_IDEMPOTENCY_TTL_SECS", 86_400u64)?,
                |n| (60..=MAX_TTL_SECS).contains(n),
                &format!("from 60 to {MAX_TTL_SECS} (a year)"),
            )?,
            seq_restart_gap: check(
                "CHAT_SEQ_RESTART_GAP",
                or(src, "CHAT_SEQ_RESTART_GAP", 1_000_000u64)?,
                |n| (1000..=MAX_SEQ_RESTART_GAP).contains(n),
                &format!("from 1000 to {MAX_SEQ_RESTART_GAP}"),
            )?,
            typing_interval_ms: check(
                "CHAT_TYPING_INTERVAL_MS",
                or(src, "CHAT_TYPING_INTERVAL_MS", 1000u64)?,
                |n| *n >= 1,
                "at least 1",
            )?,
            cache_size: check(
                "CHAT_CACHE_SIZE",
                or(src, "CHAT_CACHE_SIZE", 200usize)?,
                |n| *n <= 10_000,
                "0 (off) to 10000",
            )?,
            cache_ttl_secs: check(
                "CHAT_CACHE_TTL_SECS",
                or(src, "CHAT_CACHE_TTL_SECS", 3600u64)?,
                |n| (1..=MAX_TTL_SECS).contains(n),
                &format!("from 1 to {MAX_TTL_SECS} (a year)"),
            )?,
            send_rate: rate(src, "GATEWAY_SEND_RATE", 20.0, "GATEWAY_SEND_BURST", 40.0)?,
            join_rate: rate(src, "GATEWAY_JOIN_RATE", 2.0, "GATEWAY_JOIN_BURST", 10.0)?,
            rest_rate: rate(src, "GATEWAY_REST_RATE", 10.0, "GATEWAY_REST_BURST", 30.0)?,
            max_conns_per_user: check(
                "GATEWAY_MAX_CONNS_PER_USER",
                or(src, "GATEWAY_MAX_CONNS_PER_USER", 16usize)?,
                |n| *n >= 1,
                "at least 1",
            )?,
            max_conns: check(
                "GATEWAY_MAX_CONNS",
                or(src, "GATEWAY_MAX_CONNS", 100_000usize)?,
                |n| *n >= 1,
                "at least 1",
            )?,
            allowed_origins: or(src, "GATEWAY_ALLOWED_ORIGINS", String::new())?
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            ping_interval: Duration::from_secs(check(
                "GATEWAY_PING_INTERVAL_SECS",
                or(src, "GATEWAY_PING_INTERVAL_SECS", 30u64)?,
                |n| *n >= 1,
                "at least 1",
            )?),
            ping_timeout: Duration::from_secs(check(
                "GATEWAY_PING_TIMEOUT_SECS",
                or(src, "GATEWAY_PING_TIMEOUT_SECS", 10u64)?,
                |n| *n >= 1,
                "at least 1",
            )?),
            handshake_timeout: Duration::from_secs(check(
                "GATEWAY_HANDSHAKE_TIMEOUT_SECS",
                or(src, "GATEWAY_HANDSHAKE_TIMEOUT_SECS", 10u64)?,
                |n| *n >= 1,
                "at least 1",
            )?),
            drain: Duration::from_secs(or(src, "GATEWAY_DRAIN_SECS", 10u64)?),
            drain_close_rate: check(
                "GATEWAY_DRAIN_CLOSE_RATE",
                or(src, "GATEWAY_DRAIN_CLOSE_RATE", 1000.0f64)?,
                |r| *r >= 0.0,
                "0 (all at once) or more",
            )?,
            log_json: log_format == "json",
            log_filter,
        })
    }
}

/// A token-bucket limit: `per_sec` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

fn rate(
    src: &dyn Source,
    rate_name: &'static str,
    rate_default: f64,
    burst_name: &'static str,
    burst_default: f64,
) -> Result<Rate, ConfigError> {
    let per_sec = check(
        rate_name,
        or(src, rate_name, rate_default)?,
        |r| *r > 0.0,
        "a positive number",
    )?;
    let burst = check(
        burst_name,
        or(src, burst_name, burst_default)?,
        |b| *b >= 1.0,
        "at least 1",
    )?;
    Ok(Rate { per_sec, burst })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_need_only_the_secret() {
        let c = Config::from_source(&env(&[("CHAT_JWT_SECRET", "0123456789abcdef")])).unwrap();
        assert_eq!(c.max_body_bytes, 4096);
        assert!(!c.dev_login, "the development sign-in is off unless asked for");
        assert!(c.web_dir.ends_with("web/public"));
        assert!(c.shards >= 1);
        assert!(c.worker_threads >= 1);
        assert_eq!(c.log_filter, "info");
        assert_eq!(c.bus_heartbeat, Duration::from_secs(5));
    }

    #[test]
    fn a_bad_value_stops_start_naming_the_variable() {
        for (name, value) in [
            ("GATEWAY_SHARDS", "0"),
            ("GATEWAY_WORKER_THREADS", "0"),
            ("CHAT_MAX_BODY_BYTES", "2000000"),
            ("CHAT_DEV_LOGIN", "yes"),
            ("RUST_LOG", "gateway=loud"),
            ("GATEWAY_BUS_HEARTBEAT_MS", "0"),
            ("GATEWAY_BUS_HEARTBEAT_MS", "soon"),
            ("CHAT_IDEMPOTENCY_TTL_SECS", "99999999999999"),
            ("CHAT_CACHE_TTL_SECS", "31536001"),
            ("CHAT_SEQ_RESTART_GAP", "1000000000001"),
        ] {
            let err = Config::from_source(&env(&[("CHAT_JWT_SECRET", "0123456789abcdef"), (name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{name}=\"{value}\" is invalid")), "{err}");
        }
        let err = Config::from_source(&env(&[])).unwrap_err().to_string();
        assert!(err.contains("CHAT_JWT_SECRET"), "{err}");
    }
}
