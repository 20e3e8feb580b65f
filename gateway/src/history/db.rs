//! History queries on PostgreSQL (the persister writes the rows).
//!
//! Owns the SQL only. This is an HTTP-path module: the WebSocket path never
//! calls it.

use deadpool_postgres::Pool;
use shared::ids::ChatId;
use shared::protocol::Message;

use super::{HistoryError, Window};

#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    pub fn new(pool: Pool) -> Db {
        Db { pool }
    }

    /// The last messages of `chat` before `w.before` (or the latest), oldest
    /// first. For windows without `after`.
    pub async fn read_last(&self, chat: ChatId, w: Window) -> Result<Vec<Message>, HistoryError> {
        let before = w.before.unwrap_or(i64::MAX);
        self.query(
            "SELECT * FROM (SELECT id, chat, seq, sender, recipient, body, ts FROM messages \
             WHERE chat = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3) page ORDER BY seq ASC",
            &[&chat, &before, &w.limit],
        )
        .await
    }

    /// The first messages of `chat` after `w.after` (and before `w.before`),
    /// oldest first.
    pub async fn read_after(&self, chat: ChatId, after: i64, w: Window) -> Result<Vec<Message>, HistoryError> {
        let before = w.before.unwrap_or(i64::MAX);
        self.query(
            "SELECT id, chat, seq, sender, recipient, body, ts FROM messages \
             WHERE chat = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4",
            &[&chat, &after, &before, &w.limit],
        )
        .await
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Message>, HistoryError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let rows = client
            .query(&stmt, params)
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        Ok(rows
            .iter()
            .map(|r| Message {
                id: r.get(0),
                chat: r.get(1),
                seq: r.get(2),
                from: r.get(3),
                to: r.get(4),
                body: r.get(5),
                ts: r.get(6),
            })
            .collect())
    }

    /// The position (`seq`) and `ts` of a stored message in `chat`.
    pub async fn position_of(&self, chat: ChatId, id: uuid::Uuid) -> Result<Option<(i64, i64)>, HistoryError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let row = client
            .query_opt(
                "SELECT seq, ts FROM messages WHERE chat = $1 AND id = $2",
                &[&chat, &id],
            )
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}
