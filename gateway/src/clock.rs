//! This node's clock against Redis's.
//!
//! A send is stamped with the gateway's clock (`ts`), and the accept script
//! refuses a call that Redis runs more than `ACCEPT_DEADLINE_MS` after that
//! stamp by Redis's own clock (queue.rs). A gateway whose clock lags Redis's
//! by the deadline therefore has every send refused, and one that runs ahead
//! makes history wait that much longer at holes for good (history/holes.rs).
//! Readiness asks this module: a node whose clock is off Redis's by more
//! than `MAX_OFFSET_MS` is not ready, so a load balancer sends its users to
//! a node that can take their messages, and `gateway_clock_offset_seconds`
//! says by how much.
//!
//! Owns measuring the offset and its bound. It never corrects a clock or a
//! message's `ts`: the clocks are the operator's (NTP).

use crate::queue::ACCEPT_DEADLINE_MS;
use crate::redis_pool::{RedisError, RedisPool};

/// How far this node's clock may be off Redis's and the node stay ready:
/// half the accept deadline, so a send from a ready node still has at least
/// half of it for a slow Redis.
pub const MAX_OFFSET_MS: i64 = ACCEPT_DEADLINE_MS / 2;

/// Redis's clock minus this node's, from one `TIME` read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offset {
    /// Positive: this node's clock is behind Redis's.
    pub ms: i64,
    /// Half the round trip of the read: the offset is known to within this.
    pub uncertainty_ms: i64,
}

impl Offset {
    /// The offset of a `TIME` answer (`redis_ms`) read between the local
    /// clock's `before_ms` and `after_ms`: Redis answered some time in
    /// between, taken as the middle.
    pub fn from_read(before_ms: i64, redis_ms: i64, after_ms: i64) -> Offset {
        let round_trip = (after_ms - before_ms).max(0);
        Offset {
            ms: redis_ms - (before_ms + round_trip / 2),
            uncertainty_ms: (round_trip + 1) / 2,
        }
    }

    /// Whether the clocks may be within `MAX_OFFSET_MS` of each other: a
    /// read too slow to tell does not count against the node.
    pub fn within_bound(&self) -> bool {
        self.ms.abs() <= MAX_OFFSET_MS + self.uncertainty_ms
    }
}

/// Reads Redis's clock and records the offset in
/// `gateway_clock_offset_seconds`.
pub async fn measure(redis: &RedisPool) -> Result<Offset, RedisError> {
    let before = now_ms();
    let (secs, micros): (i64, i64) = redis.query(&redis::cmd("TIME")).await?;
    let after = now_ms();
    let offset = Offset::from_read(before, secs * 1000 + micros / 1000, after);
    metrics::gauge!("gateway_clock_offset_seconds").set(offset.ms as f64 / 1000.0);
    Ok(offset)
}

/// This node's clock, ms since the Unix epoch.
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
        let offset = Offset::from_read(1_000, 16_010, 1_020);
        assert_eq!(
            offset,
            Offset {
                ms: 15_000,
                uncertainty_ms: 10
            }
        );
        assert!(!offset.within_bound());
    }

    #[test]
    fn a_node_ahead_of_redis_has_a_negative_offset() {
        let offset = Offset::from_read(20_000, 14_000, 20_000);
        assert_eq!(offset.ms, -6_000);
        assert!(!offset.within_bound());
    }

    #[test]
    fn clocks_within_the_bound_are_fine_either_way() {
        assert!(Offset::from_read(0, MAX_OFFSET_MS, 0).within_bound());
        assert!(Offset::from_read(0, -MAX_OFFSET_MS, 0).within_bound());
        assert!(!Offset::from_read(0, MAX_OFFSET_MS + 1, 0).within_bound());
    }

    #[test]
    fn a_slow_read_gives_the_node_the_benefit_of_the_doubt() {
        // Answered 1 ms after the read began, 6.8 s of round trip: the
        // clocks may agree.
        let offset = Offset::from_read(0, 1, 6_800);
        assert_eq!(offset.ms, -3_399);
        assert!(Offset::from_read(0, MAX_OFFSET_MS + 3_400, 6_800).within_bound());
        assert!(!Offset::from_read(0, MAX_OFFSET_MS + 6_801, 6_800).within_bound());
    }

    #[test]
    fn a_local_clock_that_stepped_back_during_the_read_counts_no_round_trip() {
        let offset = Offset::from_read(1_000, 1_000, 900);
        assert_eq!(
            offset,
            Offset {
                ms: 0,
                uncertainty_ms: 0
            }
        );
    }
}
