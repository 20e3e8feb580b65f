//! Where a window after a cursor read from PostgreSQL must stop: before a
//! hole that a message still in the queue will fill.
//!
//! Persister lanes commit in any order and a failing message waits for its
//! retries, so PostgreSQL can hold a message's later neighbours before the
//! message itself. A client paging with `after` past such a hole would never
//! come back for the message, so the page ends at the hole instead, and the
//! next read after the same cursor gets it once it is stored. A window that
//! also has `before` asks for everything between two messages; it cannot be
//! answered in part, so it is refused as `Pending` (503, retry).
//!
//! A hole can also be for good (a dead-lettered message, the seqs a Redis
//! restart skips): those must not stop pages. The accept script appends a
//! chat's messages to the queue in seq order and only within
//! `ACCEPT_DEADLINE_MS` of their `ts` (by Redis's clock), and the persister
//! deletes an entry once its message is stored or dead-lettered. So the
//! message before a stored row can still be in the queue only while the
//! queue's oldest entry is at most that row's `ts` plus the deadline. The
//! caller reads the queue *before* the rows, so a message stored (and gone
//! from the queue) in between is in the rows. The seqs of the chat's last
//! restart jump were never given to a message at all.
//!
//! Pure: the caller reads the queue and PostgreSQL, and counts.

use shared::protocol::Message;

use crate::queue::{SeqJump, ACCEPT_DEADLINE_MS};

/// The queue's oldest entry, read before the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueHead {
    /// The queue was empty: every message accepted until then was stored or
    /// dead-lettered, and every hole in the rows is for good.
    Empty,
    /// The oldest entry's id time (ms since the epoch, Redis's clock).
    Since(i64),
    /// Redis could not be asked: any hole may still fill.
    Unknown,
}

/// What the queue says about a chat's holes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueView {
    pub head: QueueHead,
    /// The chat's last seq jump after a Redis restart, if any.
    pub jump: Option<SeqJump>,
}

impl QueueView {
    /// Whether a message with a seq between `prev` and `next_seq` may still
    /// be in the queue; `next` is the message at `next_seq` when it is stored.
    fn may_fill(&self, prev: i64, next_seq: i64, next: Option<&Message>) -> bool {
        if self.jump.is_some_and(|j| prev >= j.before && next_seq <= j.first_after) {
            return false;
        }
        match (self.head, next) {
            (QueueHead::Empty, _) => false,
            (QueueHead::Unknown, _) => true,
            // The message at `next_seq` is not stored: it, and the ones
            // before it, may be in the queue.
            (QueueHead::Since(_), None) => true,
            (QueueHead::Since(oldest_ms), Some(next)) => oldest_ms <= next.ts.saturating_add(ACCEPT_DEADLINE_MS),
        }
    }
}

/// A window after a cursor as it may be answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    /// All of the window.
    Whole(Vec<Message>),
    /// The window up to a hole a message still in the queue will fill.
    Ended(Vec<Message>),
    /// The window lies between two messages and has such a hole: it cannot
    /// be answered yet.
    Pending,
}

/// Settles the window of at most `limit` messages after seq `after` (and
/// before seq `before`, if set): `rows` are PostgreSQL's, oldest first, and
/// `end` the message at `before` if it is stored.
pub fn settle(
    after: i64,
    before: Option<i64>,
    limit: usize,
    mut rows: Vec<Message>,
    end: Option<&Message>,
    queue: &QueueView,
) -> Settled {
    let mut prev = after;
    for at in 0..rows.len() {
        let seq = rows[at].seq;
        if seq > prev.saturating_add(1) && queue.may_fill(prev, seq, Some(&rows[at])) {
            if before.is_some() {
                return Settled::Pending;
            }
            rows.truncate(at);
            return Settled::Ended(rows);
        }
        prev = seq;
    }
    // Between the last row and `before`: unless the page is full, the
    // window reaches up to `before`, so a hole there is in it too.
    if let Some(before) = before {
        if rows.len() < limit && prev.saturating_add(1) < before && queue.may_fill(prev, before, end) {
            return Settled::Pending;
        }
    }
    Settled::Whole(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    const NOW: i64 = 1_800_000_000_000;

    /// Messages at `seqs`, each accepted 20 s after the previous one, the last at NOW.
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
                ts: NOW - (n - 1 - i as i64) * 20_000,
            })
            .collect()
    }

    fn queue(head: QueueHead) -> QueueView {
        QueueView { head, jump: None }
    }

    /// A window after seq 3 with no `before`, limit 50.
    fn after_3(seqs: &[i64], view: QueueView) -> Settled {
        settle(3, None, 50, rows(seqs), None, &view)
    }

    fn seqs_of(settled: &Settled) -> Option<Vec<i64>> {
        match settled {
            Settled::Whole(m) | Settled::Ended(m) => Some(m.iter().map(|m| m.seq).collect()),
            Settled::Pending => None,
        }
    }

    #[test]
    fn a_window_without_holes_is_whole_whatever_the_queue_holds() {
        for head in [QueueHead::Empty, QueueHead::Since(0), QueueHead::Unknown] {
            let settled = after_3(&[4, 5, 6], queue(head));
            assert!(matches!(settled, Settled::Whole(_)), "{settled:?}");
            assert_eq!(seqs_of(&settled), Some(vec![4, 5, 6]));
        }
    }

    #[test]
    fn a_page_ends_at_a_hole_while_the_queue_holds_an_entry_from_before_its_next_message() {
        // 5 is missing; the oldest entry is from before 6 was accepted.
        let settled = after_3(&[4, 6, 7], queue(QueueHead::Since(NOW - 60_000)));
        assert!(matches!(settled, Settled::Ended(_)), "{settled:?}");
        assert_eq!(seqs_of(&settled), Some(vec![4]));
        // A hole right after the cursor: nothing to give yet.
        let settled = after_3(&[5, 6], queue(QueueHead::Since(NOW - 60_000)));
        assert_eq!(seqs_of(&settled), Some(vec![]));
    }

    #[test]
    fn a_hole_is_for_good_once_the_queue_holds_nothing_queued_before_its_next_message() {
        assert_eq!(
            seqs_of(&after_3(&[4, 6, 7], queue(QueueHead::Empty))),
            Some(vec![4, 6, 7])
        );
        // 6 was accepted at NOW - 20 s, so it was queued by NOW - 20 s + the
        // deadline; an older entry than that may be 5.
        let queued_by = NOW - 20_000 + ACCEPT_DEADLINE_MS;
        let whole = after_3(&[4, 6, 7], queue(QueueHead::Since(queued_by + 1)));
        assert_eq!(seqs_of(&whole), Some(vec![4, 6, 7]));
        let ended = after_3(&[4, 6, 7], queue(QueueHead::Since(queued_by)));
        assert_eq!(seqs_of(&ended), Some(vec![4]));
    }

    #[test]
    fn an_old_hole_for_good_is_passed_and_a_newer_one_that_may_fill_ends_the_page() {
        // 6 accepted at NOW - 60 s, 9 at NOW - 20 s; the oldest entry at NOW - 30 s.
        let settled = after_3(&[4, 6, 7, 9, 10], queue(QueueHead::Since(NOW - 30_000)));
        assert_eq!(seqs_of(&settled), Some(vec![4, 6, 7]));
    }

    #[test]
    fn without_an_answer_from_redis_every_hole_may_fill() {
        assert_eq!(seqs_of(&after_3(&[4, 6], queue(QueueHead::Unknown))), Some(vec![4]));
    }

    #[test]
    fn the_seqs_a_restart_skipped_are_no_hole_but_a_message_beside_them_may_be() {
        let view = QueueView {
            head: QueueHead::Unknown,
            jump: Some(SeqJump {
                before: 5,
                first_after: 1006,
            }),
        };
        // 6..1005 were never given.
        assert_eq!(
            seqs_of(&after_3(&[4, 5, 1006, 1007], view)),
            Some(vec![4, 5, 1006, 1007])
        );
        // 5 was given before the restart, and is not stored yet.
        assert_eq!(seqs_of(&after_3(&[4, 1006], view)), Some(vec![4]));
        // 1006 was given after it.
        assert_eq!(seqs_of(&after_3(&[4, 5, 1007], view)), Some(vec![4, 5]));
    }

    #[test]
    fn a_window_between_two_messages_with_a_hole_that_may_fill_is_pending() {
        let waiting = queue(QueueHead::Since(NOW - 60_000));
        // Inside the rows.
        assert_eq!(
            settle(3, Some(9), 50, rows(&[4, 6, 7]), None, &waiting),
            Settled::Pending
        );
        // After the last row, before `before`: judged by the message at
        // `before` when it is stored, else it may fill.
        let end = rows(&[4, 5, 9]).pop().unwrap();
        assert_eq!(
            settle(3, Some(9), 50, rows(&[4, 5]), Some(&end), &waiting),
            Settled::Pending
        );
        assert_eq!(settle(3, Some(9), 50, rows(&[4, 5]), None, &waiting), Settled::Pending);
        assert_eq!(settle(3, Some(9), 50, vec![], None, &waiting), Settled::Pending);
        // The same windows once the queue holds nothing from before them.
        let settled = settle(3, Some(9), 50, rows(&[4, 5]), Some(&end), &queue(QueueHead::Empty));
        assert_eq!(seqs_of(&settled), Some(vec![4, 5]));
        // No hole up to `before`, or a full page: whole.
        let settled = settle(3, Some(6), 50, rows(&[4, 5]), None, &waiting);
        assert_eq!(seqs_of(&settled), Some(vec![4, 5]));
        let settled = settle(3, Some(9), 2, rows(&[4, 5]), None, &waiting);
        assert_eq!(seqs_of(&settled), Some(vec![4, 5]));
    }
}
