//! Batch policy with no I/O of its own: isolating the entries PostgreSQL
//! refuses by halving a batch, and the backoff between failed attempts.
//!
//! Generic over `WriteBatch` so it is unit-tested with a fake store. It must
//! never decide what is acknowledged (the worker does, from `Outcome`) nor
//! sleep: `Backoff` only computes the delays.

use std::ops::Range;
use std::time::Duration;

use shared::queue::Job;

/// A transactional batch write, as `write_isolating` sees it.
pub(crate) trait WriteBatch {
    type Error: std::fmt::Display;
    /// All of `jobs` committed, or none.
    async fn write_batch(&self, jobs: &[Job]) -> Result<(), Self::Error>;
    /// Whether retrying without some of the jobs could succeed.
    fn is_data_error(error: &Self::Error) -> bool;
}

/// What became of a batch.
#[derive(Debug)]
pub(crate) struct Outcome<E> {
    /// Indices of the jobs committed.
    pub stored: Vec<usize>,
    /// Jobs PostgreSQL refused on their own, with its error.
    pub rejected: Vec<(usize, E)>,
    /// Set when a write failed for a reason other than the data; the jobs
    /// neither stored nor rejected were not tried to the end.
    pub failed: Option<E>,
}

/// Writes `jobs` in one transaction; when PostgreSQL refuses the data,
/// halves the batch until each refused job is alone, so all the others are
/// stored. A single bad job among n costs about 2·log2(n) extra transactions.
pub(crate) async fn write_isolating<W: WriteBatch>(writer: &W, jobs: &[Job]) -> Outcome<W::Error> {
    let mut outcome = Outcome {
        stored: Vec::new(),
        rejected: Vec::new(),
        failed: None,
    };
    // A stack, so the halves are tried in order, first half first.
    let mut todo: Vec<Range<usize>> = Vec::new();
    if !jobs.is_empty() {
        todo.push(0..jobs.len());
    }
    while let Some(range) = todo.pop() {
        match writer.write_batch(&jobs[range.clone()]).await {
            Ok(()) => outcome.stored.extend(range),
            Err(e) if W::is_data_error(&e) && range.len() > 1 => {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
            Err(e) if W::is_data_error(&e) => outcome.rejected.push((range.start, e)),
            Err(e) => {
                outcome.failed = Some(e);
                break;
            }
        }
    }
    outcome
}

/// Exponential backoff between failed attempts: `first`, doubling, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests;
