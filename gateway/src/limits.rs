//! Per-user limits of this node: token buckets for sends, joins and REST
//! calls, and connection counts per user and per node.
//!
//! Buckets live in a `DashMap` (a short, sharded lock per lookup, never held
//! across an await). Limits are per node: a user connected to k nodes may
//! reach k times a rate, which bounds abuse by the connection limit and
//! keeps the hot path free of a Redis round trip. Idle full buckets are
//! swept so memory follows active users.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use shared::ids::UserId;

use crate::config::Rate;

/// A token bucket per user.
pub struct RateLimiter {
    rate: Rate,
    buckets: DashMap<UserId, Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> RateLimiter {
        RateLimiter {
            rate,
            buckets: DashMap::new(),
        }
    }

    /// Takes one token for `user`; false when the user is over the limit.
    pub fn allow(&self, user: UserId) -> bool {
        self.allow_at(user, Instant::now())
    }

    fn allow_at(&self, user: UserId, now: Instant) -> bool {
        let mut bucket = self.buckets.entry(user).or_insert(Bucket {
            tokens: self.rate.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate.per_sec).min(self.rate.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled: they hold nothing a new one would not.
    pub fn sweep(&self) {
        let now = Instant::now();
        let refill = Duration::from_secs_f64(self.rate.burst / self.rate.per_sec);
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < refill);
    }
}

/// Why a connection was refused at the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnRefused {
    #[error("too many connections for this user")]
    User,
    #[error("this node is full")]
    Node,
}

/// Counts connections per user and per node.
pub struct ConnLimits {
    per_user: usize,
    per_node: usize,
    users: DashMap<UserId, usize>,
    total: AtomicUsize,
}

impl ConnLimits {
    pub fn new(per_user: usize, per_node: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            per_user,
            per_node,
            users: DashMap::new(),
            total: AtomicUsize::new(0),
        })
    }

    /// Counts a new connection of `user`; dropping the slot uncounts it.
    pub fn admit(self: &Arc<Self>, user: UserId) -> Result<ConnSlot, ConnRefused> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.per_node {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnRefused::Node);
        }
        let mut count = self.users.entry(user).or_insert(0);
        if *count >= self.per_user {
            drop(count);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnRefused::User);
        }
        *count += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            user,
        })
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One counted connection.
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    user: UserId,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        if let dashmap::Entry::Occupied(mut e) = self.limits.users.entry(self.user) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

/// The node's limits, shared by sessions and HTTP handlers.
pub struct Limits {
    pub sends: RateLimiter,
    pub joins: RateLimiter,
    pub rest: RateLimiter,
    pub conns: Arc<ConnLimits>,
}

impl Limits {
    /// Sweeps idle buckets every minute until the process ends.
    pub fn spawn_sweeper(limits: Arc<Limits>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                limits.sends.sweep();
                limits.joins.sweep();
                limits.rest.sweep();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(Rate {
            per_sec: 10.0,
            burst: 3.0,
        });
        let (user, t0) = (uuid::Uuid::now_v7(), Instant::now());
        assert!((0..3).all(|_| limiter.allow_at(user, t0)));
        assert!(!limiter.allow_at(user, t0), "the burst is spent");
        assert!(
            limiter.allow_at(user, t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!limiter.allow_at(user, t0 + Duration::from_millis(150)));
        // Another user has a bucket of their own.
        assert!(limiter.allow_at(uuid::Uuid::now_v7(), t0));
    }

    #[test]
    fn connection_slots_are_counted_per_user_and_node_and_released_on_drop() {
        let limits = ConnLimits::new(2, 3);
        let (a, b) = (uuid::Uuid::now_v7(), uuid::Uuid::now_v7());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).err(), Some(ConnRefused::User));
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).err(), Some(ConnRefused::Node));
        drop(a1);
        assert_eq!(limits.total(), 2);
        assert!(limits.admit(b).is_ok());
    }
}
