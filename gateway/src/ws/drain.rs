//! Paced closing during a drain: sockets close at `GATEWAY_DRAIN_CLOSE_RATE`
//! per second, node-wide, so a rolling update turns into a steady trickle of
//! reconnects instead of one wave (docs/operations.md has the arithmetic).
//!
//! Each session asks for its turn once the node starts draining and keeps
//! serving until it comes. The pace never leaves sockets for the deadline:
//! the effective rate is at least the open sockets over the time left before
//! the last tenth of the grace period.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

pub struct DrainPacer {
    /// Closes per second; 0 closes everything at once.
    rate: f64,
    grace: Duration,
    /// When the drain started, and the next free slot.
    state: Mutex<Option<(Instant, Instant)>>,
}

impl DrainPacer {
    pub fn new(rate: f64, grace: Duration) -> DrainPacer {
        DrainPacer {
            rate,
            grace,
            state: Mutex::new(None),
        }
    }

    /// Waits for this session's turn to close; `open` is how many sessions
    /// the node still has.
    pub async fn turn(&self, open: usize) {
        let slot = self.take_slot(Instant::now(), open);
        tokio::time::sleep_until(slot).await;
    }

    /// The time by which every socket should be closed.
    pub fn deadline(&self) -> Instant {
        let started = self.state.lock().map(|s| s.map(|(start, _)| start)).ok().flatten();
        started.unwrap_or_else(Instant::now) + self.grace.mul_f32(0.9)
    }

    fn take_slot(&self, now: Instant, open: usize) -> Instant {
        if self.rate <= 0.0 {
            return now;
        }
        let Ok(mut state) = self.state.lock() else { return now };
        let (start, next) = state.get_or_insert((now, now));
        let close_by = *start + self.grace.mul_f32(0.9).saturating_sub(Duration::from_secs(1));
        let left = close_by.saturating_duration_since(now).as_secs_f64().max(0.001);
        let rate = self.rate.max(open as f64 / left);
        let slot = (*next).max(now);
        *next = slot + Duration::from_secs_f64(1.0 / rate);
        slot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_spaced_at_the_rate() {
        let pacer = DrainPacer::new(100.0, Duration::from_secs(60));
        let t0 = Instant::now();
        let slots: Vec<Instant> = (0..5).map(|_| pacer.take_slot(t0, 5)).collect();
        assert_eq!(slots[0], t0);
        assert_eq!(slots[4] - slots[0], Duration::from_millis(40));
    }

    #[test]
    fn too_many_sockets_for_the_rate_are_closed_faster_to_meet_the_deadline() {
        // 10 s of grace, 8 s to close in: 8,000 sockets need 1,000/s, not 10/s.
        let pacer = DrainPacer::new(10.0, Duration::from_secs(10));
        let t0 = Instant::now();
        let first = pacer.take_slot(t0, 8_000);
        let second = pacer.take_slot(t0, 8_000);
        assert!(second - first <= Duration::from_millis(1), "{:?}", second - first);
    }

    #[test]
    fn rate_zero_closes_all_at_once() {
        let pacer = DrainPacer::new(0.0, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!((0..100).all(|_| pacer.take_slot(t0, 100) == t0));
    }
}
