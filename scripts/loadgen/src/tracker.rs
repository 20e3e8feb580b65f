//! Book-keeping of one phase, shared by the dispatcher, the writers and the
//! readers: which message was sent, acked, refused, and how many recipient
//! connections got it; latency histograms; counters. Everything is atomics
//! or short mutexes, so readers on any thread record without waiting long.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

use crate::report::new_histogram;

const SENT: u8 = 1;
const ACKED: u8 = 2;
const ERRORED: u8 = 3;

/// Histograms split in shards so that readers on different threads rarely
/// meet on one lock.
pub struct Sharded {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Sharded {
    pub fn new(n: usize) -> Sharded {
        Sharded {
            shards: (0..n.max(1)).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }

    pub fn record(&self, hint: usize, value_ns: u64) {
        let shard = &self.shards[hint % self.shards.len()];
        shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(value_ns.max(1));
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for s in &self.shards {
            let h = s.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// One sender connection's messages in this phase.
struct SenderLog {
    /// Recipient connections each message is owed to.
    fanout: u32,
    state: Box<[AtomicU8]>,
    received: Box<[AtomicU32]>,
}

/// Counts of a finished phase's messages (see [`PhaseTracker::tally`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub lost_messages: u64,
    pub missing_deliveries: u64,
    pub duplicate_deliveries: u64,
    pub unacked: u64,
}

pub struct PhaseTracker {
    pub phase: u32,
    /// The measured window, unix ns: `[start, end)`.
    pub window: (u64, u64),
    senders: Vec<SenderLog>,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errored: AtomicU64,
    pub not_sent: AtomicU64,
    /// Σ fanout over acked messages.
    pub owed: AtomicU64,
    /// Deliveries of this phase's messages.
    pub delivered: AtomicU64,
    /// Deliveries received within the window.
    pub delivered_in_window: AtomicU64,
    /// Messages sent within the window (by schedule time).
    pub sent_in_window: AtomicU64,
    /// Deliveries naming a sender or number outside the phase.
    pub unmatched: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub e2e: Sharded,
    pub ack: Sharded,
    pub lag: Sharded,
}

impl PhaseTracker {
    /// `plan[s] = (messages sender s will be given, its fanout)`.
    pub fn new(phase: u32, window: (u64, u64), plan: &[(u64, u32)], shards: usize) -> PhaseTracker {
        let senders = plan
            .iter()
            .map(|&(n, fanout)| SenderLog {
                fanout,
                state: (0..n).map(|_| AtomicU8::new(0)).collect(),
                received: (0..n).map(|_| AtomicU32::new(0)).collect(),
            })
            .collect();
        PhaseTracker {
            phase,
            window,
            senders,
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errored: AtomicU64::new(0),
            not_sent: AtomicU64::new(0),
            owed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            delivered_in_window: AtomicU64::new(0),
            sent_in_window: AtomicU64::new(0),
            unmatched: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            e2e: Sharded::new(shards),
            ack: Sharded::new(shards),
            lag: Sharded::new(shards),
        }
    }

    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window.0 && ns < self.window.1
    }

    /// The writer of `sender` wrote message `k` scheduled at `sched_ns`, at `now`.
    pub fn on_sent(&self, sender: usize, k: usize, sched_ns: u64, now: u64) {
        if let Some(st) = self.senders.get(sender).and_then(|s| s.state.get(k)) {
            st.fetch_max(SENT, Relaxed);
        }
        self.sent.fetch_add(1, Relaxed);
        if self.in_window(sched_ns) {
            self.sent_in_window.fetch_add(1, Relaxed);
            self.lag.record(sender, now.saturating_sub(sched_ns));
        }
    }

    pub fn on_not_sent(&self, n: u64) {
        self.not_sent.fetch_add(n, Relaxed);
    }

    pub fn on_ack(&self, sender: usize, k: usize, sched_ns: u64, now: u64) {
        let Some(log) = self.senders.get(sender) else {
            return;
        };
        let Some(st) = log.state.get(k) else {
            return;
        };
        if st.fetch_max(ACKED, Relaxed) < ACKED {
            self.acked.fetch_add(1, Relaxed);
            self.owed.fetch_add(log.fanout as u64, Relaxed);
            if self.in_window(sched_ns) {
                self.ack.record(sender, now.saturating_sub(sched_ns));
            }
        }
    }

    pub fn on_error(&self, sender: usize, k: Option<usize>, code: &str) {
        if let Some(st) = k.and_then(|k| self.senders.get(sender)?.state.get(k)) {
            st.fetch_max(ERRORED, Relaxed);
        }
        self.errored.fetch_add(1, Relaxed);
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code.to_string())
            .or_default() += 1;
    }

    /// Recipient connection `me` received message `k` of `sender`.
    pub fn on_delivery(&self, me: usize, sender: usize, k: usize, sched_ns: u64, now: u64) {
        match self.senders.get(sender).and_then(|s| s.received.get(k)) {
            Some(r) => {
                r.fetch_add(1, Relaxed);
            }
            None => {
                self.unmatched.fetch_add(1, Relaxed);
                return;
            }
        }
        self.delivered.fetch_add(1, Relaxed);
        if self.in_window(now) {
            self.delivered_in_window.fetch_add(1, Relaxed);
        }
        if self.in_window(sched_ns) {
            self.e2e.record(me, now.saturating_sub(sched_ns));
        }
    }

    /// Everything sent has an answer and every acked message reached all
    /// its recipients (the drain may end).
    pub fn settled(&self, dispatched: u64) -> bool {
        let sent = self.sent.load(Relaxed);
        sent + self.not_sent.load(Relaxed) >= dispatched
            && self.acked.load(Relaxed) + self.errored.load(Relaxed) >= sent
            && self.delivered.load(Relaxed) >= self.owed.load(Relaxed)
    }

    /// Walks every message: acked ones short of recipients are lost.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for log in &self.senders {
            for (st, rcv) in log.state.iter().zip(log.received.iter()) {
                let st = st.load(Relaxed);
                let got = rcv.load(Relaxed);
                if st == SENT {
                    t.unacked += 1;
                }
                if st == ACKED && got < log.fanout {
                    t.lost_messages += 1;
                    t.missing_deliveries += (log.fanout - got) as u64;
                }
                if got > log.fanout {
                    t.duplicate_deliveries += (got - log.fanout) as u64;
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_acked_but_short_of_recipients() {
        // Sender 0: 3 messages to 2 recipients; sender 1: 2 messages to 1.
        let t = PhaseTracker::new(1, (100, 200), &[(3, 2), (2, 1)], 2);
        for k in 0..3 {
            t.on_sent(0, k, 150, 151);
        }
        t.on_sent(1, 0, 150, 151);
        t.on_sent(1, 1, 150, 151);
        // The ack may be recorded before the writer marks the send.
        t.on_ack(0, 0, 150, 160);
        t.on_sent(0, 0, 150, 151);
        t.on_ack(0, 1, 150, 160);
        t.on_ack(0, 1, 150, 161); // a repeated ack counts once
        t.on_error(0, Some(2), "unavailable");
        t.on_ack(1, 0, 150, 160);
        // Message (0,0): both recipients; (0,1): one; (1,0): twice; (1,1): unacked.
        t.on_delivery(7, 0, 0, 150, 170);
        t.on_delivery(8, 0, 0, 150, 170);
        t.on_delivery(7, 0, 1, 150, 170);
        t.on_delivery(9, 1, 0, 150, 170);
        t.on_delivery(9, 1, 0, 150, 250);
        t.on_delivery(9, 5, 0, 150, 170); // unknown sender
        assert_eq!(t.acked.load(Relaxed), 3);
        assert_eq!(t.owed.load(Relaxed), 5);
        assert_eq!(t.errored.load(Relaxed), 1);
        assert_eq!(t.unmatched.load(Relaxed), 1);
        assert_eq!(t.delivered.load(Relaxed), 5);
        assert_eq!(t.delivered_in_window.load(Relaxed), 4);
        assert!(!t.settled(5), "message (1,1) has no answer yet");
        assert_eq!(
            t.tally(),
            Tally {
                lost_messages: 1,
                missing_deliveries: 1,
                duplicate_deliveries: 1,
                unacked: 1
            }
        );
        assert_eq!(t.errors.lock().unwrap()["unavailable"], 1);
        assert_eq!(t.e2e.merged().len(), 5);
        assert_eq!(t.ack.merged().len(), 3);
    }

    #[test]
    fn latency_counts_only_the_window() {
        let t = PhaseTracker::new(1, (1_000, 2_000), &[(2, 1)], 1);
        t.on_sent(0, 0, 500, 600); // warmup
        t.on_sent(0, 1, 1_500, 1_600);
        t.on_delivery(0, 0, 0, 500, 1_100);
        t.on_delivery(0, 0, 1, 1_500, 1_900);
        let h = t.e2e.merged();
        assert_eq!(h.len(), 1);
        assert_eq!(h.max(), 400);
        assert_eq!(t.sent_in_window.load(Relaxed), 1);
        assert_eq!(t.delivered_in_window.load(Relaxed), 2);
    }
}
