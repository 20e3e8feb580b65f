//! Applies the SQL migrations embedded from ../migrations at build time.
//!
//! Owns the `schema_migrations` bookkeeping table and the migration lock. Each
//! migration runs in its own transaction together with the row recording it,
//! so a failed migration leaves nothing behind and a second run skips what is
//! recorded. The whole run holds a session-level advisory lock, so two
//! processes migrating at once apply every migration exactly once (the second
//! waits, then finds nothing to do). It must never touch the tables the
//! migrations create, nor run during `persister run`.

use tokio_postgres::NoTls;

/// One embedded migration file.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The file name without `.sql`, e.g. `0001_init`; recorded in `schema_migrations`.
    pub version: &'static str,
    pub sql: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/migrations.rs"));

/// The `pg_advisory_lock` key serializing migration runs: "PERSMIGR" in ASCII.
pub const LOCK_KEY: i64 = 0x5045_5253_4D49_4752;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    #[error("migration {version} failed: {source}")]
    Apply {
        version: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("migration bookkeeping failed: {0}")]
    Bookkeeping(#[from] tokio_postgres::Error),
}

/// Applies every migration not yet recorded, in order; returns the versions
/// this run applied (empty when the schema was up to date).
pub async fn migrate(database_url: &str) -> Result<Vec<&'static str>, MigrateError> {
    let (mut client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .map_err(MigrateError::Connect)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "migration connection ended with an error");
        }
    });

    // Held until unlocked below, or until the session ends if we fail midway.
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await?;
    let result = apply_pending(&mut client).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    drop(client);
    let _ = driver.await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<Vec<&'static str>, MigrateError> {
    client
        .batch_execute(
            "SET client_min_messages TO warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                version text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let done: Vec<String> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();

    let mut applied = Vec::new();
    for m in MIGRATIONS {
        if done.iter().any(|v| v == m.version) {
            continue;
        }
        let apply = |source| MigrateError::Apply {
            version: m.version,
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(m.sql).await.map_err(apply)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, now())",
            &[&m.version],
        )
        .await?;
        tx.commit().await.map_err(apply)?;
        tracing::info!(version = m.version, "applied migration");
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_embedded_in_order() {
        assert!(!MIGRATIONS.is_empty());
        assert_eq!(MIGRATIONS[0].version, "0001_init");
        assert!(MIGRATIONS[0].sql.contains("CREATE TABLE messages"));
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
    }
}
