//! Writes a batch of jobs to PostgreSQL in one transaction.
//!
//! Owns the connection pool and the three INSERT statements. Every write is
//! idempotent, because the queue delivers at least once: messages and chats
//! are inserted with `ON CONFLICT (id) DO NOTHING`, memberships are upserted
//! keeping the highest `version`. Rows are passed as arrays and expanded with
//! `UNNEST`, one statement per table per batch. This module knows nothing of
//! Redis and never decides what is acknowledged: it only says whether a batch
//! was committed and, when not, whether the data itself was refused
//! (`StoreError::is_data_error`) or PostgreSQL could not be reached.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use shared::queue::Job;
use tokio_postgres::NoTls;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("no PostgreSQL connection: {}", chain(.0))]
    Pool(#[from] PoolError),
    #[error("PostgreSQL: {}", chain(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// An error with its causes, on one line: tokio-postgres says only "db
/// error" or "error connecting to server" and keeps the server's message
/// (with a DETAIL line) in its source.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

impl StoreError {
    /// True when PostgreSQL refused the rows themselves (SQLSTATE classes 22
    /// "data exception" and 23 "integrity constraint violation", e.g. a NUL
    /// byte in a body or a second message at a taken (chat, seq)): retrying
    /// the same batch cannot succeed, but a batch without the bad row can.
    /// Everything else (connection lost, server shutting down, missing table)
    /// is worth retrying unchanged.
    pub fn is_data_error(&self) -> bool {
        match self {
            StoreError::Db(e) => e
                .code()
                .is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23")),
            StoreError::Config(_) | StoreError::Pool(_) => false,
        }
    }
}

/// The PostgreSQL side of the persister.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Builds the pool; connects lazily, so PostgreSQL may be down at start.
    pub fn new(database_url: &str, max_connections: usize) -> Result<Store, StoreError> {
        let mut pg = tokio_postgres::Config::from_str(database_url).map_err(|e| StoreError::Config(e.to_string()))?;
        // Notice a vanished server within about a minute instead of hours.
        pg.connect_timeout(Duration::from_secs(5))
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        if pg.get_application_name().is_none() {
            pg.application_name("persister");
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                // A connection broken by a server restart reports is_closed()
                // and is replaced on checkout.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| StoreError::Config(e.to_string()))?;
        Ok(Store { pool })
    }

    /// Stores `jobs` in one transaction; on error nothing was stored.
    pub async fn write(&self, jobs: &[Job]) -> Result<(), StoreError> {
        let rows = Rows::from_jobs(jobs);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        if !rows.messages.id.is_empty() {
            let m = &rows.messages;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO messages (id, chat, seq, sender, recipient, body, ts)
                     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::uuid[],
                                          $5::uuid[], $6::text[], $7::int8[])
                     ON CONFLICT (id) DO NOTHING",
                )
                .await?;
            tx.execute(
                &stmt,
                &[&m.id, &m.chat, &m.seq, &m.sender, &m.recipient, &m.body, &m.ts],
            )
            .await?;
        }
        if !rows.chats.id.is_empty() {
            let c = &rows.chats;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO chats (id, kind, title, visibility, created_by, created_at)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[],
                                          $5::uuid[], $6::int8[])
                     ON CONFLICT (id) DO NOTHING",
                )
                .await?;
            tx.execute(
                &stmt,
                &[&c.id, &c.kind, &c.title, &c.visibility, &c.created_by, &c.created_at],
            )
            .await?;
        }
        if !rows.members.chat.is_empty() {
            let m = &rows.members;
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO chat_members (chat, user_id, active, version, updated_at)
                     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bool[], $4::int8[],
                                          $5::int8[])
                     ON CONFLICT (chat, user_id) DO UPDATE
                        SET active = EXCLUDED.active,
                            version = EXCLUDED.version,
                            updated_at = EXCLUDED.updated_at
                      WHERE chat_members.version < EXCLUDED.version",
                )
                .await?;
            tx.execute(&stmt, &[&m.chat, &m.user, &m.active, &m.version, &m.updated_at])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// A batch as column arrays, with the duplicates one INSERT cannot take
/// removed: PostgreSQL refuses to let one `ON CONFLICT` statement touch the
/// same row twice ("cannot affect row a second time").
#[derive(Debug, Default, PartialEq)]
pub struct Rows {
    pub messages: MessageRows,
    pub chats: ChatRows,
    pub members: MemberRows,
}

#[derive(Debug, Default, PartialEq)]
pub struct MessageRows {
    pub id: Vec<Uuid>,
    pub chat: Vec<Uuid>,
    pub seq: Vec<i64>,
    pub sender: Vec<Uuid>,
    pub recipient: Vec<Option<Uuid>>,
    pub body: Vec<String>,
    pub ts: Vec<i64>,
}

#[derive(Debug, Default, PartialEq)]
pub struct ChatRows {
    pub id: Vec<Uuid>,
    pub kind: Vec<&'static str>,
    pub title: Vec<String>,
    pub visibility: Vec<String>,
    pub created_by: Vec<Uuid>,
    pub created_at: Vec<i64>,
}

#[derive(Debug, Default, PartialEq)]
pub struct MemberRows {
    pub chat: Vec<Uuid>,
    pub user: Vec<Uuid>,
    pub active: Vec<bool>,
    pub version: Vec<i64>,
    pub updated_at: Vec<i64>,
}

impl Rows {
    /// Messages and chats: the first job with an id wins (a later one is a
    /// redelivery, and the stored row would not change anyway). Memberships:
    /// per (chat, user) the highest `version` wins, the first on a tie.
    pub fn from_jobs(jobs: &[Job]) -> Rows {
        let mut rows = Rows::default();
        let mut message_ids = HashSet::new();
        let mut chat_ids = HashSet::new();
        let mut member_at: HashMap<(Uuid, Uuid), usize> = HashMap::new();
        for job in jobs {
            match job {
                Job::Message(m) => {
                    if message_ids.insert(m.id) {
                        let r = &mut rows.messages;
                        r.id.push(m.id);
                        r.chat.push(m.chat);
                        r.seq.push(m.seq);
                        r.sender.push(m.from);
                        r.recipient.push(m.to);
                        r.body.push(m.body.clone());
                        r.ts.push(m.ts);
                    }
                }
                Job::Chat {
                    chat,
                    kind,
                    title,
                    visibility,
                    created_by,
                    ts,
                } => {
                    if chat_ids.insert(*chat) {
                        let r = &mut rows.chats;
                        r.id.push(*chat);
                        r.kind.push(kind.as_str());
                        r.title.push(title.clone());
                        r.visibility.push(visibility.clone());
                        r.created_by.push(*created_by);
                        r.created_at.push(*ts);
                    }
                }
                Job::Member {
                    chat,
                    user,
                    active,
                    version,
                    ts,
                } => {
                    let r = &mut rows.members;
                    match member_at.entry((*chat, *user)) {
                        Entry::Occupied(at) => {
                            let i = *at.get();
                            if *version > r.version[i] {
                                r.active[i] = *active;
                                r.version[i] = *version;
                                r.updated_at[i] = *ts;
                            }
                        }
                        Entry::Vacant(slot) => {
                            slot.insert(r.chat.len());
                            r.chat.push(*chat);
                            r.user.push(*user);
                            r.active.push(*active);
                            r.version.push(*version);
                            r.updated_at.push(*ts);
                        }
                    }
                }
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::Message;
    use shared::queue::ChatKind;

    fn message(id: Uuid, seq: i64, body: &str) -> Job {
        Job::Message(Message {
            id,
            chat: Uuid::from_u128(1),
            seq,
            from: Uuid::from_u128(2),
            to: None,
            body: body.into(),
            ts: 10,
        })
    }

    fn member(user: u128, version: i64, active: bool) -> Job {
        Job::Member {
            chat: Uuid::from_u128(1),
            user: Uuid::from_u128(user),
            active,
            version,
            ts: version * 100,
        }
    }

    #[test]
    fn a_message_delivered_twice_in_one_batch_is_one_row() {
        let (a, b) = (Uuid::from_u128(10), Uuid::from_u128(11));
        let rows = Rows::from_jobs(&[message(a, 1, "x"), message(b, 2, "y"), message(a, 1, "x")]);
        assert_eq!(rows.messages.id, vec![a, b]);
        assert_eq!(rows.messages.body, vec!["x", "y"]);
        assert_eq!(rows.messages.recipient, vec![None, None]);
    }

    #[test]
    fn a_chat_created_twice_in_one_batch_is_one_row() {
        let chat = |title: &str| Job::Chat {
            chat: Uuid::from_u128(5),
            kind: ChatKind::Group,
            title: title.into(),
            visibility: "public".into(),
            created_by: Uuid::from_u128(2),
            ts: 1,
        };
        let rows = Rows::from_jobs(&[chat("first"), chat("second")]);
        assert_eq!(rows.chats.id, vec![Uuid::from_u128(5)]);
        assert_eq!(rows.chats.title, vec!["first"]);
        assert_eq!(rows.chats.kind, vec!["group"]);
    }

    #[test]
    fn membership_keeps_the_highest_version_whatever_the_order() {
        let rows = Rows::from_jobs(&[
            member(7, 2, false),
            member(8, 1, true),
            member(7, 3, true),
            member(7, 1, true),
            member(7, 3, false),
        ]);
        let m = &rows.members;
        assert_eq!(m.user, vec![Uuid::from_u128(7), Uuid::from_u128(8)]);
        assert_eq!(m.version, vec![3, 1]);
        // On a tie the first one seen stays.
        assert_eq!(m.active, vec![true, true]);
        assert_eq!(m.updated_at, vec![300, 100]);
    }

    #[test]
    fn an_empty_batch_has_no_rows() {
        assert_eq!(Rows::from_jobs(&[]), Rows::default());
    }
}
