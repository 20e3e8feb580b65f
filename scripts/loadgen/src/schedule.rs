//! The open-loop send schedule: message `i` of a phase is due at `i / rate`
//! seconds after the phase starts, whatever happened to earlier ones, and
//! goes to sender `i % senders`. The dispatcher asks how many are due by
//! now and sends the difference, so timer jitter never shifts later sends
//! (no drift, no sleep per message at high rates).

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Messages per second, all senders together.
    rate: f64,
    /// Messages in the phase.
    total: u64,
}

impl Schedule {
    /// `rate` messages/s for `length`: `floor(rate × length)` messages.
    pub fn new(rate: f64, length: Duration) -> Schedule {
        assert!(rate > 0.0 && rate.is_finite(), "rate must be positive");
        let total = (rate * length.as_secs_f64()).floor() as u64;
        Schedule { rate, total }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// When message `i` is due, from the start of the phase.
    pub fn offset_of(&self, i: u64) -> Duration {
        Duration::from_nanos((i as f64 * 1e9 / self.rate).round() as u64)
    }

    /// How many messages are due at `elapsed` (those with offset ≤ elapsed).
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        let n = (elapsed.as_nanos() as f64 * self.rate / 1e9).floor() as u64 + 1;
        let mut n = n.min(self.total);
        // Rounding in either direction must not disagree with offset_of.
        while n > 0 && self.offset_of(n - 1) > elapsed {
            n -= 1;
        }
        while n < self.total && self.offset_of(n) <= elapsed {
            n += 1;
        }
        n
    }

    /// Messages sender `s` of `senders` gets in this phase.
    pub fn count_for(&self, s: u64, senders: u64) -> u64 {
        if s >= self.total {
            0
        } else {
            (self.total - s).div_ceil(senders)
        }
    }
}

/// Sender and per-sender message number of message `i`.
pub fn assign(i: u64, senders: u64) -> (u64, u64) {
    (i % senders, i / senders)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_offsets() {
        let s = Schedule::new(1000.0, Duration::from_secs(3));
        assert_eq!(s.total(), 3000);
        assert_eq!(s.offset_of(0), Duration::ZERO);
        assert_eq!(s.offset_of(1), Duration::from_millis(1));
        assert_eq!(s.offset_of(2999), Duration::from_millis(2999));
        let odd = Schedule::new(3.0, Duration::from_secs(1));
        assert_eq!(odd.offset_of(1), Duration::from_nanos(333_333_333));
        assert_eq!(odd.offset_of(2), Duration::from_nanos(666_666_667));
    }

    #[test]
    fn due_by_counts_messages_whose_time_has_come() {
        let s = Schedule::new(1000.0, Duration::from_secs(1));
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_micros(999)), 1);
        assert_eq!(s.due_by(Duration::from_millis(1)), 2);
        assert_eq!(s.due_by(Duration::from_micros(10_500)), 11);
        assert_eq!(s.due_by(Duration::from_secs(5)), 1000, "never beyond the total");
    }

    #[test]
    fn due_by_is_monotonic_and_exact_at_fractional_rates() {
        let s = Schedule::new(12_345.678, Duration::from_secs(2));
        let mut last = 0;
        for us in (0..2_100_000).step_by(37) {
            let e = Duration::from_micros(us);
            let n = s.due_by(e);
            assert!(n >= last);
            if n > 0 {
                assert!(s.offset_of(n - 1) <= e);
            }
            if n < s.total() {
                assert!(s.offset_of(n) > e);
            }
            last = n;
        }
        assert_eq!(last, s.total());
    }

    #[test]
    fn ticking_coarsely_sends_the_same_messages() {
        // A 1 ms ticker that wakes late now and then still sends every
        // message once, in order, by the end.
        let s = Schedule::new(50_000.0, Duration::from_millis(200));
        let mut sent = 0;
        let mut t = 0u64;
        while sent < s.total() {
            t += if t.is_multiple_of(7) { 3_000 } else { 1_000 };
            let due = s.due_by(Duration::from_micros(t));
            // A 3 ms gap holds 150 intervals: 151 messages, both ends included.
            assert!(due - sent <= 151, "at most one late tick's worth at once");
            sent = due;
        }
        assert_eq!(sent, 10_000);
    }

    #[test]
    fn round_robin_assignment_and_counts() {
        assert_eq!(assign(0, 4), (0, 0));
        assert_eq!(assign(5, 4), (1, 1));
        assert_eq!(assign(11, 4), (3, 2));
        let s = Schedule::new(10.0, Duration::from_secs(1)); // 10 messages
        let counts: Vec<u64> = (0..4).map(|x| s.count_for(x, 4)).collect();
        assert_eq!(counts, vec![3, 3, 2, 2]);
        assert_eq!(counts.iter().sum::<u64>(), 10);
        let few = Schedule::new(2.0, Duration::from_secs(1));
        assert_eq!(few.count_for(3, 4), 0);
    }
}
