//! Unit tests of the batch policy: splitting and backoff.

use std::cell::RefCell;
use std::collections::HashSet;

use shared::protocol::Message;
use uuid::Uuid;

use super::*;

/// Refuses any batch holding a message whose seq is in `bad`; fails every
/// write from call number `down_from` on as if PostgreSQL were gone.
struct FakeStore {
    bad: HashSet<i64>,
    down_from: Option<usize>,
    calls: RefCell<Vec<Vec<i64>>>,
}

#[derive(Debug, PartialEq)]
enum FakeError {
    Data,
    Down,
}

impl std::fmt::Display for FakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl FakeStore {
    fn new(bad: &[i64]) -> FakeStore {
        FakeStore {
            bad: bad.iter().copied().collect(),
            down_from: None,
            calls: RefCell::new(Vec::new()),
        }
    }
}

impl WriteBatch for FakeStore {
    type Error = FakeError;

    async fn write_batch(&self, jobs: &[Job]) -> Result<(), FakeError> {
        let seqs: Vec<i64> = jobs
            .iter()
            .map(|j| match j {
                Job::Message(m) => m.seq,
                _ => -1,
            })
            .collect();
        let mut calls = self.calls.borrow_mut();
        calls.push(seqs.clone());
        if self.down_from.is_some_and(|n| calls.len() > n) {
            return Err(FakeError::Down);
        }
        if seqs.iter().any(|s| self.bad.contains(s)) {
            return Err(FakeError::Data);
        }
        Ok(())
    }

    fn is_data_error(error: &FakeError) -> bool {
        *error == FakeError::Data
    }
}

fn jobs(n: i64) -> Vec<Job> {
    (0..n)
        .map(|seq| {
            Job::Message(Message {
                id: Uuid::now_v7(),
                chat: Uuid::from_u128(1),
                seq,
                from: Uuid::from_u128(2),
                to: None,
                body: format!("m{seq}"),
                ts: 1,
            })
        })
        .collect()
}

#[tokio::test]
async fn a_good_batch_is_one_write() {
    let store = FakeStore::new(&[]);
    let out = write_isolating(&store, &jobs(10)).await;
    assert_eq!(out.stored, (0..10).collect::<Vec<_>>());
    assert!(out.rejected.is_empty() && out.failed.is_none());
    assert_eq!(store.calls.borrow().len(), 1);
}

#[tokio::test]
async fn an_empty_batch_writes_nothing() {
    let store = FakeStore::new(&[]);
    let out = write_isolating(&store, &[]).await;
    assert!(out.stored.is_empty() && out.failed.is_none());
    assert!(store.calls.borrow().is_empty());
}

#[tokio::test]
async fn bad_entries_are_isolated_and_the_rest_is_stored() {
    let store = FakeStore::new(&[3, 12]);
    let out = write_isolating(&store, &jobs(16)).await;
    let mut stored = out.stored.clone();
    stored.sort();
    let expected: Vec<usize> = (0..16).filter(|i| *i != 3 && *i != 12).collect();
    assert_eq!(stored, expected);
    let rejected: Vec<usize> = out.rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(rejected, vec![3, 12]);
    assert!(out.failed.is_none());
    // 1 + 2 halves + 2 quarters each side + ... : logarithmic, not linear.
    assert!(store.calls.borrow().len() <= 1 + 2 * 2 * 4, "{:?}", store.calls);
}

#[tokio::test]
async fn a_lone_bad_entry_is_rejected() {
    let store = FakeStore::new(&[0]);
    let out = write_isolating(&store, &jobs(1)).await;
    assert!(out.stored.is_empty());
    assert_eq!(out.rejected, vec![(0, FakeError::Data)]);
}

#[tokio::test]
async fn a_connection_error_stops_without_splitting() {
    let mut store = FakeStore::new(&[]);
    store.down_from = Some(0);
    let out = write_isolating(&store, &jobs(8)).await;
    assert!(out.stored.is_empty() && out.rejected.is_empty());
    assert_eq!(out.failed, Some(FakeError::Down));
    assert_eq!(store.calls.borrow().len(), 1);
}

#[tokio::test]
async fn what_was_stored_before_a_connection_error_is_kept() {
    // Call 1: whole batch refused (bad seq 7); call 2: first half stored;
    // call 3: second half fails because the database went away.
    let mut store = FakeStore::new(&[7]);
    store.down_from = Some(2);
    let out = write_isolating(&store, &jobs(8)).await;
    assert_eq!(out.stored, vec![0, 1, 2, 3]);
    assert_eq!(out.failed, Some(FakeError::Down));
}

#[test]
fn backoff_doubles_to_its_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let delays: Vec<u64> = (0..9).map(|_| b.next_delay().as_millis() as u64).collect();
    assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    b.reset();
    assert_eq!(b.next_delay(), Duration::from_millis(100));
}

/// The retry path as the worker drives it: the first batch stores all but
/// the poison job; later batches of new jobs are stored whole while the
/// poison job is retried alone (one write per try) until the policy
/// dead-letters it at the delivery limit.
#[tokio::test]
async fn a_poison_job_never_holds_back_the_others_and_is_given_up_at_the_limit() {
    use crate::retry::{RetryPolicy, Verdict};

    let store = FakeStore::new(&[3]);
    let all = jobs(40);
    let policy = RetryPolicy::default();

    // Delivery 1: the batch it came in.
    let out = write_isolating(&store, &all[..16]).await;
    assert_eq!(out.stored.len(), 15);
    assert_eq!(out.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [3]);
    let poison = all[3].clone();
    let mut deliveries = 1;
    let mut waited = Duration::ZERO;
    let mut new_jobs = all[16..].chunks(8);
    while let Verdict::Retry(wait) = policy.verdict(deliveries) {
        waited += wait;
        // Meanwhile new jobs keep flowing, untouched by the poison job.
        if let Some(batch) = new_jobs.next() {
            let calls = store.calls.borrow().len();
            let out = write_isolating(&store, batch).await;
            assert_eq!(out.stored.len(), batch.len());
            assert_eq!(store.calls.borrow().len(), calls + 1, "a clean batch is one write");
        }
        // The retry: the poison job alone, one write.
        let calls = store.calls.borrow().len();
        let out = write_isolating(&store, std::slice::from_ref(&poison)).await;
        assert_eq!(out.rejected.len(), 1);
        assert_eq!(store.calls.borrow().len(), calls + 1);
        deliveries += 1;
    }
    assert_eq!(deliveries, policy.max_deliveries);
    assert_eq!(waited, Duration::from_millis(250 + 500 + 1000 + 2000));
}
