//! History: `GET /v1/chats/{chat}/messages`, from the recent-message cache
//! when it holds the window, else from PostgreSQL.
//!
//! `cache` (Redis) answers windows it can prove complete; a miss reads
//! PostgreSQL (`db`) and refills the cache with the chat's latest messages.
//! Identical concurrent PostgreSQL reads on one node share one query, and one
//! refill per chat runs at a time, so a cold cache does not stampede the
//! database. Either way a message is given with the same fields and in the
//! same order. The cache holds a message from its ack on; PostgreSQL once it
//! is stored, so a window after a cursor read from it stops before a message
//! still in the queue (`holes`) rather than pass it.
//! Access is checked by the caller before anything is read.

pub mod cache;
pub mod db;
pub mod holes;

use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use shared::ids::ChatId;
use shared::protocol::{ErrorCode, Message};

use cache::{Lookup, RecentCache};
use db::Db;
use holes::{QueueHead, QueueView, Settled};

use crate::queue::Queue;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A window between two messages holds a message still on its way to
    /// PostgreSQL (`holes`).
    #[error("a message between `after` and `before` is still on its way to storage; retry")]
    Pending,
}

impl HistoryError {
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Unavailable
    }
}

/// A window of a chat, by position (`seq`); cursor ids are resolved to
/// positions by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    /// Only messages after this position; the first `limit` of them.
    pub after: Option<i64>,
    /// Only messages before this position; the last `limit` of them unless
    /// `after` is set.
    pub before: Option<i64>,
    /// The `ts` of the message at `before`: with `after` set, a hole just
    /// before it is judged by it (`holes`).
    pub before_ts: Option<i64>,
    pub limit: i64,
}

type DbRead = Shared<BoxFuture<'static, Result<Arc<Vec<Message>>, HistoryError>>>;

#[derive(Clone)]
pub struct History {
    db: Db,
    cache: RecentCache,
    /// Asked what has left the queue, for the holes of a window (`holes`).
    queue: Queue,
    /// PostgreSQL reads in flight, shared by identical requests.
    reads: Arc<DashMap<(ChatId, Window), DbRead>>,
    /// Chats being refilled.
    refills: Arc<DashMap<ChatId, ()>>,
}

impl History {
    pub fn new(db: Db, cache: RecentCache, queue: Queue) -> History {
        History {
            db,
            cache,
            queue,
            reads: Arc::new(DashMap::new()),
            refills: Arc::new(DashMap::new()),
        }
    }

    /// The messages of `chat` in `window`, oldest first.
    pub async fn read(&self, chat: ChatId, window: Window) -> Result<Arc<Vec<Message>>, HistoryError> {
        let lookup = match self.cache.read(chat, window).await {
            Ok(Lookup::Hit(messages)) => {
                metrics::counter!("gateway_history_reads_total", "source" => "cache").increment(1);
                return Ok(Arc::new(messages));
            }
            Ok(lookup) => lookup,
            Err(e) => {
                tracing::debug!(error = %e, "cache unavailable; reading PostgreSQL");
                Lookup::Outside
            }
        };
        metrics::counter!("gateway_history_reads_total", "source" => "db").increment(1);
        let messages = self.read_db(chat, window).await?;
        // Refill a cold cache, or a partial one that could not give the
        // latest page; paging through older history does not refill.
        let latest_page = window.after.is_none() && window.before.is_none();
        if self.cache.enabled() && (lookup == Lookup::Cold || latest_page) {
            self.refill(chat).await;
        }
        Ok(messages)
    }

    /// The position (`seq`) and `ts` of a stored message in `chat`, if
    /// PostgreSQL has it.
    pub async fn position_of(&self, chat: ChatId, id: uuid::Uuid) -> Result<Option<(i64, i64)>, HistoryError> {
        self.db.position_of(chat, id).await
    }

    pub async fn ping(&self) -> bool {
        self.db.ping().await
    }

    /// One PostgreSQL query per distinct (chat, window) at a time.
    async fn read_db(&self, chat: ChatId, window: Window) -> Result<Arc<Vec<Message>>, HistoryError> {
        let key = (chat, window);
        let read = self
            .reads
            .entry(key)
            .or_insert_with(|| {
                let (db, reads, queue) = (self.db.clone(), self.reads.clone(), self.queue.clone());
                // A task, so the query finishes and leaves the map even if
                // every waiting request goes away.
                let task = tokio::spawn(async move {
                    metrics::counter!("gateway_history_db_queries_total").increment(1);
                    let result = match window.after {
                        Some(after) => read_after(&db, &queue, chat, after, window).await,
                        None => db.read_last(chat, window).await,
                    };
                    reads.remove(&key);
                    result.map(Arc::new)
                });
                async move { task.await.map_err(|e| HistoryError::Unavailable(e.to_string()))? }
                    .boxed()
                    .shared()
            })
            .clone();
        read.await
    }

    /// Loads the chat's latest messages into the cache, once at a time per chat.
    async fn refill(&self, chat: ChatId) {
        let this = self.clone();
        refill_once(&self.refills, chat, async move {
            let size = this.cache.size as i64;
            let window = Window {
                after: None,
                before: None,
                before_ts: None,
                limit: size,
            };
            match this.read_db(chat, window).await {
                Ok(latest) => {
                    if let Err(e) = this.cache.fill(chat, &latest).await {
                        tracing::debug!(error = %e, "cache refill failed");
                    }
                    metrics::counter!("gateway_cache_refills_total").increment(1);
                }
                Err(e) => tracing::debug!(error = %e, "cache refill read failed"),
            }
        })
        .await
    }
}

/// A window after a cursor from PostgreSQL, up to a hole a message still
/// in the queue will fill (`holes`).
async fn read_after(
    db: &Db,
    queue: &Queue,
    chat: ChatId,
    after: i64,
    window: Window,
) -> Result<Vec<Message>, HistoryError> {
    // The queue before the rows: a message stored (and gone from the queue)
    // in between is in the rows.
    let view = match queue.holes_of(chat).await {
        Ok((since_ms, jump)) => QueueView {
            head: QueueHead::Since(since_ms),
            jump,
        },
        Err(_) => QueueView {
            head: QueueHead::Unknown,
            jump: None,
        },
    };
    let rows = db.read_after(chat, after, window).await?;
    let limit = usize::try_from(window.limit).unwrap_or(usize::MAX);
    let before = window.before.zip(window.before_ts);
    match holes::settle(after, before, limit, rows, &view) {
        Settled::Whole(messages) => Ok(messages),
        Settled::Ended(messages) => {
            metrics::counter!("gateway_history_holes_total", "outcome" => "ended").increment(1);
            Ok(messages)
        }
        Settled::Pending => {
            metrics::counter!("gateway_history_holes_total", "outcome" => "pending").increment(1);
            Err(HistoryError::Pending)
        }
    }
}

/// Runs `work` unless a refill of `chat` is already running on this node.
///
/// The work runs in a task of its own, like `read_db`'s queries: a reader
/// whose client goes away mid-refill drops this future, and the refill
/// still finishes. The chat's mark is a guard the task owns, so it is
/// removed however the task ends (done, panicked, or cancelled at shutdown);
/// a mark left behind would keep this node from ever refilling the chat.
async fn refill_once<F>(refills: &Arc<DashMap<ChatId, ()>>, chat: ChatId, work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(mark) = Refilling::claim(refills, chat) else {
        return;
    };
    let task = tokio::spawn(async move {
        let _mark = mark;
        work.await;
    });
    if let Err(e) = task.await {
        tracing::debug!(error = %e, "cache refill task failed");
    }
}

/// A chat marked in `History::refills`; dropping it removes the mark.
struct Refilling {
    refills: Arc<DashMap<ChatId, ()>>,
    chat: ChatId,
}

impl Refilling {
    /// Marks `chat`, unless it is marked already.
    fn claim(refills: &Arc<DashMap<ChatId, ()>>, chat: ChatId) -> Option<Refilling> {
        match refills.entry(chat) {
            dashmap::Entry::Occupied(_) => None,
            dashmap::Entry::Vacant(slot) => {
                slot.insert(());
                Some(Refilling {
                    refills: refills.clone(),
                    chat,
                })
            }
        }
    }
}

impl Drop for Refilling {
    fn drop(&mut self) {
        self.refills.remove(&self.chat);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refill_whose_reader_went_away_does_not_keep_its_chat_marked() {
        let refills = Arc::new(DashMap::new());
        let chat = uuid::Uuid::now_v7();
        let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let work = async move {
            let _ = started_tx.send(());
            let _ = finished.await;
        };
        // A reader starts a refill, which waits (on PostgreSQL, say)...
        let mut reader = Box::pin(refill_once(&refills, chat, work));
        tokio::select! {
            _ = &mut reader => panic!("the refill ended before it was let go"),
            _ = started => {}
        }
        // ...and its client disconnects: the handler's future is dropped.
        drop(reader);
        let _ = finish.send(());
        // The refill's end gives the chat back (it may finish in a task).
        for _ in 0..100 {
            if refills.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(refills.is_empty(), "the chat is still marked as being refilled");

        // A later read refills the chat again.
        let (ran_tx, ran) = tokio::sync::oneshot::channel();
        refill_once(&refills, chat, async move {
            let _ = ran_tx.send(());
        })
        .await;
        assert!(ran.await.is_ok(), "the next refill ran");
    }
}
