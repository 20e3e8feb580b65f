//! PostgreSQL 15 clusters for tests.
//!
//! One cluster per test process, started on first use and shared by every
//! test; each test gets its own database (`CREATE DATABASE t_<random>`), so
//! tests run in parallel without seeing each other's rows. The shared
//! cluster is stopped (`pg_ctl stop -m immediate`) and its directory removed
//! by an `atexit` hook. Tests that take PostgreSQL down use
//! `Postgres::dedicated()`, a cluster of their own with `stop()`/`start()`.
//!
//! The server refuses to run as root, so as root every PostgreSQL binary
//! runs through `runuser -u postgres --`, in a directory under /tmp that
//! belongs to postgres (the repository may sit where postgres cannot enter).
//! `fsync` and `full_page_writes` are off: they only matter when the
//! machine crashes, and these clusters never outlive a test run. The shared
//! cluster also has `synchronous_commit=off`; a dedicated one keeps it on,
//! since its tests kill the server and must not lose committed rows.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{free_port, TempDir};

pub struct Postgres {
    port: u16,
    dir: TempDir,
    shared: bool,
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    /// `postgres://postgres@127.0.0.1:PORT/NAME` (trust authentication).
    pub url: String,
}

static SHARED: OnceLock<Postgres> = OnceLock::new();

impl Postgres {
    /// The cluster shared by every test of this process, started on first
    /// call (this blocks for a second or two: call it from `spawn_blocking`).
    pub fn shared() -> &'static Postgres {
        SHARED.get_or_init(|| {
            let pg = Postgres::init(true);
            // SAFETY: registers a plain `extern "C" fn` with no arguments.
            unsafe { libc::atexit(stop_shared_cluster_at_exit) };
            pg
        })
    }

    /// A cluster of this test's own; stopped and removed on drop.
    pub async fn dedicated() -> Postgres {
        tokio::task::spawn_blocking(|| Postgres::init(false))
            .await
            .expect("starting a PostgreSQL cluster")
    }

    fn init(shared: bool) -> Postgres {
        let dir = TempDir::new("pg");
        if is_root() {
            run(Command::new("chown").arg("postgres:postgres").arg(dir.path()))
                .unwrap_or_else(|e| panic!("chown of the PostgreSQL directory: {e}"));
        }
        let data = dir.path().join("data");
        run(as_postgres("initdb", dir.path())
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8"])
            .args(["--locale=C", "--no-sync"]))
        .unwrap_or_else(|e| panic!("initdb: {e}"));
        let mut pg = Postgres { port: 0, dir, shared };
        // The port was free when chosen; another process may take it first.
        for attempt in 1.. {
            pg.port = free_port();
            match pg.start_blocking() {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    eprintln!("PostgreSQL did not start on port {}, retrying: {e}", pg.port)
                }
                Err(e) => panic!("starting PostgreSQL: {e}"),
            }
        }
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `db` in this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A fresh, empty database (not migrated: see `process::migrate`).
    pub async fn create_database(&self) -> Database {
        let name = format!("t_{}", &Uuid::new_v4().simple().to_string()[..16]);
        self.execute("postgres", &format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}\n{}", self.log()));
        Database {
            url: self.url(&name),
            name,
        }
    }

    /// Runs `sql` in database `db`, retrying connection failures for a few
    /// seconds (the server may have just started).
    pub async fn execute(&self, db: &str, sql: &str) -> Result<(), String> {
        let url = self.url(db);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, connection)) => {
                    tokio::spawn(connection);
                    return client.batch_execute(sql).await.map_err(|e| e.to_string());
                }
                Err(e) if Instant::now() >= deadline => return Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Takes the server down at once (`pg_ctl stop -m immediate`), as a
    /// crash would. Meant for dedicated clusters.
    pub async fn stop(&self) {
        let data = self.data_dir();
        tokio::task::spawn_blocking(move || stop_cluster(&data))
            .await
            .expect("stopping PostgreSQL");
    }

    /// Starts the server again on the same port, after `stop()`.
    pub async fn start(&self) {
        let (port, dir, durable) = (self.port, self.dir.path().to_path_buf(), !self.shared);
        tokio::task::spawn_blocking(move || start_cluster(port, &dir, durable))
            .await
            .expect("starting PostgreSQL")
            .unwrap_or_else(|e| panic!("restarting PostgreSQL on port {port}: {e}"));
    }

    fn start_blocking(&self) -> Result<(), String> {
        start_cluster(self.port, self.dir.path(), !self.shared)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // The shared cluster is a static, never dropped: atexit stops it.
        if !self.shared {
            stop_cluster(&self.data_dir());
        }
    }
}

extern "C" fn stop_shared_cluster_at_exit() {
    if let Some(pg) = SHARED.get() {
        stop_cluster(&pg.data_dir());
        let _ = std::fs::remove_dir_all(pg.dir.path());
    }
}

/// Starts the cluster in `dir`/data. With `durable_commits`, a commit is in
/// the WAL (the OS's cache: fsync stays off) before it is acknowledged, so
/// killing the server loses nothing committed.
fn start_cluster(port: u16, dir: &Path, durable_commits: bool) -> Result<(), String> {
    let data = dir.join("data");
    let synchronous_commit = if durable_commits { "on" } else { "off" };
    let options = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
         -c synchronous_commit={synchronous_commit} -c full_page_writes=off \
         -c max_connections=300",
        data.display()
    );
    run(as_postgres("pg_ctl", dir)
        .args(["start", "-w", "-t", "60", "-D"])
        .arg(&data)
        .arg("-l")
        .arg(dir.join("postgres.log"))
        .arg("-o")
        .arg(options))
    .map(|_| ())
    .map_err(|e| {
        let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
        format!("{e}\npostgres.log:\n{}", super::tail_lines(&log, 30))
    })
}

/// `pg_ctl stop -m immediate`; quiet, and harmless when nothing runs.
pub(crate) fn stop_cluster(data: &Path) {
    let dir = data.parent().unwrap_or(Path::new("/tmp"));
    let _ = as_postgres("pg_ctl", dir)
        .args(["stop", "-m", "immediate", "-w", "-t", "30", "-D"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Where initdb and pg_ctl live: `$PG_BINDIR`, else `pg_config --bindir`,
/// else Debian's PostgreSQL 15 directory.
pub fn bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            if let Some(dir) = std::env::var_os("PG_BINDIR") {
                return PathBuf::from(dir);
            }
            let from_pg_config = Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
                .filter(|dir| dir.join("initdb").exists());
            let dir = from_pg_config.unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"));
            assert!(
                dir.join("initdb").exists(),
                "PostgreSQL server binaries not found in {} (apt-get install postgresql-15, \
                 or set PG_BINDIR)",
                dir.display()
            );
            dir
        })
        .clone()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL binary run as the postgres user when we are root, in `cwd`
/// (a directory postgres may enter).
fn as_postgres(program: &str, cwd: &Path) -> Command {
    let path = bindir().join(program);
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(path);
        cmd
    } else {
        Command::new(path)
    };
    cmd.current_dir(cwd).stdin(Stdio::null());
    cmd
}

fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}
