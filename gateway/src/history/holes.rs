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
//! restart skips): those must not stop pages. The argument, for a missing
//! message M before a message N (stored, or the window's `before`):
//! - the accept script appends a chat's messages to the queue in seq order,
//!   so M's entry id is below N's; and it queues a message only within
//!   `ACCEPT_DEADLINE_MS` of its `ts`, by Redis's clock, so N's entry id
//!   time is at most N's `ts` plus the deadline;
//! - the persister deletes an entry once its message is stored or
//!   dead-lettered;
//! - the caller reads, *before* the rows, a time `since` (Redis's clock)
//!   such that every message queued before it has left the queue: the
//!   queue's oldest entry, or the time of the read when it is empty.
//!
//! So if M may still come, it was queued at or after `since`, and `since` is
//! at most N's `ts` plus the deadline (plus `CLOCK_MARGIN_MS` for Redis's
//! clock). Past that, the hole is for good. (M
//! stored between the caller's two reads is in the rows.) The seqs of the
//! chat's last restart jump were given to no message that Redis kept. A
//! dead letter replayed into the queue is a new entry, later than N's:
//! windows may pass its hole before it is stored again.
//!
//! Pure: the caller reads the queue and PostgreSQL, and counts.

use shared::protocol::Message;

use crate::queue::{SeqJump, ACCEPT_DEADLINE_MS};

/// Slack for Redis's own clock: an entry id's time is the later of the
/// clock and the stream's last id, and XADD may read the clock a little
/// after the script's `TIME`. (A Redis clock stepping back by more than this
/// is not allowed for.)
const CLOCK_MARGIN_MS: i64 = 1_000;

/// How long after the `ts` of the message past a hole everything queued
/// before that message has surely left the queue (if it ever will).
pub const FINAL_AFTER_MS: i64 = ACCEPT_DEADLINE_MS + CLOCK_MARGIN_MS;

/// What the queue said, read before the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueHead {
    /// Every message queued before this time (ms since the epoch, Redis's
    /// clock) has left the queue.
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
    /// be in the queue; `next_ts` is the `ts` of the message at `next_seq`.
    fn may_fill(&self, prev: i64, next_seq: i64, next_ts: i64) -> bool {
        if self.jump.is_some_and(|j| prev >= j.before && next_seq <= j.first_after) {
            return false;
        }
        match self.head {
            QueueHead::Since(since_ms) => since_ms <= next_ts.saturating_add(FINAL_AFTER_MS),
            QueueHead::Unknown => true,
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
/// before `before`, the seq and `ts` of a message, if set): `rows` are
/// PostgreSQL's, oldest first.
pub fn settle(
    after: i64,
    before: Option<(i64, i64)>,
    limit: usize,
    mut rows: Vec<Message>,
    queue: &QueueView,
) -> Settled {
    let mut prev = after;
    for at in 0..rows.len() {
        let (seq, ts) = (rows[at].seq, rows[at].ts);
        if seq > prev.saturating_add(1) && queue.may_fill(prev, seq, ts) {
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
    if let Some((before, before_ts)) = before {
        if rows.len() < limit && prev.saturating_add(1) < before && queue.may_fill(prev, before, before_ts) {
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
        settle(3, None, 50, rows(seqs), &view)
    }

    fn seqs_of(settled: &Settled) -> Option<Vec<i64>> {
        match settled {
            Settled::Whole(m) | Settled::Ended(m) => Some(m.iter().map(|m| m.seq).collect()),
            Settled::Pending => None,
        }
    }

    #[test]
    fn a_window_without_holes_is_whole_whatever_the_queue_holds() {
        for head in [QueueHead::Since(NOW), QueueHead::Since(0), QueueHead::Unknown] {
            let settled = after_3(&[4, 5, 6], queue(head));
            assert!(matches!(settled, Settled::Whole(_)), "{settled:?}");
            assert_eq!(seqs_of(&settled), Some(vec![4, 5, 6]));
        }
    }

    #[test]
    fn a_page_ends_at_a_hole_while_the_queue_may_hold_a_message_queued_before_the_next_one() {
        // 5 is missing; messages queued since NOW - 60 s may still be there.
        let settled = after_3(&[4, 6, 7], queue(QueueHead::Since(NOW - 60_000)));
        assert!(matches!(settled, Settled::Ended(_)), "{settled:?}");
        assert_eq!(seqs_of(&settled), Some(vec![4]));
        // A hole right after the cursor: nothing to give yet.
        let settled = after_3(&[5, 6], queue(QueueHead::Since(NOW - 60_000)));
        assert_eq!(seqs_of(&settled), Some(vec![]));
    }

    #[test]
    fn a_hole_is_for_good_once_everything_queued_by_the_next_messages_deadline_has_left() {
        // 6 was accepted at NOW - 20 s, so it was queued by NOW - 20 s + the
        // deadline, and 5 before it.
        let queued_by = NOW - 20_000 + FINAL_AFTER_MS;
        let whole = after_3(&[4, 6, 7], queue(QueueHead::Since(queued_by + 1)));
        assert_eq!(seqs_of(&whole), Some(vec![4, 6, 7]));
        let ended = after_3(&[4, 6, 7], queue(QueueHead::Since(queued_by)));
        assert_eq!(seqs_of(&ended), Some(vec![4]));
    }

    #[test]
    fn an_old_hole_for_good_is_passed_and_a_newer_one_that_may_fill_ends_the_page() {
        // 6 accepted at NOW - 60 s, 9 at NOW - 20 s; everything queued
        // before NOW - 30 s has left.
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
        let before = Some((9, NOW));
        // Inside the rows.
        assert_eq!(settle(3, before, 50, rows(&[4, 6, 7]), &waiting), Settled::Pending);
        // After the last row, before `before` (judged by its `ts`).
        assert_eq!(settle(3, before, 50, rows(&[4, 5]), &waiting), Settled::Pending);
        assert_eq!(settle(3, before, 50, vec![], &waiting), Settled::Pending);
        // The same windows once everything queued by 9's deadline has left.
        let left = queue(QueueHead::Since(NOW + FINAL_AFTER_MS + 1));
        assert_eq!(seqs_of(&settle(3, before, 50, rows(&[4, 5]), &left)), Some(vec![4, 5]));
        // No hole up to `before`, or a full page: whole.
        let settled = settle(3, Some((6, NOW)), 50, rows(&[4, 5]), &waiting);
        assert_eq!(seqs_of(&settled), Some(vec![4, 5]));
        assert_eq!(
            seqs_of(&settle(3, before, 2, rows(&[4, 5]), &waiting)),
            Some(vec![4, 5])
        );
    }
}
