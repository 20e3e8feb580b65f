//! Write-method ladder and end-to-end helpers for docs/benchmarks-persister.md.
//!
//! It never starts a server: give it DATABASE_URL (a PostgreSQL 15 with
//! default durability: fsync on, synchronous_commit on) and, for `fill`,
//! REDIS_URL.
//!
//! ```sh
//! # rows/s of each way of writing the project's `messages` rows (each
//! # method gets a fresh copy of the table from migrations/0001_init.sql in a
//! # schema of its own, dropped afterwards)
//! DATABASE_URL=postgres://postgres@127.0.0.1:PORT/db cargo run --release -p persister --example ladder -- methods
//! # N message jobs onto chat:queue (pipelined XADD), the same rows every time
//! REDIS_URL=redis://127.0.0.1:PORT cargo run --release -p persister --example ladder -- fill --jobs 300000
//! # plain COPY of the same N rows into `messages` of a migrated database
//! DATABASE_URL=... cargo run --release -p persister --example ladder -- copy --jobs 300000
//! ```
//!
//! Rows: 100-byte bodies, UUIDv7 ids (time-ordered, as the gateway makes
//! them; `--ids v4` for random ones, as a client may send), 1,000 chats with
//! increasing seq, half of them private (with a recipient). Generated before
//! the clock starts.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::SinkExt;
use persister::store::{MessageRows, Rows};
use shared::protocol::Message;
use shared::queue::{Job, STREAM};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};
use uuid::Uuid;

#[derive(Parser)]
struct Cli {
    /// Message ids: `v7` (time-ordered, as the gateway makes them) or `v4`
    /// (random, as a client may send them).
    #[arg(long, global = true, default_value = "v7")]
    ids: Ids,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Ids {
    V7,
    V4,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time each write method on a fresh `messages` table.
    Methods {
        /// Rows per method (single-row INSERTs use --single-rows).
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        /// Rows for the one-INSERT-per-transaction method.
        #[arg(long, default_value_t = 20_000)]
        single_rows: usize,
        /// Rows per transaction (multi-row INSERT is capped at 9,000: 65,535 parameters).
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
        /// Comma-separated subset of: single,values,unnest,copy-temp,copy.
        #[arg(long, default_value = "single,values,unnest,copy-temp,copy")]
        only: String,
    },
    /// XADD `jobs` message jobs to chat:queue, 1,000 per round trip.
    Fill {
        #[arg(long, default_value_t = 300_000)]
        jobs: usize,
    },
    /// Plain binary COPY of the same rows `fill` makes into `messages`.
    Copy {
        #[arg(long, default_value_t = 300_000)]
        jobs: usize,
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ids = cli.ids;
    match cli.command {
        Cmd::Methods {
            rows,
            single_rows,
            batch,
            only,
        } => methods(ids, rows, single_rows, batch, &only).await,
        Cmd::Fill { jobs } => fill(ids, jobs).await,
        Cmd::Copy { jobs, batch } => copy(ids, jobs, batch).await,
    }
}

/// The same `n` message jobs on every call.
fn jobs(ids: Ids, n: usize) -> Vec<Job> {
    const CHATS: u64 = 1000;
    let base_ms: u64 = 1_780_000_000_000;
    let body_pad = "x".repeat(100);
    (0..n as u64)
        .map(|i| {
            let r = splitmix(i);
            let random = (r as u128) << 64 | splitmix(r) as u128;
            let bytes = random.to_le_bytes();
            let id = match ids {
                Ids::V7 => {
                    uuid::Builder::from_unix_timestamp_millis(base_ms + i / 64, &bytes[..10].try_into().unwrap())
                        .into_uuid()
                }
                Ids::V4 => uuid::Builder::from_random_bytes(bytes).into_uuid(),
            };
            let chat_no = i % CHATS;
            let mut body = format!("message {i} ");
            body.push_str(&body_pad[..100 - body.len()]);
            Job::Message(Message {
                id,
                chat: Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | chat_no as u128),
                seq: (i / CHATS + 1) as i64,
                from: Uuid::from_u128(0x0190_0000_0000_7000_8000_0001_0000_0000 | (r % 5000) as u128),
                to: chat_no
                    .is_multiple_of(2)
                    .then(|| Uuid::from_u128(0x0190_0000_0000_7000_8000_0002_0000_0000 | (r % 5000) as u128)),
                body,
                ts: (base_ms + i / 64) as i64,
            })
        })
        .collect()
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn connect() -> anyhow::Result<Client> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("connection: {e}");
        }
    });
    let settings = client
        .query_one(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit')",
            &[],
        )
        .await?;
    let (fsync, sync_commit): (String, String) = (settings.get(0), settings.get(1));
    eprintln!("fsync={fsync} synchronous_commit={sync_commit}");
    Ok(client)
}

const INIT_SQL: &str = include_str!("../../migrations/0001_init.sql");

async fn methods(ids: Ids, rows: usize, single_rows: usize, batch: usize, only: &str) -> anyhow::Result<()> {
    let client = connect().await?;
    let all = jobs(ids, rows.max(single_rows));
    println!("| method | rows | rows per transaction | seconds | rows/s |");
    println!("|---|---:|---:|---:|---:|");
    for method in only.split(',') {
        let (n, per_tx) = match method {
            "single" => (single_rows, 1),
            "values" => (rows, batch.min(9000)),
            _ => (rows, batch),
        };
        let schema = format!("ladder_{}", method.replace('-', "_"));
        client
            .batch_execute(&format!(
                "SET client_min_messages TO warning; DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; {INIT_SQL}"
            ))
            .await?;
        client.execute("CHECKPOINT", &[]).await?;
        let started = Instant::now();
        for chunk in all[..n].chunks(per_tx) {
            write(&client, method, chunk)
                .await
                .with_context(|| format!("method {method}"))?;
        }
        let took = started.elapsed();
        let stored: i64 = client.query_one("SELECT count(*) FROM messages", &[]).await?.get(0);
        anyhow::ensure!(stored as usize == n, "{method}: {stored} rows stored, {n} written");
        println!(
            "| {method} | {n} | {per_tx} | {:.2} | {:.0} |",
            took.as_secs_f64(),
            rate(n, took)
        );
        client
            .batch_execute(&format!("SET search_path TO public; DROP SCHEMA {schema} CASCADE"))
            .await?;
    }
    Ok(())
}

/// Row `i` of `m` as statement parameters, in the column order of `messages`.
fn row<'a>(m: &'a MessageRows<'_>, i: usize) -> [&'a (dyn ToSql + Sync); 7] {
    [
        &m.id[i],
        &m.chat[i],
        &m.seq[i],
        &m.sender[i],
        &m.recipient[i],
        &m.body[i],
        &m.ts[i],
    ]
}

fn rate(n: usize, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64()
}

async fn write(client: &Client, method: &str, jobs: &[Job]) -> anyhow::Result<()> {
    let rows = Rows::from_jobs(jobs);
    let m = &rows.messages;
    match method {
        "single" => {
            let stmt = client
                .prepare(
                    "INSERT INTO messages (id, chat, seq, sender, recipient, body, ts)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                )
                .await?;
            for i in 0..m.id.len() {
                client.execute(&stmt, &row(m, i)).await?;
            }
        }
        "values" => {
            let mut sql = String::from("INSERT INTO messages (id, chat, seq, sender, recipient, body, ts) VALUES ");
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(7 * m.id.len());
            for i in 0..m.id.len() {
                let b = i * 7;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${},${},${},${},${},${},${})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    b + 5,
                    b + 6,
                    b + 7
                ));
                params.extend_from_slice(&row(m, i));
            }
            sql.push_str(" ON CONFLICT (id) DO NOTHING");
            client.execute(&sql, &params).await?;
        }
        "unnest" => {
            client
                .execute(
                    "INSERT INTO messages (id, chat, seq, sender, recipient, body, ts)
                     SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::int8[], $4::uuid[],
                                          $5::uuid[], $6::text[], $7::int8[])
                     ON CONFLICT (id) DO NOTHING",
                    &[&m.id, &m.chat, &m.seq, &m.sender, &m.recipient, &m.body, &m.ts],
                )
                .await?;
        }
        "copy-temp" => {
            client
                .batch_execute(
                    "BEGIN; CREATE TEMPORARY TABLE IF NOT EXISTS messages_in
                       (id uuid, chat uuid, seq int8, sender uuid, recipient uuid, body text, ts int8)
                       ON COMMIT DELETE ROWS",
                )
                .await?;
            copy_into(client, "messages_in", m.copy_binary().freeze()).await?;
            client
                .batch_execute("INSERT INTO messages SELECT * FROM messages_in ON CONFLICT (id) DO NOTHING; COMMIT")
                .await?;
        }
        "copy" => copy_into(client, "messages", m.copy_binary().freeze()).await?,
        other => anyhow::bail!("unknown method {other}"),
    }
    Ok(())
}

async fn copy_into(client: &Client, table: &str, data: Bytes) -> anyhow::Result<()> {
    let sink = client
        .copy_in::<_, Bytes>(&format!(
            "COPY {table} (id, chat, seq, sender, recipient, body, ts) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    futures_util::pin_mut!(sink);
    sink.send(data).await?;
    sink.finish().await?;
    Ok(())
}

async fn fill(ids: Ids, n: usize) -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL").context("set REDIS_URL")?;
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let all = jobs(ids, n);
    let started = Instant::now();
    for chunk in all.chunks(1000) {
        let mut pipe = redis::pipe();
        for job in chunk {
            let cmd = pipe.cmd("XADD").arg(STREAM).arg("*");
            for (field, value) in job.to_fields() {
                cmd.arg(field).arg(value);
            }
            cmd.ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    eprintln!("queued {n} jobs in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn copy(ids: Ids, n: usize, batch: usize) -> anyhow::Result<()> {
    let client = connect().await?;
    let all = jobs(ids, n);
    let started = Instant::now();
    for chunk in all.chunks(batch) {
        let rows = Rows::from_jobs(chunk);
        copy_into(&client, "messages", rows.messages.copy_binary().freeze()).await?;
    }
    let took = started.elapsed();
    println!(
        "copy {n} rows in {:.2} s: {:.0} rows/s",
        took.as_secs_f64(),
        rate(n, took)
    );
    Ok(())
}
