//! Consumes the queue stream through the consumer group and acknowledges
//! what PostgreSQL committed.
//!
//! Owns the consumer-group protocol: creating the group, reading this
//! consumer's own pending entries and then new ones, taking over entries left
//! pending by dead consumers (XAUTOCLAIM), dead-lettering entries that are not
//! jobs, and XACK + XDEL after commit. It must never acknowledge an entry
//! before the transaction that stored it committed, and never drop one
//! without a trace: every entry ends up stored, in `chat:dead`, or pending.
//!
//! The stream holds only the backlog: an entry is deleted (XDEL) in the same
//! MULTI as its XACK, so `XLEN chat:queue` is the number of entries not yet
//! stored. This assumes the persisters' group is the stream's only reader.
//!
//! Failures:
//! - Redis or PostgreSQL unreachable: nothing of the batch is acked; the
//!   worker backs off (100 ms doubling to 5 s) and re-reads its own pending
//!   entries, so the batch is retried as it was. Both connections reconnect by
//!   themselves; the process never needs a restart.
//! - An entry that does not parse as a job: copied to `chat:dead` with
//!   `reason` and `source_id` fields, then acked, with a warning.
//! - PostgreSQL refusing the data (constraint or encoding error): the batch is
//!   split in halves until the refused entries are alone; everything else is
//!   stored and acked. A refused entry is logged as an error and stays pending
//!   (visible in XPENDING and the `persister_pending` gauge). Once it has been
//!   idle for PERSISTER_CLAIM_IDLE_MS a persister claims it and tries again,
//!   which raises its delivery count; nothing dead-letters it yet, so it stays
//!   pending until it is fixed by hand or PostgreSQL accepts it.

use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use shared::queue::{Job, JobError, DEAD_LETTERS, GROUP, STREAM};
use tokio_util::sync::CancellationToken;

use crate::batch::{write_isolating, Backoff, WriteBatch};
use crate::reply::{self, Entry, ReplyError};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("storing a batch failed: {0}")]
    Store(#[from] StoreError),
}

impl WorkerError {
    /// The group is gone (e.g. Redis was flushed); it must be created again.
    fn is_no_group(&self) -> bool {
        matches!(self, WorkerError::Redis(e) if e.code() == Some("NOGROUP"))
    }
}

/// How this worker reads the stream.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This process's consumer name in the group.
    pub consumer: String,
    /// Entries per read, and so per transaction at most.
    pub batch_size: usize,
    /// How long a read of new entries waits.
    pub block: Duration,
    /// Pending entries idle longer than this are taken over.
    pub claim_idle: Duration,
}

/// The two Redis connections a worker uses. Each reconnects by itself.
#[derive(Clone)]
pub struct RedisConns {
    /// For XREADGROUP ... BLOCK only: a blocked read holds its connection, so
    /// it gets its own, with a response timeout longer than the block time.
    pub reader: ConnectionManager,
    /// For everything else (ack, claim, dead letters, XPENDING).
    pub commands: ConnectionManager,
}

impl RedisConns {
    /// Connects both; fails if Redis cannot be reached now (the caller retries).
    pub async fn connect(url: &str, block: Duration) -> Result<RedisConns, RedisError> {
        let client = redis::Client::open(url)?;
        // One quick reconnect attempt per command: when Redis stays down the
        // error surfaces within about a second and `Worker::run`'s backoff
        // takes over, which keeps shutdown prompt. (The default, 6 attempts
        // with redis-rs's backoff, hangs a command for ~17 s.)
        let config = |response_timeout| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(5))
                .set_response_timeout(response_timeout)
                .set_number_of_retries(1)
                .set_max_delay(1_000)
        };
        let reader = ConnectionManager::new_with_config(client.clone(), config(block + Duration::from_secs(5))).await?;
        let commands = ConnectionManager::new_with_config(client, config(Duration::from_secs(10))).await?;
        Ok(RedisConns { reader, commands })
    }
}

/// Where the next read comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Re-reading entries delivered to this consumer and not acked, after
    /// this id. Never blocks.
    OwnPending { after: String },
    /// Reading entries never delivered to anyone (`>`), blocking.
    New,
}

/// One persister's consumer. Drive it with `run_once` (tests) or `run`.
pub struct Worker {
    redis: RedisConns,
    store: Store,
    settings: Settings,
    shutdown: CancellationToken,
    group_ready: bool,
    phase: Phase,
    claim_cursor: String,
    next_claim: Instant,
}

impl Worker {
    /// `shutdown` interrupts a blocking read only; a batch in hand is always
    /// finished and acked.
    pub fn new(redis: RedisConns, store: Store, settings: Settings, shutdown: CancellationToken) -> Worker {
        Worker {
            redis,
            store,
            settings,
            shutdown,
            group_ready: false,
            phase: Phase::OwnPending { after: "0-0".into() },
            claim_cursor: "0-0".into(),
            next_claim: Instant::now(),
        }
    }

    /// Loops on `run_once` until `shutdown` fires, backing off after errors.
    pub async fn run(&mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !self.shutdown.is_cancelled() {
            match self.run_once().await {
                Ok(_) => backoff.reset(),
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "persisting stalled; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                }
            }
        }
        tracing::info!(consumer = %self.settings.consumer, "worker stopped");
    }

    /// Handles one batch: claimed, own pending, or new entries (waiting up to
    /// the block time for those). Returns how many entries it handled; `Ok(0)`
    /// means there was nothing to do.
    pub async fn run_once(&mut self) -> Result<usize, WorkerError> {
        let result = self.step().await;
        if let Err(e) = &result {
            if e.is_no_group() {
                self.group_ready = false;
            }
            // What this consumer read and did not ack is still pending for it:
            // read it again first, and rescan for claimable entries from the start.
            self.phase = Phase::OwnPending { after: "0-0".into() };
            self.claim_cursor = "0-0".into();
        }
        result
    }

    async fn step(&mut self) -> Result<usize, WorkerError> {
        if !self.group_ready {
            self.create_group().await?;
            self.group_ready = true;
        }
        if let Phase::OwnPending { after } = &self.phase {
            let entries = self.read(after.clone(), None).await?;
            match entries.last() {
                Some(last) => {
                    self.phase = Phase::OwnPending { after: last.id.clone() };
                    return self.handle(entries).await;
                }
                None => self.phase = Phase::New,
            }
        }
        if Instant::now() >= self.next_claim {
            let claimed = self.claim().await?;
            if !claimed.is_empty() {
                return self.handle(claimed).await;
            }
        }
        let shutdown = self.shutdown.clone();
        let block = self.settings.block;
        // Cancelling a blocked read is safe: anything Redis delivered to it
        // meanwhile stays pending for this consumer and is read at the next
        // start or claimed by another persister.
        let entries = tokio::select! {
            read = self.read(">".into(), Some(block)) => read?,
            _ = shutdown.cancelled() => return Ok(0),
        };
        self.handle(entries).await
    }

    async fn create_group(&mut self) -> Result<(), WorkerError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.redis.commands)
            .await;
        match created {
            Ok(()) => {
                tracing::info!(stream = STREAM, group = GROUP, "created consumer group");
                Ok(())
            }
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn read(&mut self, id: String, block: Option<Duration>) -> Result<Vec<Entry>, WorkerError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch_size);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(STREAM).arg(id);
        let value: Value = cmd.query_async(&mut self.redis.reader).await?;
        Ok(reply::read_group(value)?)
    }

    /// One XAUTOCLAIM step. A full scan of the pending list may take several
    /// steps; the next scan starts `claim_idle / 2` after one completes.
    async fn claim(&mut self) -> Result<Vec<Entry>, WorkerError> {
        let value: Value = redis::cmd("XAUTOCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg(self.settings.claim_idle.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(self.settings.batch_size)
            .query_async(&mut self.redis.commands)
            .await?;
        let claimed = reply::auto_claim(value)?;
        if !claimed.deleted.is_empty() {
            tracing::warn!(
                ids = ?claimed.deleted,
                "pending entries were deleted from the stream before being stored; Redis dropped them from the pending list"
            );
        }
        if claimed.next == "0-0" {
            self.next_claim = Instant::now() + (self.settings.claim_idle / 2);
        }
        self.claim_cursor = claimed.next;
        if !claimed.entries.is_empty() {
            tracing::info!(
                count = claimed.entries.len(),
                "claimed entries idle for longer than PERSISTER_CLAIM_IDLE_MS"
            );
        }
        Ok(claimed.entries)
    }

    async fn handle(&mut self, entries: Vec<Entry>) -> Result<usize, WorkerError> {
        let count = entries.len();
        if count == 0 {
            return Ok(0);
        }
        metrics::counter!("persister_batches_total").increment(1);
        metrics::histogram!("persister_batch_size").record(count as f64);

        let mut ids = Vec::with_capacity(count);
        let mut jobs = Vec::with_capacity(count);
        let mut dead = Vec::new();
        for entry in entries {
            match parse(entry) {
                Ok((id, job)) => {
                    ids.push(id);
                    jobs.push(job);
                }
                Err(letter) => dead.push(letter),
            }
        }
        if !dead.is_empty() {
            self.dead_letter(&dead).await?;
        }

        let outcome = write_isolating(&self.store, &jobs).await;
        if !outcome.stored.is_empty() {
            let stored: Vec<&str> = outcome.stored.iter().map(|&i| ids[i].as_str()).collect();
            self.ack(&stored).await?;
            let mut per_kind = [("message", 0u64), ("chat", 0), ("member", 0)];
            for &i in &outcome.stored {
                if let Some(slot) = per_kind.iter_mut().find(|(k, _)| *k == kind(&jobs[i])) {
                    slot.1 += 1;
                }
            }
            for (kind, n) in per_kind.into_iter().filter(|(_, n)| *n > 0) {
                metrics::counter!("persister_jobs_stored_total", "kind" => kind).increment(n);
            }
        }
        for (i, e) in &outcome.rejected {
            tracing::error!(
                id = %ids[*i],
                kind = kind(&jobs[*i]),
                error = %e,
                "PostgreSQL refused this entry; it stays pending and is retried after PERSISTER_CLAIM_IDLE_MS"
            );
        }
        tracing::debug!(
            read = count,
            stored = outcome.stored.len(),
            dead_lettered = dead.len(),
            refused = outcome.rejected.len(),
            "handled a batch"
        );
        match outcome.failed {
            Some(e) => Err(e.into()),
            None => Ok(count),
        }
    }

    async fn ack(&mut self, ids: &[&str]) -> Result<(), WorkerError> {
        redis::pipe()
            .atomic()
            .cmd("XACK")
            .arg(STREAM)
            .arg(GROUP)
            .arg(ids)
            .ignore()
            .cmd("XDEL")
            .arg(STREAM)
            .arg(ids)
            .ignore()
            .query_async::<()>(&mut self.redis.commands)
            .await?;
        Ok(())
    }

    /// Copies each entry to the dead-letter stream and acks it, atomically.
    async fn dead_letter(&mut self, letters: &[DeadLetter]) -> Result<(), WorkerError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for letter in letters {
            let xadd = pipe.cmd("XADD").arg(DEAD_LETTERS).arg("*");
            for (field, value) in &letter.fields {
                xadd.arg(field).arg(value);
            }
            xadd.arg("reason")
                .arg(&letter.reason)
                .arg("source_id")
                .arg(&letter.id)
                .ignore();
        }
        let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
        pipe.cmd("XACK").arg(STREAM).arg(GROUP).arg(&ids).ignore();
        pipe.cmd("XDEL").arg(STREAM).arg(&ids).ignore();
        pipe.query_async::<()>(&mut self.redis.commands).await?;
        for letter in letters {
            metrics::counter!("persister_dead_letters_total", "reason" => letter.label).increment(1);
            tracing::warn!(
                id = %letter.id,
                reason = %letter.reason,
                dead_letters = DEAD_LETTERS,
                "entry is not a valid job; moved to the dead-letter stream"
            );
        }
        Ok(())
    }
}

/// The group's pending count (all consumers), for the `persister_pending` gauge.
pub async fn pending_count(commands: &mut ConnectionManager) -> Result<u64, WorkerError> {
    let value: Value = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query_async(commands)
        .await?;
    Ok(reply::pending_count(value)?)
}

/// An entry that is not a job, on its way to `chat:dead`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeadLetter {
    id: String,
    fields: Vec<(String, Vec<u8>)>,
    /// The metrics label: a fixed word per kind of failure.
    label: &'static str,
    /// The full message, stored in the dead letter's `reason` field.
    reason: String,
}

fn parse(entry: Entry) -> Result<(String, Job), DeadLetter> {
    let Some(fields) = entry.fields else {
        return Err(DeadLetter {
            id: entry.id,
            fields: Vec::new(),
            label: "deleted",
            reason: "the entry was deleted from the stream while pending".into(),
        });
    };
    let map = fields.iter().cloned().collect();
    match Job::from_fields(&map) {
        Ok(job) => Ok((entry.id, job)),
        Err(e) => Err(DeadLetter {
            id: entry.id,
            label: match e {
                JobError::Version(_) => "version",
                JobError::Missing(_) => "missing",
                JobError::Invalid { .. } => "invalid",
                JobError::Kind(_) => "kind",
            },
            reason: e.to_string(),
            fields,
        }),
    }
}

fn kind(job: &Job) -> &'static str {
    match job {
        Job::Message(_) => "message",
        Job::Chat { .. } => "chat",
        Job::Member { .. } => "member",
    }
}

impl WriteBatch for Store {
    type Error = StoreError;

    async fn write_batch(&self, jobs: &[Job]) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.write(jobs).await;
        match &result {
            Ok(()) => metrics::histogram!("persister_write_seconds").record(started.elapsed().as_secs_f64()),
            Err(_) => metrics::counter!("persister_write_errors_total").increment(1),
        }
        result
    }

    fn is_data_error(error: &StoreError) -> bool {
        error.is_data_error()
    }
}

#[cfg(test)]
mod tests;
