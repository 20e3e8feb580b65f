//! What happens to an entry PostgreSQL refused: retry later, or dead-letter.
//!
//! Pure policy with no I/O: `RetryPolicy::verdict` turns an entry's delivery
//! count (from XPENDING, so it survives restarts and takeovers) into a
//! decision, and `RetrySchedule` remembers when this consumer retries each of
//! its refused entries. The worker does the Redis side. It must never decide
//! about entries that failed for other reasons (PostgreSQL unreachable): those
//! are retried unchanged and never dead-lettered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest wait before trying again to move an entry to the dead
/// letters after the move failed.
pub const MOVE_RETRY_MAX: Duration = Duration::from_secs(600);

/// How often a refused entry is tried, and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// An entry refused at this delivery (or later) is dead-lettered
    /// (PERSISTER_MAX_DELIVERIES; at least 1).
    pub max_deliveries: u64,
    /// The wait after the first refusal (PERSISTER_RETRY_MS).
    pub first_delay: Duration,
    /// The longest wait between two tries (PERSISTER_RETRY_MAX_MS).
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_deliveries: 5,
            first_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
        }
    }
}

/// The decision about one refused entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Try it again after this long.
    Retry(Duration),
    /// It had its deliveries: move it to the dead-letter stream.
    DeadLetter,
}

impl RetryPolicy {
    /// `deliveries` is the entry's delivery count as XPENDING reports it,
    /// counting the delivery that was just refused (so at least 1).
    pub fn verdict(&self, deliveries: u64) -> Verdict {
        if deliveries >= self.max_deliveries {
            Verdict::DeadLetter
        } else {
            Verdict::Retry(self.delay(deliveries))
        }
    }

    /// `first_delay` after the first delivery, doubling with each further
    /// one, capped at `max_delay`.
    pub fn delay(&self, deliveries: u64) -> Duration {
        let doublings = deliveries.saturating_sub(1).min(32) as u32;
        self.first_delay
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }

    /// The wait before trying again to move an entry to the dead letters
    /// after the move failed at its `deliveries`-th delivery: `max_delay`,
    /// doubling with each delivery up to `MOVE_RETRY_MAX`. A takeover of
    /// entries idle for `PERSISTER_CLAIM_IDLE_MS` claims it sooner, so an
    /// entry that can never be moved is tried (and logged) about that often
    /// (docs/queue.md).
    pub fn move_retry_delay(&self, deliveries: u64) -> Duration {
        let doublings = deliveries.saturating_sub(1).min(16) as u32;
        self.max_delay
            .saturating_mul(1 << doublings)
            .min(MOVE_RETRY_MAX)
            .max(self.max_delay)
    }

    /// The time a poison entry spends before it is dead-lettered, counting
    /// only the waits (each try adds one batch write on top).
    pub fn time_to_dead_letter(&self) -> Duration {
        (1..self.max_deliveries).map(|d| self.delay(d)).sum()
    }
}

/// This consumer's refused entries and when each is tried again.
#[derive(Debug, Default)]
pub struct RetrySchedule {
    due: HashMap<String, Instant>,
}

impl RetrySchedule {
    /// (Re)schedules `id`; a later call for the same id replaces the earlier.
    pub fn insert(&mut self, id: String, at: Instant) {
        self.due.insert(id, at);
    }

    /// Forgets `id` (stored, dead-lettered, or gone).
    pub fn remove(&mut self, id: &str) {
        self.due.remove(id);
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// The earliest due time, if any entry is scheduled.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// Removes and returns up to `limit` ids due at `now`, in stream order
    /// (ids compare as (milliseconds, sequence)).
    pub fn take_due(&mut self, now: Instant, limit: usize) -> Vec<String> {
        let mut ready: Vec<String> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        ready.sort_by_key(|id| stream_id_key(id));
        ready.truncate(limit);
        for id in &ready {
            self.due.remove(id);
        }
        ready
    }
}

/// A stream id `<ms>-<seq>` as numbers, for ordering; unparsable ids sort last.
pub fn stream_id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(u64::MAX), seq.parse().unwrap_or(u64::MAX))
}

/// The milliseconds part of a stream id (the Redis clock when it was added).
pub fn stream_id_millis(id: &str) -> Option<u64> {
    id.split_once('-').map_or(id, |(ms, _)| ms).parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max: u64) -> RetryPolicy {
        RetryPolicy {
            max_deliveries: max,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        }
    }

    #[test]
    fn a_failed_move_to_the_dead_letters_is_retried_from_the_longest_delay_doubling_to_ten_minutes() {
        let p = policy(6);
        let waits: Vec<u64> = [1, 2, 3, 10, 1_000]
            .iter()
            .map(|&d| p.move_retry_delay(d).as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 512, MOVE_RETRY_MAX.as_secs()]);
    }

    #[test]
    fn refusals_below_the_limit_are_retried_with_doubling_delays() {
        let p = policy(6);
        let verdicts: Vec<Verdict> = (1..=6).map(|d| p.verdict(d)).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Retry(Duration::from_millis(100)),
                Verdict::Retry(Duration::from_millis(200)),
                Verdict::Retry(Duration::from_millis(400)),
                Verdict::Retry(Duration::from_millis(800)),
                Verdict::Retry(Duration::from_millis(1000)),
                Verdict::DeadLetter,
            ]
        );
        assert_eq!(p.time_to_dead_letter(), Duration::from_millis(2500));
    }

    #[test]
    fn the_limit_counts_every_delivery_including_earlier_ones() {
        // An entry delivered more often than the limit (e.g. during a
        // PostgreSQL outage, or by a persister before a restart) is
        // dead-lettered at its first refusal.
        let p = policy(5);
        assert_eq!(p.verdict(4), Verdict::Retry(Duration::from_millis(800)));
        assert_eq!(p.verdict(5), Verdict::DeadLetter);
        assert_eq!(p.verdict(50), Verdict::DeadLetter);
        // A limit of 1: the first refusal dead-letters.
        assert_eq!(policy(1).verdict(1), Verdict::DeadLetter);
    }

    #[test]
    fn huge_delivery_counts_do_not_overflow_the_delay() {
        let p = policy(u64::MAX);
        assert_eq!(p.delay(0), Duration::from_millis(100));
        assert_eq!(p.delay(40), Duration::from_millis(1000));
        assert_eq!(p.delay(u64::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn the_default_reaches_the_dead_letters_in_seconds() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_deliveries, 5);
        assert!(
            p.time_to_dead_letter() < Duration::from_secs(5),
            "{:?}",
            p.time_to_dead_letter()
        );
    }

    #[test]
    fn the_schedule_hands_out_due_ids_in_stream_order_once() {
        let t0 = Instant::now();
        let mut s = RetrySchedule::default();
        s.insert("10-1".into(), t0);
        s.insert("9-5".into(), t0);
        s.insert("100-0".into(), t0 + Duration::from_secs(1));
        s.insert("10-0".into(), t0);
        assert_eq!(s.next_due(), Some(t0));
        assert_eq!(s.take_due(t0, 2), ["9-5", "10-0"]);
        assert_eq!(s.take_due(t0, 10), ["10-1"]);
        assert!(s.take_due(t0, 10).is_empty());
        assert_eq!(s.len(), 1);
        assert_eq!(s.next_due(), Some(t0 + Duration::from_secs(1)));
        // Rescheduling replaces; removing forgets.
        s.insert("100-0".into(), t0);
        assert_eq!(s.take_due(t0, 10), ["100-0"]);
        s.insert("1-0".into(), t0);
        s.remove("1-0");
        assert!(s.is_empty() && s.next_due().is_none());
    }

    #[test]
    fn stream_ids_order_numerically_and_yield_their_milliseconds() {
        assert!(stream_id_key("9-0") < stream_id_key("10-0"));
        assert!(stream_id_key("10-2") < stream_id_key("10-10"));
        assert_eq!(stream_id_millis("1700000000123-4"), Some(1_700_000_000_123));
        assert_eq!(stream_id_millis("17"), Some(17));
        assert_eq!(stream_id_millis("x-1"), None);
    }
}
