//! This node's clock, and how far it is from Redis's.
//!
//! Every message's `ts` is this node's clock (`now_ms`), and the accept
//! script refuses a call that Redis runs more than `ACCEPT_DEADLINE_MS`
//! after that stamp by Redis's own clock (queue.rs). So a gateway whose
//! clock lags Redis's by more than the deadline has every send refused: it
//! cannot serve, and readiness says so (`Clock::check`), so a load balancer
//! sends new connections to a node that can take their messages (open
//! WebSockets stay, and their sends fail until they reconnect). A clock off by
//! less, or ahead, still serves (one ahead makes history wait that much
//! longer at holes for good, history/holes.rs); `gateway_clock_offset_seconds`
//! shows every offset, for an alert long before the deadline.
//!
//! Owns reading the local clock for `ts` and measuring the offset. It never
//! corrects a clock or a message's `ts`: the clocks are the operator's (NTP).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::queue::ACCEPT_DEADLINE_MS;
use crate::redis_pool::{RedisError, RedisPool};

/// Redis's clock minus this node's, from one `TIME` read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset {
    /// Positive: this node's clock is behind Redis's.
    pub ms: i64,
    /// Half the round trip of the read: the offset is known to within this.
    pub uncertainty_ms: i64,
}

impl Offset {
    /// The offset of a `TIME` answer (`redis_ms`) to a read that began at
    /// `sent_ms` on this node's clock and took `round_trip_ms` (measured on
    /// the monotonic clock, which an NTP step does not move): Redis
    /// answered some time in between, taken as the middle.
    pub fn from_read(sent_ms: i64, round_trip_ms: i64, redis_ms: i64) -> Offset {
        let round_trip = round_trip_ms.max(0);
        Offset {
            ms: redis_ms.saturating_sub(sent_ms.saturating_add(round_trip / 2)),
            uncertainty_ms: round_trip.saturating_add(1) / 2,
        }
    }

    /// Whether a send stamped now would certainly reach Redis past the
    /// accept deadline, even if Redis ran it at once: the node's clock is
    /// behind Redis's by more than the deadline, whatever the uncertainty.
    pub fn refuses_sends(&self) -> bool {
        self.ms.saturating_sub(self.uncertainty_ms) > ACCEPT_DEADLINE_MS
    }
}

/// Measures this node's clock against Redis's for readiness.
pub struct Clock {
    redis: RedisPool,
    /// The last check found the clock refusing sends: log changes, not
    /// every probe.
    refusing: AtomicBool,
}

impl Clock {
    pub fn new(redis: RedisPool) -> Clock {
        Clock {
            redis,
            refusing: AtomicBool::new(false),
        }
    }

    /// Reads Redis's clock (which also says Redis answers), records the
    /// offset in `gateway_clock_offset_seconds`, and logs when the node
    /// starts or stops refusing sends for its clock.
    pub async fn check(&self) -> Result<Offset, RedisError> {
        let sent_ms = now_ms();
        let started = Instant::now();
        let (secs, micros): (i64, i64) = self.redis.query(&redis::cmd("TIME")).await?;
        let round_trip_ms = started.elapsed().as_millis() as i64;
        let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let offset = Offset::from_read(sent_ms, round_trip_ms, redis_ms);
        metrics::gauge!("gateway_clock_offset_seconds").set(offset.ms as f64 / 1000.0);

        let refusing = offset.refuses_sends();
        if self.refusing.swap(refusing, Ordering::Relaxed) != refusing {
            if refusing {
                tracing::error!(
                    offset_ms = offset.ms,
                    "this node's clock is behind Redis's by more than the accept deadline: every send is refused; not ready until its NTP is fixed"
                );
            } else {
                tracing::info!(
                    offset_ms = offset.ms,
                    "this node's clock is back within the accept deadline; ready"
                );
            }
        }
        Ok(offset)
    }
}

/// This node's clock, ms since the Unix epoch: what a message's `ts` says.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_is_taken_at_the_middle_of_the_read() {
        let offset = Offset::from_read(1_000, 20, 16_010);
        assert_eq!(
            offset,
            Offset {
                ms: 15_000,
                uncertainty_ms: 10
            }
        );
        assert!(offset.refuses_sends());
    }

    #[test]
    fn a_node_behind_by_less_than_the_deadline_still_takes_sends() {
        assert!(!Offset::from_read(0, 0, ACCEPT_DEADLINE_MS).refuses_sends());
        assert!(Offset::from_read(0, 0, ACCEPT_DEADLINE_MS + 1).refuses_sends());
    }

    #[test]
    fn a_node_ahead_of_redis_takes_sends_however_far_ahead() {
        let offset = Offset::from_read(3_600_000, 0, 0);
        assert_eq!(offset.ms, -3_600_000);
        assert!(!offset.refuses_sends());
    }

    #[test]
    fn a_slow_read_gives_the_node_the_benefit_of_the_doubt() {
        // Behind by the deadline and a little, by the middle of a 2 s read:
        // Redis may have answered at its start, and the node be on time.
        let offset = Offset::from_read(0, 2_000, ACCEPT_DEADLINE_MS + 1_500);
        assert_eq!(
            offset,
            Offset {
                ms: ACCEPT_DEADLINE_MS + 500,
                uncertainty_ms: 1_000
            }
        );
        assert!(!offset.refuses_sends());
        assert!(Offset::from_read(0, 2_000, ACCEPT_DEADLINE_MS + 2_001).refuses_sends());
    }

    #[test]
    fn a_bogus_time_saturates_instead_of_overflowing() {
        let offset = Offset::from_read(i64::MAX, i64::MAX, i64::MIN);
        assert_eq!(offset.ms, i64::MIN);
        assert!(!offset.refuses_sends());
    }
}
