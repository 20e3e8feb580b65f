//! The persister's whole configuration, read once from the environment.
//!
//! Owns the variable names, their defaults and their valid ranges; every bad
//! value is a `ConfigError` naming the variable. It must never connect to
//! anything or read the environment after start: other modules get their
//! settings from `Config`.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use shared::config::{check, instance_name, or, ConfigError, Env, Secret, Source};

use crate::retry::RetryPolicy;

/// How log lines on stderr look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected `text` or `json`".into()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// REDIS_URL: the Redis holding the queue stream. A secret because it may
    /// carry a password.
    pub redis_url: Secret,
    /// DATABASE_URL: the PostgreSQL database the jobs are stored in.
    pub database_url: Secret,
    /// PERSISTER_CONSUMER: this process's consumer name in the group. Two live
    /// processes must not share one, or they would read each other's pending
    /// entries as their own.
    pub consumer: String,
    /// PERSISTER_BATCH_SIZE: entries read (and written in one transaction) at most.
    pub batch_size: usize,
    /// PERSISTER_CONCURRENCY: batches in flight at once, each read and
    /// written by a worker of its own (consumer `<consumer>/<n>` for n ≥ 1).
    pub concurrency: usize,
    /// PERSISTER_BLOCK_MS: how long one XREADGROUP waits for new entries.
    pub block: Duration,
    /// PERSISTER_LINGER_MS: after a read that drained the stream, how long a
    /// lane waits before reading again, so the next batch is more than a
    /// few entries (each batch is a transaction and a WAL flush). 0: none.
    pub linger: Duration,
    /// PERSISTER_CLAIM_IDLE_MS: pending entries idle longer than this are
    /// taken over from whichever consumer read them (it is presumed dead).
    pub claim_idle: Duration,
    /// PERSISTER_MAX_DELIVERIES, PERSISTER_RETRY_MS, PERSISTER_RETRY_MAX_MS:
    /// how often and how far apart an entry PostgreSQL refuses is tried
    /// before it moves to the dead-letter stream.
    pub retry: RetryPolicy,
    /// PERSISTER_METRICS_LISTEN: where /metrics and /healthz are served.
    pub metrics_listen: SocketAddr,
    /// PERSISTER_DB_POOL: PostgreSQL connections at most.
    pub db_pool: usize,
    /// LOG_FORMAT.
    pub log_format: LogFormat,
    /// RUST_LOG: a tracing `EnvFilter` directive.
    pub log_filter: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_source(&Env)
    }

    /// Reads any source (a map in tests).
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let redis_url = or(src, "REDIS_URL", secret("redis://127.0.0.1:6379"))?;
        if let Err(e) = redis::Client::open(redis_url.expose()) {
            return Err(invalid_secret("REDIS_URL", e.to_string()));
        }
        let database_url = or(src, "DATABASE_URL", secret("postgres://postgres@127.0.0.1:5432/chat"))?;
        if let Err(e) = tokio_postgres::Config::from_str(database_url.expose()) {
            return Err(invalid_secret("DATABASE_URL", e.to_string()));
        }
        let consumer = match src.get("PERSISTER_CONSUMER") {
            Some(name) => check(
                "PERSISTER_CONSUMER",
                name,
                |n| !n.chars().any(char::is_whitespace),
                "a consumer name without whitespace",
            )?,
            None => instance_name("persister"),
        };
        let batch_size = check(
            "PERSISTER_BATCH_SIZE",
            or(src, "PERSISTER_BATCH_SIZE", 5000usize)?,
            |n| (1..=10_000).contains(n),
            "between 1 and 10000",
        )?;
        let concurrency = check(
            "PERSISTER_CONCURRENCY",
            or(src, "PERSISTER_CONCURRENCY", 2usize)?,
            |n| (1..=32).contains(n),
            "between 1 and 32",
        )?;
        let block_ms = check(
            "PERSISTER_BLOCK_MS",
            or(src, "PERSISTER_BLOCK_MS", 1000u64)?,
            |n| (1..=300_000).contains(n),
            "between 1 and 300000 (0 would block forever)",
        )?;
        let linger_ms = check(
            "PERSISTER_LINGER_MS",
            or(src, "PERSISTER_LINGER_MS", 10u64)?,
            |n| *n <= 1000,
            "between 0 and 1000",
        )?;
        let claim_idle_ms = check(
            "PERSISTER_CLAIM_IDLE_MS",
            or(src, "PERSISTER_CLAIM_IDLE_MS", 30_000u64)?,
            |n| *n >= 10,
            "at least 10",
        )?;
        let max_deliveries = check(
            "PERSISTER_MAX_DELIVERIES",
            or(src, "PERSISTER_MAX_DELIVERIES", 5u64)?,
            |n| (1..=1000).contains(n),
            "between 1 and 1000",
        )?;
        let retry_ms = check(
            "PERSISTER_RETRY_MS",
            or(src, "PERSISTER_RETRY_MS", 250u64)?,
            |n| (1..=600_000).contains(n),
            "between 1 and 600000",
        )?;
        let retry_max_ms = check(
            "PERSISTER_RETRY_MAX_MS",
            or(src, "PERSISTER_RETRY_MAX_MS", 5000u64)?,
            |n| (retry_ms..=600_000).contains(n),
            "between PERSISTER_RETRY_MS and 600000",
        )?;
        let metrics_listen = or(src, "PERSISTER_METRICS_LISTEN", SocketAddr::from(([0, 0, 0, 0], 9091)))?;
        let db_pool = check(
            "PERSISTER_DB_POOL",
            or(src, "PERSISTER_DB_POOL", 4usize)?,
            |n| (1..=256).contains(n),
            "between 1 and 256",
        )?;
        let log_format = or(src, "LOG_FORMAT", LogFormat::Text)?;
        let log_filter = or(src, "RUST_LOG", "info".to_string())?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::Invalid {
                name: "RUST_LOG",
                value: log_filter,
                reason: e.to_string(),
            });
        }
        Ok(Config {
            redis_url,
            database_url,
            consumer,
            batch_size,
            concurrency,
            block: Duration::from_millis(block_ms),
            linger: Duration::from_millis(linger_ms),
            claim_idle: Duration::from_millis(claim_idle_ms),
            retry: RetryPolicy {
                max_deliveries,
                first_delay: Duration::from_millis(retry_ms),
                max_delay: Duration::from_millis(retry_max_ms),
            },
            metrics_listen,
            db_pool,
            log_format,
            log_filter,
        })
    }
}

fn secret(text: &str) -> Secret {
    let Ok(secret) = text.parse();
    secret
}

/// A URL that does not parse; its value is not echoed, as it may hold a password.
fn invalid_secret(name: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid {
        name,
        value: "***".into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = Config::from_source(&env(&[])).unwrap();
        assert_eq!(c.redis_url.expose(), "redis://127.0.0.1:6379");
        assert_eq!(c.database_url.expose(), "postgres://postgres@127.0.0.1:5432/chat");
        assert!(c.consumer.ends_with(&format!("-{}", std::process::id())));
        assert_eq!(c.batch_size, 5000);
        assert_eq!(c.concurrency, 2);
        assert_eq!(c.block, Duration::from_millis(1000));
        assert_eq!(c.linger, Duration::from_millis(10));
        assert_eq!(c.claim_idle, Duration::from_millis(30_000));
        assert_eq!(c.retry, RetryPolicy::default());
        assert_eq!(c.metrics_listen, "0.0.0.0:9091".parse().unwrap());
        assert_eq!(c.db_pool, 4);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.log_filter, "info");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("PERSISTER_BATCH_SIZE", "0"),
            ("PERSISTER_BATCH_SIZE", "10001"),
            ("PERSISTER_CONCURRENCY", "0"),
            ("PERSISTER_BLOCK_MS", "0"),
            ("PERSISTER_LINGER_MS", "1001"),
            ("PERSISTER_MAX_DELIVERIES", "0"),
            ("PERSISTER_RETRY_MS", "0"),
            ("PERSISTER_RETRY_MAX_MS", "100"),
            ("PERSISTER_METRICS_LISTEN", "nowhere"),
            ("LOG_FORMAT", "xml"),
            ("DATABASE_URL", "postgres://u:pw@host:notaport/db"),
            ("REDIS_URL", "http://pw@x"),
        ] {
            let err = Config::from_source(&env(&[(name, value)])).unwrap_err().to_string();
            assert!(err.starts_with(name), "{name}={value}: {err}");
            assert!(!err.contains("pw"), "a URL's password leaked: {err}");
        }
    }

    #[test]
    fn set_values_are_used() {
        let c = Config::from_source(&env(&[
            ("PERSISTER_CONSUMER", "p1"),
            ("PERSISTER_BATCH_SIZE", "10"),
            ("PERSISTER_MAX_DELIVERIES", "2"),
            ("PERSISTER_RETRY_MS", "20"),
            ("PERSISTER_RETRY_MAX_MS", "40"),
            ("PERSISTER_METRICS_LISTEN", "127.0.0.1:0"),
            ("LOG_FORMAT", "json"),
        ]))
        .unwrap();
        assert_eq!(c.consumer, "p1");
        assert_eq!(c.batch_size, 10);
        assert_eq!(
            c.retry,
            RetryPolicy {
                max_deliveries: 2,
                first_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(40),
            }
        );
        assert_eq!(c.metrics_listen.port(), 0);
        assert_eq!(c.log_format, LogFormat::Json);
    }
}
