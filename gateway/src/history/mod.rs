//! History: `GET /v1/chats/{chat}/messages`, from the recent-message cache
//! when it holds the window, else from PostgreSQL.
//!
//! `cache` (Redis) answers windows it can prove complete; a miss reads
//! PostgreSQL (`db`) and refills the cache with the chat's latest messages.
//! Identical concurrent PostgreSQL reads on one node share one query, and one
//! refill per chat runs at a time, so a cold cache does not stampede the
//! database. Either way the answer is the same: same messages, order, fields.
//! Access is checked by the caller before anything is read.

pub mod cache;
pub mod db;

use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use shared::ids::ChatId;
use shared::protocol::{ErrorCode, Message};

use cache::{Lookup, RecentCache};
use db::Db;

pub const DEFAULT_LIMIT: i64 = 50;
pub const MAX_LIMIT: i64 = 500;

#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
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
    pub limit: i64,
}

type DbRead = Shared<BoxFuture<'static, Result<Arc<Vec<Message>>, HistoryError>>>;

#[derive(Clone)]
pub struct History {
    db: Db,
    cache: RecentCache,
    /// PostgreSQL reads in flight, shared by identical requests.
    reads: Arc<DashMap<(ChatId, Window), DbRead>>,
    /// Chats being refilled.
    refills: Arc<DashMap<ChatId, ()>>,
}

impl History {
    pub fn new(db: Db, cache: RecentCache) -> History {
        History {
            db,
            cache,
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

    /// The position of a stored message in `chat`, if PostgreSQL has it.
    pub async fn seq_of(&self, chat: ChatId, id: uuid::Uuid) -> Result<Option<i64>, HistoryError> {
        self.db.seq_of(chat, id).await
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
                let (db, reads) = (self.db.clone(), self.reads.clone());
                // A task, so the query finishes and leaves the map even if
                // every waiting request goes away.
                let task = tokio::spawn(async move {
                    metrics::counter!("gateway_history_db_queries_total").increment(1);
                    let result = db.read(chat, window).await.map(Arc::new);
                    reads.remove(&key);
                    result
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
        if self.refills.insert(chat, ()).is_some() {
            return;
        }
        let size = self.cache.size as i64;
        let window = Window {
            after: None,
            before: None,
            limit: size,
        };
        match self.read_db(chat, window).await {
            Ok(latest) => {
                let whole_chat = (latest.len() as i64) < size;
                if let Err(e) = self.cache.fill(chat, &latest, whole_chat).await {
                    tracing::debug!(error = %e, "cache refill failed");
                }
                metrics::counter!("gateway_cache_refills_total").increment(1);
            }
            Err(e) => tracing::debug!(error = %e, "cache refill read failed"),
        }
        self.refills.remove(&chat);
    }
}
