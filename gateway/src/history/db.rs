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

    /// The messages of `chat` in `window`, oldest first: the first ones after
    /// `after`, else the last ones before `before`, else the latest.
    pub async fn read(&self, chat: ChatId, w: Window) -> Result<Vec<Message>, HistoryError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let after = w.after.unwrap_or(i64::MIN);
        let before = w.before.unwrap_or(i64::MAX);
        let sql = if w.after.is_some() {
            "SELECT id, chat, seq, sender, recipient, body, ts FROM messages \
             WHERE chat = $1 AND seq > $2 AND seq < $3 ORDER BY seq ASC LIMIT $4"
        } else {
            "SELECT * FROM (SELECT id, chat, seq, sender, recipient, body, ts FROM messages \
             WHERE chat = $1 AND seq > $2 AND seq < $3 ORDER BY seq DESC LIMIT $4) page ORDER BY seq ASC"
        };
        let stmt = client
            .prepare_cached(sql)
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let rows = client
            .query(&stmt, &[&chat, &after, &before, &w.limit])
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

    /// The position of a stored message in `chat`.
    pub async fn seq_of(&self, chat: ChatId, id: uuid::Uuid) -> Result<Option<i64>, HistoryError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        let row = client
            .query_opt("SELECT seq FROM messages WHERE chat = $1 AND id = $2", &[&chat, &id])
            .await
            .map_err(|e| HistoryError::Unavailable(e.to_string()))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn ping(&self) -> bool {
        match self.pool.get().await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    }
}
