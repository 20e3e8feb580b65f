//! Writes a batch of jobs to PostgreSQL in one transaction.
//!
//! Owns the connection pool and the write statements. Every write is
//! idempotent, because the queue delivers at least once: messages and chats
//! are inserted with `ON CONFLICT (id) DO NOTHING` semantics (a message
//! whose id is stored for a different message is refused, not skipped),
//! memberships are upserted keeping the highest `version`. Messages, nearly all of the
//! volume, are sent with `COPY ... (FORMAT binary)`: first straight into
//! `messages`, which fails as a whole if one of them is stored already; then,
//! only in that case, into a temporary table (`messages_in`, one per
//! connection, emptied at each commit) moved with one `INSERT ... SELECT ...
//! ON CONFLICT (id) DO NOTHING`. Measured in docs/benchmarks-persister.md.
//! Chats and members are passed as arrays and expanded with `UNNEST`. This
//! module knows nothing of Redis and never decides what is acknowledged: it
//! only says whether a batch was committed and, when not, whether the data
//! itself was refused (`StoreError::is_data_error`) or PostgreSQL could not
//! be reached.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures_util::SinkExt;
use shared::queue::Job;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// The per-connection staging table of `COPY`: like `messages` without its
/// indexes, private to the session, emptied by every commit (and a rollback
/// discards what was copied).
const CREATE_STAGING: &str = "CREATE TEMPORARY TABLE IF NOT EXISTS messages_in
    (id uuid, chat uuid, seq int8, sender uuid, recipient uuid, body text, ts int8)
    ON COMMIT DELETE ROWS";
const COPY_MESSAGES_DIRECT: &str =
    "COPY messages (id, chat, seq, sender, recipient, body, ts) FROM STDIN (FORMAT binary)";
const COPY_MESSAGES: &str = "COPY messages_in (id, chat, seq, sender, recipient, body, ts) FROM STDIN (FORMAT binary)";
const INSERT_MESSAGES: &str = "INSERT INTO messages (id, chat, seq, sender, recipient, body, ts)
    SELECT id, chat, seq, sender, recipient, body, ts FROM messages_in
    ON CONFLICT (id) DO NOTHING";
/// A staged message whose id is stored for another message: another chat,
/// sender or body. `ON CONFLICT (id) DO NOTHING` took it for a redelivery;
/// it is a second message under a reused id (a client's own id, used again
/// once the gateway's idempotency record had expired or was lost), and
/// skipping it would drop an acked message without a trace. The same
/// message resent under its id after such a loss has a new seq but the same
/// chat, sender and body: that one is a duplicate, and stays skipped. Run
/// after the INSERT, in its transaction: the rows it added match themselves.
const TAKEN_IDS: &str = "SELECT i.id FROM messages_in i JOIN messages m ON m.id = i.id
    WHERE (m.chat, m.sender, m.body) IS DISTINCT FROM (i.chat, i.sender, i.body) LIMIT 1";
/// COPY data is sent in chunks of about this size.
const COPY_CHUNK: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("no PostgreSQL connection: {}", chain(.0))]
    Pool(#[from] PoolError),
    #[error("PostgreSQL: {}", chain(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("message id {0} is stored for another message (another chat, sender or body): the id was reused")]
    IdTaken(Uuid),
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
            // The batch without it can be stored; it never can.
            StoreError::IdTaken(_) => true,
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
            .post_create(Hook::async_fn(|client, _| {
                Box::pin(async move { client.batch_execute(CREATE_STAGING).await.map_err(HookError::Backend) })
            }))
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
    ///
    /// Messages are first COPied straight into `messages` (the fastest way:
    /// see docs/benchmarks-persister.md). That fails as a whole if one of
    /// them is stored already (a redelivery) or refused; the batch is then
    /// written again through the staging table with `ON CONFLICT (id) DO
    /// NOTHING`, which skips stored ids and is the authority on what is
    /// refused. Redeliveries are rare (a crash between commit and ack, a
    /// takeover, a replay), so nearly every batch takes one transaction.
    pub async fn write(&self, jobs: &[Job]) -> Result<(), StoreError> {
        // Two messages of one batch under one id: `from_jobs` keeps the
        // first, which for two different messages would drop the second.
        if let Some(id) = reused_id(jobs) {
            return Err(StoreError::IdTaken(id));
        }
        let rows = Rows::from_jobs(jobs);
        let mut client = self.pool.get().await?;
        if !rows.messages.id.is_empty() {
            match write_rows(&mut client, &rows, MessagePath::Direct).await {
                Err(e) if e.is_data_error() => {
                    metrics::counter!("persister_write_fallbacks_total").increment(1);
                    tracing::debug!(error = %e, "direct COPY refused; writing the batch idempotently");
                }
                done => return done,
            }
        }
        write_rows(&mut client, &rows, MessagePath::Staged).await
    }
}

/// How a transaction writes its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MessagePath {
    /// COPY straight into `messages`: fails whole on any stored id.
    Direct,
    /// COPY into the staging table, then INSERT ... ON CONFLICT (id) DO NOTHING.
    Staged,
}

/// One transaction: the messages (by `path`), chats and memberships.
async fn write_rows(
    client: &mut deadpool_postgres::Object,
    rows: &Rows<'_>,
    path: MessagePath,
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    if !rows.messages.id.is_empty() {
        let copy = match path {
            MessagePath::Direct => COPY_MESSAGES_DIRECT,
            MessagePath::Staged => COPY_MESSAGES,
        };
        let sink = tx.copy_in::<_, Bytes>(copy).await?;
        futures_util::pin_mut!(sink);
        let mut data = rows.messages.copy_binary();
        while data.len() > COPY_CHUNK {
            sink.send(data.split_to(COPY_CHUNK).freeze()).await?;
        }
        sink.send(data.freeze()).await?;
        sink.finish().await?;
        if path == MessagePath::Staged {
            let stmt = tx.prepare_cached(INSERT_MESSAGES).await?;
            tx.execute(&stmt, &[]).await?;
            let stmt = tx.prepare_cached(TAKEN_IDS).await?;
            if let Some(row) = tx.query_opt(&stmt, &[]).await? {
                return Err(StoreError::IdTaken(row.get(0)));
            }
        }
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

/// The id of a message in `jobs` that another message of `jobs` (another
/// chat, sender or body) also has; the same message twice (a redelivery) is
/// not one. The `TAKEN_IDS` rule, within a batch.
fn reused_id(jobs: &[Job]) -> Option<Uuid> {
    let mut seen: HashMap<Uuid, (Uuid, Uuid, &str)> = HashMap::new();
    for job in jobs {
        if let Job::Message(m) = job {
            let this = (m.chat, m.from, m.body.as_str());
            match seen.entry(m.id) {
                Entry::Occupied(first) if *first.get() != this => return Some(m.id),
                Entry::Occupied(_) => {}
                Entry::Vacant(slot) => {
                    slot.insert(this);
                }
            }
        }
    }
    None
}

/// A batch as column arrays, with the duplicates one INSERT cannot take
/// removed: PostgreSQL refuses to let one `ON CONFLICT` statement touch the
/// same row twice ("cannot affect row a second time").
#[derive(Debug, Default, PartialEq)]
pub struct Rows<'a> {
    pub messages: MessageRows<'a>,
    pub chats: ChatRows<'a>,
    pub members: MemberRows,
}

#[derive(Debug, Default, PartialEq)]
pub struct MessageRows<'a> {
    pub id: Vec<Uuid>,
    pub chat: Vec<Uuid>,
    pub seq: Vec<i64>,
    pub sender: Vec<Uuid>,
    pub recipient: Vec<Option<Uuid>>,
    pub body: Vec<&'a str>,
    pub ts: Vec<i64>,
}

impl MessageRows<'_> {
    /// The rows in PostgreSQL's binary COPY format, columns in the order of
    /// `COPY_MESSAGES`: the 19-byte header, per row a 16-bit field count and
    /// each field as a 32-bit length (-1 for NULL) and its bytes (uuid: 16,
    /// int8: 8, big-endian; text: UTF-8), then the -1 trailer.
    pub fn copy_binary(&self) -> BytesMut {
        let bodies: usize = self.body.iter().map(|b| b.len()).sum();
        let mut buf = BytesMut::with_capacity(21 + self.id.len() * (2 + 7 * 4 + 4 * 16 + 2 * 8) + bodies);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        let uuid = |buf: &mut BytesMut, u: &Uuid| {
            buf.put_i32(16);
            buf.put_slice(u.as_bytes());
        };
        let int8 = |buf: &mut BytesMut, n: i64| {
            buf.put_i32(8);
            buf.put_i64(n);
        };
        for i in 0..self.id.len() {
            buf.put_i16(7);
            uuid(&mut buf, &self.id[i]);
            uuid(&mut buf, &self.chat[i]);
            int8(&mut buf, self.seq[i]);
            uuid(&mut buf, &self.sender[i]);
            match &self.recipient[i] {
                Some(r) => uuid(&mut buf, r),
                None => buf.put_i32(-1),
            }
            let body = self.body[i].as_bytes();
            // A body is at most a few KiB (CHAT_MAX_BODY_BYTES); a length
            // beyond i32 would be refused by PostgreSQL anyway.
            buf.put_i32(i32::try_from(body.len()).unwrap_or(i32::MAX));
            buf.put_slice(body);
            int8(&mut buf, self.ts[i]);
        }
        buf.put_i16(-1);
        buf
    }
}

#[derive(Debug, Default, PartialEq)]
pub struct ChatRows<'a> {
    pub id: Vec<Uuid>,
    pub kind: Vec<&'static str>,
    pub title: Vec<&'a str>,
    pub visibility: Vec<&'a str>,
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

impl<'a> Rows<'a> {
    /// Messages and chats: the first job with an id wins (a later one is a
    /// redelivery, and the stored row would not change anyway). Memberships:
    /// per (chat, user) the highest `version` wins, the first on a tie.
    pub fn from_jobs(jobs: &'a [Job]) -> Rows<'a> {
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
                        r.body.push(&m.body);
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
                        r.title.push(title);
                        r.visibility.push(visibility);
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
        let jobs = [message(a, 1, "x"), message(b, 2, "y"), message(a, 1, "x")];
        let rows = Rows::from_jobs(&jobs);
        assert_eq!(rows.messages.id, vec![a, b]);
        assert_eq!(rows.messages.body, vec!["x", "y"]);
        assert_eq!(rows.messages.recipient, vec![None, None]);
    }

    #[test]
    fn two_messages_under_one_id_in_a_batch_are_told_from_a_redelivery() {
        let (a, b) = (Uuid::from_u128(10), Uuid::from_u128(11));
        // The same message twice, a resend with a new seq: not a reuse.
        assert_eq!(
            reused_id(&[message(a, 1, "x"), message(b, 2, "y"), message(a, 1, "x")]),
            None
        );
        assert_eq!(reused_id(&[message(a, 1, "x"), message(a, 7, "x")]), None);
        // Another text under the id, or another sender.
        assert_eq!(reused_id(&[message(a, 1, "x"), message(a, 2, "z")]), Some(a));
        let Job::Message(mut other) = message(a, 2, "x") else {
            unreachable!()
        };
        other.from = Uuid::from_u128(3);
        assert_eq!(reused_id(&[message(a, 1, "x"), Job::Message(other)]), Some(a));
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
        let jobs = [chat("first"), chat("second")];
        let rows = Rows::from_jobs(&jobs);
        assert_eq!(rows.chats.id, vec![Uuid::from_u128(5)]);
        assert_eq!(rows.chats.title, vec!["first"]);
        assert_eq!(rows.chats.kind, vec!["group"]);
    }

    #[test]
    fn membership_keeps_the_highest_version_whatever_the_order() {
        let jobs = [
            member(7, 2, false),
            member(8, 1, true),
            member(7, 3, true),
            member(7, 1, true),
            member(7, 3, false),
        ];
        let rows = Rows::from_jobs(&jobs);
        let m = &rows.members;
        assert_eq!(m.user, vec![Uuid::from_u128(7), Uuid::from_u128(8)]);
        assert_eq!(m.version, vec![3, 1]);
        // On a tie the first one seen stays.
        assert_eq!(m.active, vec![true, true]);
        assert_eq!(m.updated_at, vec![300, 100]);
    }

    #[test]
    fn messages_encode_in_the_binary_copy_format() {
        let recipient = Uuid::from_u128(0xabc);
        let jobs = [
            message(Uuid::from_u128(10), 7, "hé"),
            Job::Message(Message {
                id: Uuid::from_u128(11),
                chat: Uuid::from_u128(1),
                seq: -1,
                from: Uuid::from_u128(2),
                to: Some(recipient),
                body: String::new(),
                ts: 10,
            }),
        ];
        let data = Rows::from_jobs(&jobs).messages.copy_binary();
        let mut expected: Vec<u8> = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        let uuid = |out: &mut Vec<u8>, n: u128| {
            out.extend(16i32.to_be_bytes());
            out.extend(n.to_be_bytes());
        };
        let int8 = |out: &mut Vec<u8>, n: i64| {
            out.extend(8i32.to_be_bytes());
            out.extend(n.to_be_bytes());
        };
        // Row 1: no recipient (NULL), a two-byte character in the body.
        expected.extend(7i16.to_be_bytes());
        uuid(&mut expected, 10);
        uuid(&mut expected, 1);
        int8(&mut expected, 7);
        uuid(&mut expected, 2);
        expected.extend((-1i32).to_be_bytes());
        expected.extend(3i32.to_be_bytes());
        expected.extend("hé".as_bytes());
        int8(&mut expected, 10);
        // Row 2: a recipient, an empty body, a negative number.
        expected.extend(7i16.to_be_bytes());
        uuid(&mut expected, 11);
        uuid(&mut expected, 1);
        int8(&mut expected, -1);
        uuid(&mut expected, 2);
        uuid(&mut expected, 0xabc);
        expected.extend(0i32.to_be_bytes());
        int8(&mut expected, 10);
        expected.extend((-1i16).to_be_bytes());
        assert_eq!(&data[..], &expected[..]);
    }

    #[test]
    fn an_empty_batch_has_no_rows() {
        assert_eq!(Rows::from_jobs(&[]), Rows::default());
    }
}
