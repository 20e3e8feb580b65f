//! Consumes the queue stream through the consumer group and acknowledges
//! what PostgreSQL committed.
//!
//! Owns the consumer-group protocol: creating the group, reading this
//! consumer's own pending entries and then new ones, taking over entries left
//! pending by dead consumers (XAUTOCLAIM), retrying refused entries and
//! dead-lettering them after PERSISTER_MAX_DELIVERIES, and XACK + XDEL after
//! commit. It must never acknowledge an entry before the transaction that
//! stored it committed, and never drop one without a trace: every entry ends
//! up stored, in `chat:dead`, or pending.
//!
//! The stream holds only the backlog: an entry is deleted (XDEL) in the same
//! MULTI as its XACK (in one script instead when Redis, at `maxmemory`,
//! refuses MULTI), so `XLEN chat:queue` is the number of entries not yet
//! stored. Nothing trims the stream (no MAXLEN, no XTRIM): a trim could drop
//! entries not yet stored. This assumes the persisters' group is the stream's
//! only reader. See docs/queue.md.
//!
//! While the queue has a backlog (a read returned a full batch), the next
//! batch is read from Redis while the current one is written to PostgreSQL.
//!
//! Failures:
//! - Redis or PostgreSQL unreachable: nothing of the batch is acked; the
//!   worker backs off (100 ms doubling to 5 s) and re-reads its own pending
//!   entries, so the batch is retried as it was. Both connections reconnect by
//!   themselves; the process never needs a restart. Such failures never
//!   dead-letter anything.
//! - An entry that does not parse as a job: moved to `chat:dead` at once.
//! - PostgreSQL refusing the data (constraint or encoding error): the batch is
//!   split in halves until the refused entries are alone; everything else is
//!   stored and acked. A refused entry stays pending; its delivery count is
//!   read from XPENDING, and `RetryPolicy` decides: below the limit, this
//!   consumer claims it again (XCLAIM, which counts a delivery) after a
//!   backoff; at the limit it is moved to `chat:dead` with the error text
//!   (`dead::move_to_dead`, atomic).
//! - An entry deleted from the stream (by hand) while pending: a dead letter
//!   of class `deleted`, without fields. Re-reading this consumer's pending
//!   entries finds it with no fields (and moves it like a job that is not
//!   one); a takeover (XAUTOCLAIM) or a retry (XCLAIM) does not find it at
//!   all, because Redis drops it from the pending list there and tells only
//!   that caller: XAUTOCLAIM lists it apart, and for XCLAIM the retry
//!   transaction reads beforehand which ids are pending and which entries
//!   exist. Nothing else will ever see it again, so its letter is kept in
//!   memory until written (`dead::add`).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, Value};
use shared::queue::{Job, JobError, DEAD_LETTERS, GROUP, STREAM};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch::{write_isolating, Backoff, WriteBatch};
use crate::dead::{self, DeadError, DeadLetter};
use crate::reply::{self, Entry, ReplyError};
use crate::retry::{stream_id_millis, RetryPolicy, RetrySchedule, Verdict};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("storing a batch failed: {0}")]
    Store(#[from] StoreError),
    #[error("dead-lettering failed: {0}")]
    Dead(#[from] DeadError),
    #[error("the read-ahead task failed: {0}")]
    Task(String),
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
    /// The pause before reading new entries after a read drained the stream.
    pub linger: Duration,
    /// Pending entries idle longer than this are taken over.
    pub claim_idle: Duration,
    /// Retries of refused entries and the dead-letter limit.
    pub retry: RetryPolicy,
}

/// The two Redis connections a worker uses. Each reconnects by itself.
#[derive(Clone)]
pub struct RedisConns {
    /// For XREADGROUP only: a blocked read holds its connection, so it gets
    /// its own, with a response timeout longer than the block time.
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

/// A non-blocking read of new entries running while a batch is written.
type ReadAhead = JoinHandle<Result<Vec<Entry>, WorkerError>>;

/// `ack`'s XACK and XDEL for a Redis at `maxmemory`, which refuses MULTI but
/// runs a script that calls only commands that free memory. KEYS: the
/// stream; ARGV: the group, then the ids.
static ACK_AND_DELETE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        "redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))\n\
         redis.call('XDEL', KEYS[1], unpack(ARGV, 2))\n\
         return 1",
    )
});
/// Ids per call of `ACK_AND_DELETE`: Lua's `unpack` takes a few thousand.
const ACK_SCRIPT_IDS: usize = 1000;

/// How long a stopping lane keeps storing what it holds: well inside the
/// deployment's grace period (60 s), which must also cover the batch in
/// hand when the signal came.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(20);

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
    retries: RetrySchedule,
    read_ahead: Option<ReadAhead>,
    /// The last read of new entries found fewer than a batch: the stream
    /// was drained, and the next read waits `linger` first.
    drained: bool,
    /// Letters for entries Redis reported deleted while pending, and dropped
    /// from the pending list, that are not in `chat:dead` yet (Redis failed
    /// meanwhile). Nothing else remembers them: tried at every step.
    deleted: VecDeque<DeadLetter>,
    /// Writing `deleted` failed and was logged; said again once it succeeds.
    deleted_failing: bool,
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
            retries: RetrySchedule::default(),
            read_ahead: None,
            drained: false,
            deleted: VecDeque::new(),
            deleted_failing: false,
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
        // A batch read ahead is in hand too: store it before leaving.
        if let Some(read_ahead) = self.read_ahead.take() {
            if let Ok(Ok(entries)) = read_ahead.await {
                if let Err(e) = self.handle(entries).await {
                    tracing::warn!(error = %e, "the last batch was not stored; it stays pending");
                }
            }
        }
        // What this consumer still holds is stored before it leaves, not
        // left pending until another persister claims it: a blocking read
        // cancelled by the shutdown may have been served by Redis at that
        // instant, and a lane that failed before the shutdown holds what it
        // read then and its read-ahead, more than one batch. A batch at a
        // time, until none is left, PostgreSQL fails, or the deadline passes.
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        self.phase = Phase::OwnPending { after: "0-0".into() };
        while Instant::now() < deadline {
            match self.next_own_pending().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "entries held at shutdown were not all stored; the rest stay pending");
                    break;
                }
            }
        }
        if let Err(e) = self.write_deleted().await {
            let ids: Vec<&str> = self.deleted.iter().map(|l| l.source_id.as_str()).collect();
            tracing::error!(
                error = %e,
                ids = ?ids,
                "entries deleted from the stream while pending are not in {DEAD_LETTERS}; they are lost"
            );
        }
        tracing::info!(consumer = %self.settings.consumer, "worker stopped");
    }

    /// Handles one batch: own pending, due retries, claimed, or new entries
    /// (waiting up to the block time for those). Returns how many entries it
    /// handled; `Ok(0)` means there was nothing to do.
    pub async fn run_once(&mut self) -> Result<usize, WorkerError> {
        let result = self.step().await;
        if let Err(e) = &result {
            if e.is_no_group() {
                self.group_ready = false;
            }
            // A read ahead is short (it never blocks): let it land, so what
            // it read is in this consumer's pending list before that is re-read.
            if let Some(read_ahead) = self.read_ahead.take() {
                let _ = read_ahead.await;
            }
            // What this consumer read and did not ack is still pending for it:
            // read it again first, and rescan for claimable entries from the start.
            self.phase = Phase::OwnPending { after: "0-0".into() };
            self.claim_cursor = "0-0".into();
        }
        result
    }

    /// In the `OwnPending` phase, handles the next batch of this consumer's
    /// own pending entries (read after the phase's cursor, which moves past
    /// them) and returns how many it handled; `None`, and the `New` phase,
    /// once none are left (or in another phase).
    async fn next_own_pending(&mut self) -> Result<Option<usize>, WorkerError> {
        let Phase::OwnPending { after } = &self.phase else {
            return Ok(None);
        };
        let entries = self.read(after.clone(), None).await?;
        let Some(last) = entries.last() else {
            self.phase = Phase::New;
            return Ok(None);
        };
        self.phase = Phase::OwnPending { after: last.id.clone() };
        self.handle(entries).await.map(Some)
    }

    async fn step(&mut self) -> Result<usize, WorkerError> {
        if !self.group_ready {
            self.create_group().await?;
            self.group_ready = true;
        }
        self.try_write_deleted().await;
        if let Some(handled) = self.next_own_pending().await? {
            return Ok(handled);
        }
        let due = self.retries.take_due(Instant::now(), self.settings.batch_size);
        if !due.is_empty() {
            let entries = self.reclaim(&due).await?;
            return self.handle(entries).await;
        }
        if Instant::now() >= self.next_claim {
            let claimed = self.claim().await?;
            if !claimed.is_empty() {
                return self.handle(claimed).await;
            }
        }
        let entries = match self.read_ahead.take() {
            Some(read_ahead) => read_ahead.await.map_err(|e| WorkerError::Task(e.to_string()))??,
            None => {
                let shutdown = self.shutdown.clone();
                if self.drained && !self.settings.linger.is_zero() {
                    // Let entries gather: a batch of one costs PostgreSQL a
                    // transaction and a WAL flush just as a batch of fifty.
                    tokio::select! {
                        _ = tokio::time::sleep(self.settings.linger) => {}
                        _ = shutdown.cancelled() => return Ok(0),
                    }
                }
                let block = self.block_time();
                // Cancelling a blocked read is safe: anything Redis delivered
                // to it meanwhile stays pending for this consumer and is read
                // at the next start or claimed by another persister.
                tokio::select! {
                    read = self.read(">".into(), Some(block)) => read?,
                    _ = shutdown.cancelled() => return Ok(0),
                }
            }
        };
        self.drained = entries.len() < self.settings.batch_size;
        if !self.drained && !self.shutdown.is_cancelled() {
            self.start_read_ahead();
        }
        self.handle(entries).await
    }

    /// The block time of a read of new entries: the setting, or less when a
    /// retry falls due sooner (at least 1 ms: 0 would block forever).
    fn block_time(&self) -> Duration {
        let until_retry = self
            .retries
            .next_due()
            .map(|at| at.saturating_duration_since(Instant::now()));
        until_retry
            .map_or(self.settings.block, |d| d.min(self.settings.block))
            .max(Duration::from_millis(1))
    }

    /// Makes sure the consumer group exists. Asked first with `XINFO
    /// GROUPS`, which Redis answers at `maxmemory`: `XGROUP CREATE` is
    /// refused there even when the group exists, and a persister started
    /// while Redis is full must still get to the acks and deletes that free
    /// it.
    async fn create_group(&mut self) -> Result<(), WorkerError> {
        let groups: Result<redis::streams::StreamInfoGroupsReply, RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(STREAM)
            .query_async(&mut self.redis.commands)
            .await;
        if groups.is_ok_and(|reply| reply.groups.iter().any(|g| g.name == GROUP)) {
            return Ok(());
        }
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

    fn read_cmd(&self, id: &str, block: Option<Duration>) -> redis::Cmd {
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
        cmd
    }

    async fn read(&mut self, id: String, block: Option<Duration>) -> Result<Vec<Entry>, WorkerError> {
        let value: Value = self.read_cmd(&id, block).query_async(&mut self.redis.reader).await?;
        Ok(reply::read_group(value)?)
    }

    /// Reads the next batch of new entries in the background, without
    /// blocking, while the current one is written.
    fn start_read_ahead(&mut self) {
        let cmd = self.read_cmd(">", None);
        let mut reader = self.redis.reader.clone();
        self.read_ahead = Some(tokio::spawn(async move {
            let value: Value = cmd.query_async(&mut reader).await?;
            Ok(reply::read_group(value)?)
        }));
    }

    /// Delivers these pending entries to this consumer again (XCLAIM with
    /// no idle minimum, which counts a delivery). Ids no longer pending
    /// (stored or dead-lettered by someone else) are not returned.
    ///
    /// Nor are ids whose entries were deleted from the stream while pending:
    /// XCLAIM drops them from the pending list without a word. So the same
    /// transaction first reads each id's pending row and whether its entry
    /// exists; one that was pending, is gone and was not returned becomes a
    /// `deleted` dead letter with the delivery count it had. One not pending
    /// any more was stored (or dead-lettered) by another consumer: nothing
    /// to do. An entry that exists is never taken for deleted.
    async fn reclaim(&mut self, ids: &[String]) -> Result<Vec<Entry>, WorkerError> {
        let mut transaction = redis::pipe();
        transaction.atomic();
        for id in ids {
            transaction
                .cmd("XPENDING")
                .arg(STREAM)
                .arg(GROUP)
                .arg(id)
                .arg(id)
                .arg(1);
            transaction.cmd("XRANGE").arg(STREAM).arg(id).arg(id);
        }
        transaction
            .cmd("XCLAIM")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&self.settings.consumer)
            .arg(0)
            .arg(ids);
        let replies: Vec<Value> = transaction.query_async(&mut self.redis.commands).await?;
        let reclaimed = reply::reclaim(replies)?;
        tracing::debug!(
            asked = ids.len(),
            got = reclaimed.entries.len(),
            deleted = reclaimed.deleted.len(),
            "retrying refused entries"
        );
        self.deleted.extend(
            reclaimed
                .deleted
                .into_iter()
                .map(|row| Failed::deleted(row.id).letter(Some(row.deliveries))),
        );
        self.try_write_deleted().await;
        Ok(reclaimed.entries)
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
        // Pending entries deleted from the stream: Redis dropped them from
        // the pending list, their delivery counts with them, and told only
        // this call.
        self.deleted
            .extend(claimed.deleted.into_iter().map(|id| Failed::deleted(id).letter(None)));
        self.try_write_deleted().await;
        Ok(claimed.entries)
    }

    /// `write_deleted`, which must not hold up storing and acking: a Redis
    /// at `maxmemory` refuses the XADD to `chat:dead` but still takes the
    /// acks and deletes that free its memory. What is not written stays for
    /// the next step; the first failure is logged, and the recovery.
    async fn try_write_deleted(&mut self) {
        if self.deleted.is_empty() {
            return;
        }
        match self.write_deleted().await {
            Ok(()) if self.deleted_failing => {
                self.deleted_failing = false;
                tracing::info!("the letters of entries deleted while pending are in {DEAD_LETTERS} now");
            }
            Ok(()) => {}
            Err(e) => {
                metrics::counter!("persister_dead_letter_failures_total").increment(1);
                if !self.deleted_failing {
                    self.deleted_failing = true;
                    tracing::warn!(
                        error = %e,
                        letters = self.deleted.len(),
                        "could not write the letters of entries deleted while pending to {DEAD_LETTERS}; kept and tried at every step"
                    );
                }
            }
        }
    }

    /// Writes the letters of `self.deleted` to `chat:dead`, oldest first; on
    /// an error the rest stay for the next try.
    async fn write_deleted(&mut self) -> Result<(), WorkerError> {
        while let Some(letter) = self.deleted.front() {
            let dead_id = dead::add(&mut self.redis.commands, letter).await?;
            dead_lettered(letter, &dead_id);
            self.deleted.pop_front();
        }
        Ok(())
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
        let mut invalid = Vec::new();
        for entry in entries {
            match parse(entry) {
                Ok((id, job)) => {
                    ids.push(id);
                    jobs.push(job);
                }
                Err(letter) => invalid.push(letter),
            }
        }

        let outcome = write_isolating(&self.store, &jobs).await;
        if !outcome.stored.is_empty() {
            let stored: Vec<&str> = outcome.stored.iter().map(|&i| ids[i].as_str()).collect();
            self.ack(&stored).await?;
            if !self.retries.is_empty() {
                for id in &stored {
                    self.retries.remove(id);
                }
            }
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

        // Refused and invalid entries: decide from their delivery counts.
        let mut failed: Vec<Failed> = invalid;
        for (i, e) in &outcome.rejected {
            failed.push(Failed {
                id: ids[*i].clone(),
                class: "refused",
                reason: e.to_string(),
                retryable: true,
            });
        }
        if !failed.is_empty() {
            let ids: Vec<&str> = failed.iter().map(|f| f.id.as_str()).collect();
            let deliveries = self.delivery_counts(&ids).await?;
            for f in failed {
                self.settle(f, &deliveries).await?;
            }
        }
        tracing::debug!(
            read = count,
            stored = outcome.stored.len(),
            refused = outcome.rejected.len(),
            "handled a batch"
        );
        match outcome.failed {
            Some(e) => Err(e.into()),
            None => Ok(count),
        }
    }

    /// Retries or dead-letters one refused or invalid entry.
    async fn settle(&mut self, failed: Failed, deliveries: &HashMap<String, u64>) -> Result<(), WorkerError> {
        let Some(&count) = deliveries.get(&failed.id) else {
            // Not pending any more: another persister stored or dead-lettered it.
            self.retries.remove(&failed.id);
            tracing::debug!(id = %failed.id, "a refused entry is no longer pending");
            return Ok(());
        };
        match decide(&self.settings.retry, failed.retryable, count) {
            Verdict::Retry(wait) => {
                metrics::counter!("persister_retries_total").increment(1);
                tracing::warn!(
                    id = %failed.id,
                    deliveries = count,
                    max_deliveries = self.settings.retry.max_deliveries,
                    retry_in_ms = wait.as_millis() as u64,
                    error = without_row(&failed.reason),
                    "PostgreSQL refused this entry; retrying it"
                );
                self.retries.insert(failed.id, Instant::now() + wait);
            }
            Verdict::DeadLetter => {
                self.retries.remove(&failed.id);
                let letter = failed.into_letter(count);
                match dead::move_to_dead(&mut self.redis.commands, &letter).await {
                    Ok(Some(dead_id)) => dead_lettered(&letter, &dead_id),
                    Ok(None) => tracing::debug!(id = %letter.source_id, "already stored or dead-lettered elsewhere"),
                    // The entry stays pending and is tried again later, and
                    // the lane goes on: failing the batch would read this
                    // entry first again, and again, and store nothing else.
                    Err(e) => {
                        metrics::counter!("persister_dead_letter_failures_total").increment(1);
                        let wait = self.settings.retry.move_retry_delay(count);
                        tracing::error!(
                            id = %letter.source_id,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "could not move this entry to the dead letters; it stays pending and is tried again"
                        );
                        self.retries.insert(letter.source_id, Instant::now() + wait);
                    }
                }
            }
        }
        Ok(())
    }

    /// The delivery count of each id still pending in the group (XPENDING
    /// with a one-id range, pipelined); ids not pending are absent.
    async fn delivery_counts(&mut self, ids: &[&str]) -> Result<HashMap<String, u64>, WorkerError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("XPENDING").arg(STREAM).arg(GROUP).arg(*id).arg(*id).arg(1);
        }
        let replies: Vec<Value> = pipe.query_async(&mut self.redis.commands).await?;
        let mut counts = HashMap::with_capacity(ids.len());
        for value in replies {
            for row in reply::pending_entries(value)? {
                counts.insert(row.id, row.deliveries);
            }
        }
        Ok(counts)
    }

    async fn ack(&mut self, ids: &[&str]) -> Result<(), WorkerError> {
        let acked = redis::pipe()
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
            .await;
        match acked {
            // A Redis at `maxmemory` queues no command inside MULTI, not
            // even these two, which free memory and which it runs alone or
            // from a script: the same two, as atomic, from a script.
            Err(e) if matches!(e.code(), Some("OOM" | "EXECABORT")) => {
                for chunk in ids.chunks(ACK_SCRIPT_IDS) {
                    ACK_AND_DELETE
                        .key(STREAM)
                        .arg(GROUP)
                        .arg(chunk)
                        .invoke_async::<i64>(&mut self.redis.commands)
                        .await?;
                }
            }
            done => done?,
        }
        Ok(())
    }
}

/// Counts and logs a letter just written to `chat:dead`.
fn dead_lettered(letter: &DeadLetter, dead_id: &str) {
    metrics::counter!("persister_dead_letters_total", "reason" => letter.class.clone()).increment(1);
    tracing::warn!(
        id = %letter.source_id,
        dead_id = %dead_id,
        class = %letter.class,
        deliveries = letter.deliveries,
        reason = without_row(&letter.reason),
        "moved an entry to the dead-letter stream {DEAD_LETTERS}"
    );
}

/// An error text for the logs: PostgreSQL's "Failing row contains (...)"
/// detail would copy a message body into them, so it is cut (the dead
/// letter keeps the full text).
fn without_row(reason: &str) -> &str {
    match reason.find(" DETAIL: Failing row contains") {
        Some(at) => &reason[..at],
        None => reason,
    }
}

/// Whether an entry that failed at its `deliveries`-th delivery is tried
/// again: an entry that is not a job never will be.
fn decide(policy: &RetryPolicy, retryable: bool, deliveries: u64) -> Verdict {
    if retryable {
        policy.verdict(deliveries)
    } else {
        Verdict::DeadLetter
    }
}

/// What `/metrics` shows about the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueStats {
    /// Entries delivered to some persister and not yet acked (XPENDING).
    pub pending: u64,
    /// Entries in the stream: not yet stored, delivered or not (XLEN).
    pub length: u64,
    /// Age of the oldest entry in the stream, by the Redis clock (0 when empty).
    pub oldest_age: Duration,
}

/// Reads the queue's lag in one round trip: XPENDING (summary), XLEN, the
/// first entry's id (XRANGE - + COUNT 1) and the Redis clock (TIME).
///
/// The age is that of the first entry in the stream rather than of the
/// first pending one: entries are deleted once stored, so the first entry is
/// the oldest job not yet stored, whether or not a persister has read it.
pub async fn queue_stats(commands: &mut ConnectionManager) -> Result<QueueStats, WorkerError> {
    let (summary, length, first, time): (Value, u64, Value, Value) = redis::pipe()
        .cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .cmd("XLEN")
        .arg(STREAM)
        .cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("TIME")
        .query_async(commands)
        .await?;
    let pending = reply::pending_count(summary)?;
    let first = reply::range(first)?;
    let now_ms = reply::time_millis(time)?;
    Ok(QueueStats {
        pending,
        length,
        oldest_age: oldest_age(now_ms, first.first().map(|e| e.id.as_str())),
    })
}

/// `now_ms` minus the milliseconds part of `first_id`; zero without an
/// entry or when the id is from the future (clock stepped back).
fn oldest_age(now_ms: u64, first_id: Option<&str>) -> Duration {
    first_id
        .and_then(stream_id_millis)
        .map_or(Duration::ZERO, |ms| Duration::from_millis(now_ms.saturating_sub(ms)))
}

/// An entry that was not stored and will not be retried as part of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    id: String,
    /// The metrics label and dead letter `class`: a fixed word.
    class: &'static str,
    /// The full message, stored in the dead letter's `reason` field.
    reason: String,
    /// PostgreSQL refused it (retry up to the limit); otherwise it is not a
    /// job and never will be.
    retryable: bool,
}

impl Failed {
    /// An entry deleted from the stream while pending: its fields are gone.
    fn deleted(id: String) -> Failed {
        Failed {
            id,
            class: "deleted",
            reason: "the entry was deleted from the stream while pending".into(),
            retryable: false,
        }
    }

    fn into_letter(self, deliveries: u64) -> DeadLetter {
        self.letter(Some(deliveries))
    }

    /// Its dead letter; `deliveries` is `None` when the count is unknown
    /// (Redis dropped it with the pending entry).
    fn letter(self, deliveries: Option<u64>) -> DeadLetter {
        DeadLetter {
            id: String::new(),
            reason: self.reason,
            class: self.class.to_string(),
            source_id: self.id,
            deliveries,
            // The dead-letter script copies them from the queue (`deleted`
            // entries have none).
            fields: Vec::new(),
        }
    }
}

/// An entry as a job, or as an entry that is not one.
fn parse(entry: Entry) -> Result<(String, Job), Failed> {
    let Some(fields) = entry.fields else {
        return Err(Failed::deleted(entry.id));
    };
    let mut fields = fields;
    if let Some(job) = message_fast(&mut fields) {
        return Ok((entry.id, job));
    }
    let map = fields.into_iter().collect();
    match Job::from_fields(&map) {
        Ok(job) => Ok((entry.id, job)),
        Err(e) => Err(Failed {
            id: entry.id,
            class: match e {
                JobError::Version(_) => "version",
                JobError::Missing(_) => "missing",
                JobError::Invalid { .. } => "invalid",
                JobError::Kind(_) => "kind",
            },
            reason: e.to_string(),
            retryable: false,
        }),
    }
}

/// The common case without building a map: a well-formed version-1 message
/// job (the body is moved, not copied). `None` for anything else (another
/// kind, a missing, repeated or malformed field), which then goes through
/// `Job::from_fields`, the reference parser, which also names the error.
/// Where it returns a job, it is the job `Job::from_fields` returns (tested).
fn message_fast(fields: &mut [(String, Vec<u8>)]) -> Option<Job> {
    const NAMES: [&str; 9] = ["v", "kind", "id", "chat", "seq", "from", "to", "body", "ts"];
    let mut at = [usize::MAX; 9];
    for (i, (name, _)) in fields.iter().enumerate() {
        if let Some(slot) = NAMES.iter().position(|n| n == name) {
            if at[slot] != usize::MAX {
                return None; // repeated: the reference parser decides
            }
            at[slot] = i;
        }
    }
    if at.contains(&usize::MAX) {
        return None;
    }
    let text = |slot: usize| std::str::from_utf8(&fields[at[slot]].1).ok();
    if text(0)? != shared::queue::FORMAT_VERSION || text(1)? != "message" {
        return None;
    }
    let to = match text(6)? {
        "" => None,
        t => Some(t.parse().ok()?),
    };
    let (id, chat, seq, from, ts) = (
        text(2)?.parse().ok()?,
        text(3)?.parse().ok()?,
        text(4)?.parse().ok()?,
        text(5)?.parse().ok()?,
        text(8)?.parse().ok()?,
    );
    text(7)?;
    let body = String::from_utf8(std::mem::take(&mut fields[at[7]].1)).ok()?;
    Some(Job::Message(shared::protocol::Message {
        id,
        chat,
        seq,
        from,
        to,
        body,
        ts,
    }))
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
