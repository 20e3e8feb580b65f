//! A small pool of multiplexed Redis connections for commands and scripts.
//!
//! Owns connection setup, reconnection and the per-call timeout. redis-rs's
//! ConnectionManager reconnects by itself after a connection error, but not
//! after a timeout: on a link that went silent (a host gone, a network
//! split: no FIN) it would wait until the kernel gives up, for minutes. So a
//! connection whose call timed out is replaced in the background. Several
//! connections, so no single socket or task carries every command of the
//! node; callers take them round robin. It never subscribes: pub/sub has its
//! own connections in `bus::subscriber`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
    config: ConnectionManagerConfig,
    slots: Vec<Slot>,
    next: AtomicUsize,
    timeout: Duration,
}

/// One connection of the pool. The lock is held only to clone or swap the
/// handle, never across an `.await`.
struct Slot {
    conn: Mutex<ConnectionManager>,
    /// A replacement is being connected.
    replacing: AtomicBool,
}

/// A connection picked for a call, and its place in the pool.
pub(crate) struct Picked {
    pub slot: usize,
    pub conn: ConnectionManager,
}

impl RedisPool {
    /// Connects `size` multiplexed connections. Fails if Redis is not
    /// reachable now; afterwards each connection reconnects by itself after
    /// an error, and is replaced after a timeout (`timed`).
    pub async fn connect(url: &str, size: usize, timeout: Duration) -> Result<RedisPool, RedisError> {
        let client = redis::Client::open(url).map_err(|e| RedisError::Unavailable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(timeout)
            .set_connection_timeout(timeout)
            .set_number_of_retries(2)
            .set_max_delay(500);
        let mut slots = Vec::with_capacity(size);
        for _ in 0..size {
            let conn = ConnectionManager::new_with_config(client.clone(), config.clone())
                .await
                .map_err(|e| RedisError::Unavailable(e.to_string()))?;
            slots.push(Slot {
                conn: Mutex::new(conn),
                replacing: AtomicBool::new(false),
            });
        }
        Ok(RedisPool {
            inner: Arc::new(Inner {
                client,
                config,
                slots,
                next: AtomicUsize::new(0),
                timeout,
            }),
        })
    }

    /// The client, for opening pub/sub connections.
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    pub(crate) fn pick(&self) -> Picked {
        let slot = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.slots.len();
        let conn = self.inner.slots[slot]
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Picked { slot, conn }
    }

    /// Runs a script (EVALSHA, loading it again after a Redis restart).
    pub async fn run<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, RedisError> {
        let mut picked = self.pick();
        self.timed(picked.slot, invocation.invoke_async(&mut picked.conn)).await
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, RedisError> {
        let mut picked = self.pick();
        self.timed(picked.slot, cmd.query_async(&mut picked.conn)).await
    }

    /// Connects a new connection for `slot` in the background and puts it
    /// in place of the old one (which closes once the calls on it are done).
    fn replace(&self, slot: usize) {
        if self.inner.slots[slot].replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let fresh = ConnectionManager::new_with_config(inner.client.clone(), inner.config.clone()).await;
            let slot = &inner.slots[slot];
            match fresh {
                Ok(conn) => {
                    *slot.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
                    metrics::counter!("gateway_redis_reconnects_total").increment(1);
                }
                // The old connection stays; the next timeout tries again.
                Err(e) => tracing::warn!(error = %e, "could not replace a Redis connection that timed out"),
            }
            slot.replacing.store(false, Ordering::Release);
        });
    }

    /// Awaits `fut`, a call on the connection of `slot`, within the timeout;
    /// a call that timed out has that connection replaced.
    pub(crate) async fn timed<T>(
        &self,
        slot: usize,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisError> {
        let result = match tokio::time::timeout(self.inner.timeout, fut).await {
            Err(_) => {
                self.replace(slot);
                Err(RedisError::Timeout(self.inner.timeout))
            }
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => {
                self.replace(slot);
                Err(RedisError::Unavailable(e.to_string()))
            }
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => Err(RedisError::Unavailable(e.to_string())),
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
