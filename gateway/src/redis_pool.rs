//! A small pool of multiplexed Redis connections for commands and scripts.
//!
//! Owns connection setup, reconnection (redis-rs's ConnectionManager
//! reconnects by itself) and the per-call timeout. Several connections, so no
//! single socket or task carries every command of the node; callers pick one
//! by a key (the chat) or round robin. It never subscribes: pub/sub has its own
//! connections in `bus::subscriber`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, ScriptInvocation};

/// Redis could not answer: down, restarting, or slower than the timeout.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis timed out after {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from redis: {0}")]
    Reply(String),
}

#[derive(Clone)]
pub struct RedisPool {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
    timeout: Duration,
}

impl RedisPool {
    /// Connects `size` multiplexed connections. Fails if Redis is not
    /// reachable now; afterwards each connection reconnects by itself.
    pub async fn connect(url: &str, size: usize, timeout: Duration) -> Result<RedisPool, RedisError> {
        let client = redis::Client::open(url).map_err(|e| RedisError::Unavailable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(timeout)
            .set_connection_timeout(timeout)
            .set_number_of_retries(2)
            .set_max_delay(500);
        let mut conns = Vec::with_capacity(size);
        for _ in 0..size {
            let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
                .await
                .map_err(|e| RedisError::Unavailable(e.to_string()))?;
            conns.push(conn);
        }
        Ok(RedisPool {
            inner: Arc::new(Inner {
                client,
                conns,
                next: AtomicUsize::new(0),
                timeout,
            }),
        })
    }

    /// The client, for opening pub/sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    pub(crate) fn pick(&self) -> ConnectionManager {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.conns.len();
        self.inner.conns[i].clone()
    }

    /// Runs a script (EVALSHA, loading it again after a Redis restart).
    pub async fn run<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, RedisError> {
        let mut conn = self.pick();
        self.timed(invocation.invoke_async(&mut conn)).await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let mut conn = self.pick();
        self.timed(cmd.query_async(&mut conn)).await
    }

    /// Answers whether Redis replies to PING within the timeout.
    pub async fn ping(&self) -> bool {
        self.query::<String>(&redis::cmd("PING")).await.is_ok()
    }

    pub(crate) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        let result = match tokio::time::timeout(self.inner.timeout, fut).await {
            Err(_) => Err(RedisError::Timeout(self.inner.timeout)),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                Err(RedisError::Unavailable(e.to_string()))
            }
            Ok(Err(e)) if e.kind() == redis::ErrorKind::TypeError => Err(RedisError::Reply(e.to_string())),
            Ok(Err(e)) => Err(RedisError::Unavailable(e.to_string())),
        };
        // Scripts append to the stream and publish: their failures are the
        // node's queue and publish errors.
        if let Err(e) = &result {
            let kind = match e {
                RedisError::Unavailable(_) => "unavailable",
                RedisError::Timeout(_) => "timeout",
                RedisError::Reply(_) => "reply",
            };
            metrics::counter!("gateway_redis_errors_total", "kind" => kind).increment(1);
        }
        result
    }
}
