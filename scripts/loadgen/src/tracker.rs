//! Book-keeping of one phase, shared by the dispatcher, the writers and the
//! readers: which message was sent, acked, refused, and which of its
//! expected recipient connections got it (one bit per message and
//! recipient); latency histograms; counters. Everything is atomics
//! or short mutexes, so readers on any thread record without waiting long.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
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

/// The connections one sender's messages are owed to (client contract:
/// every connection of the chat's members, the sender's other devices
/// included, except the sending connection, which gets the `ack`). In the
/// load tool's plans they are contiguous connection indices: a group's
/// members, or a private pair's peer. So the recipient's bit in a
/// message's bitset is found in O(1), with no table: connections
/// `first..first + len`, except `skip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipients {
    first: usize,
    len: usize,
    /// The sending connection, when it lies in the range.
    skip: Option<usize>,
}

impl Recipients {
    /// Connections `range`, except `sender` (ignored when outside it).
    pub fn range_except(range: std::ops::Range<usize>, sender: usize) -> Recipients {
        Recipients {
            first: range.start,
            len: range.len(),
            skip: range.contains(&sender).then_some(sender),
        }
    }

    /// Recipient connections per message.
    pub fn fanout(&self) -> u32 {
        (self.len - self.skip.is_some() as usize) as u32
    }

    /// The bit of connection `conn` in a message's bitset, or `None` when
    /// the message is not owed to it.
    #[inline]
    pub fn bit(&self, conn: usize) -> Option<usize> {
        let i = conn.checked_sub(self.first).filter(|&i| i < self.len)?;
        match self.skip {
            Some(s) if conn == s => None,
            Some(s) if conn > s => Some(i - 1),
            _ => Some(i),
        }
    }
}

/// One sender connection's messages in this phase.
struct SenderLog {
    to: Recipients,
    /// `u64` words per message in `got`: ceil(fanout / 64).
    words: usize,
    state: Box<[AtomicU8]>,
    /// Message k's bitset of recipients reached: words
    /// `k * words .. (k + 1) * words`, bit [`Recipients::bit`].
    got: Box<[AtomicU64]>,
}

/// Counts of a finished phase's messages (see [`PhaseTracker::tally`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Acked messages some expected recipient connection has not received.
    pub lost_messages: u64,
    /// (acked message, expected recipient) pairs not received.
    pub missing_deliveries: u64,
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
    /// Distinct deliveries of this phase's messages: the first receipt of
    /// a message by a connection it is owed to.
    pub delivered: AtomicU64,
    /// Of those, received within the window.
    pub delivered_in_window: AtomicU64,
    /// Messages sent within the window (by schedule time).
    pub sent_in_window: AtomicU64,
    /// Receipts by an expected recipient that already had the message.
    pub duplicates: AtomicU64,
    /// Receipts by a connection the message is not owed to (the sending
    /// connection, another group's member), or naming a sender or number
    /// outside the phase.
    pub unexpected: AtomicU64,
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub e2e: Sharded,
    pub ack: Sharded,
    pub lag: Sharded,
}

impl PhaseTracker {
    /// `plan[s] = (messages sender s will be given, whom they are owed to)`.
    /// Memory: one byte plus ceil(fanout / 64) × 8 bytes per message.
    pub fn new(phase: u32, window: (u64, u64), plan: &[(u64, Recipients)], shards: usize) -> PhaseTracker {
        let senders = plan
            .iter()
            .map(|&(n, to)| {
                let words = (to.fanout() as usize).div_ceil(64);
                SenderLog {
                    to,
                    words,
                    state: (0..n).map(|_| AtomicU8::new(0)).collect(),
                    got: (0..n as usize * words).map(|_| AtomicU64::new(0)).collect(),
                }
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
            duplicates: AtomicU64::new(0),
            unexpected: AtomicU64::new(0),
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
            self.owed.fetch_add(log.to.fanout() as u64, Relaxed);
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

    /// Connection `me` received message `k` of `sender`. Runs for every
    /// frame received: O(1), one atomic `fetch_or` on the message's bitset.
    pub fn on_delivery(&self, me: usize, sender: usize, k: usize, sched_ns: u64, now: u64) {
        let Some(log) = self.senders.get(sender).filter(|l| k < l.state.len()) else {
            self.unexpected.fetch_add(1, Relaxed);
            return;
        };
        let Some(bit) = log.to.bit(me) else {
            self.unexpected.fetch_add(1, Relaxed);
            return;
        };
        let mask = 1u64 << (bit % 64);
        if log.got[k * log.words + bit / 64].fetch_or(mask, Relaxed) & mask != 0 {
            self.duplicates.fetch_add(1, Relaxed);
            return;
        }
        self.delivered.fetch_add(1, Relaxed);
        if self.in_window(now) {
            self.delivered_in_window.fetch_add(1, Relaxed);
        }
        if self.in_window(sched_ns) {
            self.e2e.record(me, now.saturating_sub(sched_ns));
        }
    }

    /// Everything dispatched was written or given up, everything written
    /// has an answer, and as many distinct deliveries arrived as acked
    /// messages owe (the drain may end).
    pub fn settled(&self, dispatched: u64) -> bool {
        let sent = self.sent.load(Relaxed);
        sent + self.not_sent.load(Relaxed) >= dispatched
            && self.acked.load(Relaxed) + self.errored.load(Relaxed) >= sent
            && self.delivered.load(Relaxed) >= self.owed.load(Relaxed)
    }

    /// Walks every message: acked ones with an expected recipient's bit
    /// unset are lost.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for log in &self.senders {
            let fanout = log.to.fanout() as u64;
            for (k, st) in log.state.iter().enumerate() {
                match st.load(Relaxed) {
                    SENT => t.unacked += 1,
                    ACKED => {
                        let words = &log.got[k * log.words..(k + 1) * log.words];
                        let got: u64 = words.iter().map(|w| w.load(Relaxed).count_ones() as u64).sum();
                        if got < fanout {
                            t.lost_messages += 1;
                            t.missing_deliveries += fanout - got;
                        }
                    }
                    _ => {}
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private pair's peer: one connection.
    fn peer(conn: usize) -> Recipients {
        Recipients::range_except(conn..conn + 1, usize::MAX)
    }

    #[test]
    fn recipients_map_connections_to_bits() {
        // A group on connections 100..200, sent to by connection 105.
        let g = Recipients::range_except(100..200, 105);
        assert_eq!(g.fanout(), 99);
        assert_eq!(g.bit(99), None, "another group");
        assert_eq!(g.bit(200), None, "another group");
        assert_eq!(g.bit(105), None, "the sending connection gets the ack");
        assert_eq!(g.bit(100), Some(0));
        assert_eq!(g.bit(104), Some(4));
        assert_eq!(g.bit(106), Some(5));
        assert_eq!(g.bit(199), Some(98));
        let bits: Vec<usize> = (0..300).filter_map(|c| g.bit(c)).collect();
        assert_eq!(bits, (0..99).collect::<Vec<_>>(), "one bit per recipient");
        let p = peer(7);
        assert_eq!((p.fanout(), p.bit(7), p.bit(6)), (1, Some(0), None));
    }

    #[test]
    fn loss_is_acked_but_short_of_recipients() {
        // Sender 0 (connection 0): 3 messages to connections 1 and 2;
        // sender 1 (connection 3): 2 messages to connection 4.
        let plan = [(3, Recipients::range_except(0..3, 0)), (2, peer(4))];
        let t = PhaseTracker::new(1, (100, 200), &plan, 2);
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
        t.on_delivery(1, 0, 0, 150, 170);
        t.on_delivery(2, 0, 0, 150, 170);
        t.on_delivery(1, 0, 1, 150, 170);
        t.on_delivery(4, 1, 0, 150, 170);
        t.on_delivery(4, 1, 0, 150, 250); // duplicate
        t.on_delivery(4, 5, 0, 150, 170); // unknown sender
        t.on_delivery(4, 1, 9, 150, 170); // unknown number
        assert_eq!(t.acked.load(Relaxed), 3);
        assert_eq!(t.owed.load(Relaxed), 5);
        assert_eq!(t.errored.load(Relaxed), 1);
        assert_eq!(t.unexpected.load(Relaxed), 2);
        assert_eq!(t.duplicates.load(Relaxed), 1);
        assert_eq!(t.delivered.load(Relaxed), 4);
        assert_eq!(t.delivered_in_window.load(Relaxed), 4);
        assert!(!t.settled(5), "message (1,1) has no answer yet");
        assert_eq!(
            t.tally(),
            Tally {
                lost_messages: 1,
                missing_deliveries: 1,
                unacked: 1
            }
        );
        assert_eq!(t.errors.lock().unwrap()["unavailable"], 1);
        assert_eq!(t.e2e.merged().len(), 4, "first deliveries only");
        assert_eq!(t.ack.merged().len(), 3);
    }

    #[test]
    fn a_duplicate_does_not_stand_in_for_a_missing_recipient() {
        // A group of 100 on connections 0..100; member 0 sends one message.
        let t = PhaseTracker::new(1, (100, 200), &[(1, Recipients::range_except(0..100, 0))], 1);
        t.on_sent(0, 0, 150, 151);
        t.on_ack(0, 0, 150, 160);
        for me in 1..100 {
            if me != 6 {
                t.on_delivery(me, 0, 0, 150, 170);
            }
        }
        // Member 5 twice, member 6 never: as many receipts as the fanout.
        t.on_delivery(5, 0, 0, 150, 170);
        assert_eq!(t.owed.load(Relaxed), 99);
        assert_eq!(t.delivered.load(Relaxed), 98, "distinct deliveries");
        assert_eq!(t.duplicates.load(Relaxed), 1);
        assert!(!t.settled(1), "member 6 is still owed the message");
        assert_eq!(
            t.tally(),
            Tally {
                lost_messages: 1,
                missing_deliveries: 1,
                unacked: 0
            }
        );
        // Member 6 gets it: settled, nothing lost, the duplicate stays.
        t.on_delivery(6, 0, 0, 150, 171);
        assert!(t.settled(1));
        assert_eq!(t.tally(), Tally::default());
        assert_eq!(t.duplicates.load(Relaxed), 1);
    }

    #[test]
    fn an_echo_to_the_sending_connection_is_no_delivery() {
        // Pair (0, 1): connection 0 sends to 1 and 1 to 0.
        let t = PhaseTracker::new(1, (100, 200), &[(1, peer(1)), (1, peer(0))], 1);
        t.on_sent(0, 0, 150, 151);
        t.on_ack(0, 0, 150, 160);
        t.on_delivery(0, 0, 0, 150, 170); // echoed to the sender
        assert_eq!(t.unexpected.load(Relaxed), 1);
        assert_eq!(t.delivered.load(Relaxed), 0);
        assert!(!t.settled(1));
        assert_eq!(t.tally().lost_messages, 1);
        t.on_delivery(1, 0, 0, 150, 170);
        assert_eq!(t.tally().lost_messages, 0);
        assert_eq!(t.delivered.load(Relaxed), 1);
    }

    #[test]
    fn bitsets_span_several_words() {
        // 150 recipients: 3 words per message; every recipient of message 1
        // but the last one.
        let to = Recipients::range_except(10..161, 160);
        assert_eq!(to.fanout(), 150);
        let t = PhaseTracker::new(1, (100, 200), &[(2, to)], 1);
        for k in 0..2 {
            t.on_sent(0, k, 150, 151);
            t.on_ack(0, k, 150, 160);
        }
        for me in 10..160 {
            t.on_delivery(me, 0, 0, 150, 170);
            if me != 159 {
                t.on_delivery(me, 0, 1, 150, 170);
            }
        }
        assert_eq!(t.delivered.load(Relaxed), 299);
        assert_eq!((t.duplicates.load(Relaxed), t.unexpected.load(Relaxed)), (0, 0));
        assert_eq!(
            t.tally(),
            Tally {
                lost_messages: 1,
                missing_deliveries: 1,
                unacked: 0
            }
        );
    }

    #[test]
    fn latency_counts_only_the_window() {
        let t = PhaseTracker::new(1, (1_000, 2_000), &[(2, peer(0))], 1);
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
