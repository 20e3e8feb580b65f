//! Where a page read from PostgreSQL after a cursor must end: before a hole
//! that a message still in the queue will fill.
//!
//! Persister lanes commit in any order and a failing message waits for its
//! retries, so PostgreSQL can hold a message's later neighbours before the
//! message itself. A client paging with `after` past such a hole would never
//! come back for the message, so the page ends at the hole instead, and the
//! next read after the same cursor gets it once it is stored.
//!
//! A hole can also be for good (a dead-lettered message, the seqs a Redis
//! restart skips): those must not end every page forever. Every message in
//! the queue's stream was appended before the messages after it, by the
//! accept script in seq order, so a hole can still fill only while the
//! stream holds an entry appended before the message after the hole. The
//! stream's oldest entry, read *before* PostgreSQL (a message stored and
//! deleted from the stream in between is then in the rows), says which
//! holes those are. Pure: the caller reads both.

use shared::protocol::Message;

/// How far the clocks that stamp a message's `ts` (the gateways') and the
/// queue's entry ids (Redis's) may disagree.
pub const CLOCK_SKEW_MS: i64 = 5_000;

/// The queue's oldest entry, read before the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueHead {
    /// The queue was empty: every message accepted until then was stored or
    /// dead-lettered, and every hole in the page is for good.
    Empty,
    /// The oldest entry's id time (ms since the epoch, Redis's clock).
    Since(i64),
    /// Redis could not be asked: any hole may still fill.
    Unknown,
}

impl QueueHead {
    /// Whether the message accepted just before `next` may still be in the
    /// queue.
    fn may_hold_one_before(self, next: &Message) -> bool {
        match self {
            QueueHead::Empty => false,
            QueueHead::Since(oldest_ms) => oldest_ms <= next.ts + CLOCK_SKEW_MS,
            QueueHead::Unknown => true,
        }
    }
}

/// The part of `rows` (a chat's messages after seq `after`, oldest first)
/// before the first hole that may still fill.
pub fn before_pending_hole(after: i64, mut rows: Vec<Message>, head: QueueHead) -> Vec<Message> {
    let mut expected = after.saturating_add(1);
    let cut = rows.iter().position(|row| {
        let hole = row.seq > expected;
        expected = row.seq.saturating_add(1);
        hole && head.may_hold_one_before(row)
    });
    if let Some(at) = cut {
        metrics::counter!("gateway_history_pages_ended_at_pending_total").increment(1);
        rows.truncate(at);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const NOW: i64 = 1_800_000_000_000;

    /// Rows at `seqs`, each accepted 10 s after the previous one, the last at NOW.
    fn rows(seqs: &[i64]) -> Vec<Message> {
        let chat = Uuid::now_v7();
        let n = seqs.len() as i64;
        seqs.iter()
            .enumerate()
            .map(|(i, &seq)| Message {
                id: Uuid::now_v7(),
                chat,
                seq,
                from: Uuid::nil(),
                to: None,
                body: format!("message {seq}"),
                ts: NOW - (n - 1 - i as i64) * 10_000,
            })
            .collect()
    }

    fn seqs(page: &[Message]) -> Vec<i64> {
        page.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn a_page_without_holes_is_whole_whatever_the_queue_holds() {
        for head in [QueueHead::Empty, QueueHead::Since(0), QueueHead::Unknown] {
            assert_eq!(seqs(&before_pending_hole(3, rows(&[4, 5, 6]), head)), [4, 5, 6]);
        }
    }

    #[test]
    fn a_page_ends_at_a_hole_while_the_queue_holds_an_older_entry() {
        // 5 is missing; the queue's oldest entry is older than 6.
        let page = before_pending_hole(3, rows(&[4, 6, 7]), QueueHead::Since(NOW - 60_000));
        assert_eq!(seqs(&page), [4]);
        // A hole right after the cursor: nothing to give yet.
        let page = before_pending_hole(3, rows(&[5, 6]), QueueHead::Since(NOW - 60_000));
        assert!(page.is_empty());
    }

    #[test]
    fn a_hole_is_for_good_once_the_queue_holds_nothing_from_before_it() {
        let page = before_pending_hole(3, rows(&[4, 6, 7]), QueueHead::Empty);
        assert_eq!(seqs(&page), [4, 6, 7]);
        // 6 was accepted at NOW - 10 s; the oldest entry is newer than that
        // by more than the clocks may disagree.
        let head = QueueHead::Since(NOW - 10_000 + CLOCK_SKEW_MS + 1);
        assert_eq!(seqs(&before_pending_hole(3, rows(&[4, 6, 7]), head)), [4, 6, 7]);
        // Within the skew it may still fill.
        let head = QueueHead::Since(NOW - 10_000 + CLOCK_SKEW_MS);
        assert_eq!(seqs(&before_pending_hole(3, rows(&[4, 6, 7]), head)), [4]);
    }

    #[test]
    fn an_old_hole_for_good_is_passed_and_a_newer_one_that_may_fill_ends_the_page() {
        // 5 is long gone (6 accepted at NOW - 30 s); 8 may still come (9 at NOW - 10 s).
        let head = QueueHead::Since(NOW - 20_000);
        let page = before_pending_hole(3, rows(&[4, 6, 7, 9, 10]), head);
        assert_eq!(seqs(&page), [4, 6, 7]);
    }

    #[test]
    fn without_an_answer_from_redis_every_hole_may_fill() {
        let page = before_pending_hole(3, rows(&[4, 6]), QueueHead::Unknown);
        assert_eq!(seqs(&page), [4]);
    }
}
