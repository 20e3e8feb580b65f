//! The integration-test harness: real `redis-server`, PostgreSQL, gateway
//! and persister processes on free loopback ports, with throwaway data
//! directories. No mocks and no Docker.
//!
//! A test starts a [`Stack`] (Redis, a fresh migrated database, N gateways,
//! optionally the persister) and talks to it in the product's words:
//! `connect(gw, user)`, `send_message_to`, `expect("message")`,
//! `http(gw).history(..)`. Fault tests reach for the raw pieces (`redis`,
//! `gateways`, `persister`, `Postgres::dedicated()`), which are public.
//!
//! Rules the harness keeps so a test never hangs and never leaks:
//! - every wait has a timeout ([`DEFAULT_TIMEOUT`] unless a test gives one)
//!   and fails with what it saw and the processes' stderr;
//! - every child process dies with its owner (kill on drop, and
//!   `PR_SET_PDEATHSIG` when the test process itself dies);
//! - directories live under `/tmp/chat-it-*`; ones left by a test process
//!   that was killed are swept by the next run.
//!
//! Logs: children's stderr is kept in memory and shown when a test fails;
//! `TEST_LOG=1` (or a filter such as `TEST_LOG=gateway=debug`) sets the
//! children's `RUST_LOG` and forwards their output as it comes
//! (`TEST_LOG=1 cargo test -p gateway --test it -- --nocapture name`).

// Not every test uses every helper.
#![allow(dead_code)]

pub mod api;
pub mod client;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod redis;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use uuid::Uuid;

pub use self::api::Api;
pub use self::client::{Client, ConnectOptions};
pub use self::postgres::{Database, Postgres};
pub use self::process::{Gateway, Persister};
pub use self::proxy::Proxy;
pub use self::redis::Redis;

/// How long any single wait lasts unless the test says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Environment for `StackOptions::env` from `(name, value)` pairs.
pub fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The sum of the samples of counter or gauge `name` whose labels contain
/// `label`, in a Prometheus text exposition (0 when there are none).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A fresh user id (users exist by holding a token; nothing to create).
pub fn user() -> Uuid {
    Uuid::new_v4()
}

/// The private chat of two users, as the contract computes it.
pub fn private_chat(a: Uuid, b: Uuid) -> Uuid {
    shared::ids::private_chat_id(a, b)
}

/// What to start. `Default` is one gateway with the persister.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub gateways: usize,
    pub persister: bool,
    /// Redis with `appendonly yes, appendfsync always`, so `redis.restart()`
    /// keeps every acknowledged write.
    pub redis_aof: bool,
    /// Extra environment for every gateway and persister process (wins over
    /// the harness's own values).
    pub env: Vec<(String, String)>,
    /// The gateways and persisters reach Redis over its unix socket, as
    /// scripts/up's do, instead of TCP (the tests' own connections stay on
    /// TCP).
    pub redis_over_unix_socket: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            gateways: 1,
            persister: true,
            redis_aof: false,
            env: vec![],
            redis_over_unix_socket: false,
        }
    }
}

/// A running system: Redis, a migrated database, gateways, a persister.
///
/// Fields drop in order: the product's processes die before the servers
/// they use, so teardown does not fill the logs with connection errors.
pub struct Stack {
    pub gateways: Vec<Gateway>,
    pub persister: Option<Persister>,
    /// Persisters started beside `persister` (`start_extra_persister`); all
    /// share the consumer group.
    pub extra_persisters: Vec<Persister>,
    pub redis: Redis,
    pub db: Database,
    /// Set when the stack runs on its own PostgreSQL cluster
    /// (`Stack::start_dedicated`), so a test may stop and start it.
    pub pg: Option<Postgres>,
    /// The `CHAT_JWT_SECRET` of this stack.
    pub secret: String,
    pub options: StackOptions,
    /// Names given so far, so a replacement gateway gets a fresh one.
    started_gateways: usize,
    started_persisters: usize,
}

impl Stack {
    /// Starts the stack on the shared PostgreSQL cluster (a fresh database).
    pub async fn start(options: StackOptions) -> Stack {
        let pg = tokio::task::spawn_blocking(Postgres::shared)
            .await
            .expect("starting the shared PostgreSQL cluster");
        let (redis, db) = tokio::join!(Redis::start_with(options.redis_aof), pg.create_database());
        Self::start_on(options, redis, db, None).await
    }

    /// Starts the stack on a PostgreSQL cluster of its own (`self.pg`), for
    /// tests that take the database down.
    pub async fn start_dedicated(options: StackOptions) -> Stack {
        let (redis, pg) = tokio::join!(Redis::start_with(options.redis_aof), Postgres::dedicated());
        let db = pg.create_database().await;
        Self::start_on(options, redis, db, Some(pg)).await
    }

    async fn start_on(options: StackOptions, redis: Redis, db: Database, pg: Option<Postgres>) -> Stack {
        process::migrate(&db.url).await;
        let mut stack = Stack {
            redis,
            db,
            gateways: vec![],
            persister: None,
            extra_persisters: vec![],
            pg,
            secret: format!("test-secret-{}", Uuid::new_v4().simple()),
            options,
            started_gateways: 0,
            started_persisters: 0,
        };
        let names: Vec<String> = (0..stack.options.gateways).map(|_| stack.next_gateway_name()).collect();
        let gateways = names.iter().map(|name| Gateway::start(name, stack.gateway_env(name)));
        let persister = async {
            if stack.options.persister {
                let name = "p1".to_string();
                Some(Persister::start(&name, stack.persister_env(&name)).await)
            } else {
                None
            }
        };
        let (gateways, persister) = tokio::join!(futures_util::future::join_all(gateways), persister);
        stack.gateways = gateways;
        stack.persister = persister;
        stack.started_persisters = usize::from(stack.persister.is_some());
        stack
    }

    fn next_gateway_name(&mut self) -> String {
        self.started_gateways += 1;
        format!("gw{}", self.started_gateways)
    }

    /// The environment a gateway named `name` gets.
    pub fn gateway_env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("CHAT_JWT_SECRET".to_string(), self.secret.clone()),
            ("REDIS_URL".to_string(), self.process_redis_url()),
            ("DATABASE_URL".to_string(), self.db.url.clone()),
            ("GATEWAY_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("GATEWAY_NODE_ID".to_string(), name.to_string()),
        ];
        // Tests send, join and poll far faster than a person: the per-user
        // rate limits are lifted unless a test sets them (limits.rs does).
        for name in [
            "GATEWAY_SEND_RATE",
            "GATEWAY_SEND_BURST",
            "GATEWAY_JOIN_RATE",
            "GATEWAY_JOIN_BURST",
            "GATEWAY_REST_RATE",
            "GATEWAY_REST_BURST",
        ] {
            env.push((name.to_string(), "1000000".to_string()));
        }
        env.extend(self.options.env.iter().cloned());
        env
    }

    /// The `REDIS_URL` the product's processes get.
    fn process_redis_url(&self) -> String {
        if self.options.redis_over_unix_socket {
            self.redis.unix_url()
        } else {
            self.redis.url()
        }
    }

    /// The environment a persister named `name` gets.
    pub fn persister_env(&self, name: &str) -> Vec<(String, String)> {
        let mut env = vec![
            ("REDIS_URL".to_string(), self.process_redis_url()),
            ("DATABASE_URL".to_string(), self.db.url.clone()),
            ("PERSISTER_METRICS_LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("PERSISTER_CONSUMER".to_string(), name.to_string()),
        ];
        env.extend(self.options.env.iter().cloned());
        env
    }

    pub fn db_url(&self) -> &str {
        &self.db.url
    }

    /// A new connection to the stack's database.
    pub async fn db(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(self.db_url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.db_url()));
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` (one or more statements) on the stack's database.
    pub async fn sql(&self, sql: &str) {
        self.db()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Every entry of the Redis stream `stream`, oldest first: its id and
    /// its fields as name, value, name, value…
    /// `XLEN chat:queue`: jobs not yet stored.
    pub async fn queue_length(&self) -> i64 {
        ::redis::cmd("XLEN")
            .arg(shared::queue::STREAM)
            .query_async(&mut self.redis.connection().await)
            .await
            .expect("XLEN chat:queue")
    }

    pub async fn stream_entries(&self, stream: &str) -> Vec<(String, Vec<String>)> {
        let mut redis = self.redis.connection().await;
        ::redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut redis)
            .await
            .unwrap_or_else(|e| panic!("XRANGE {stream}: {e}"))
    }

    /// Starts one more gateway (named gwN) with `extra` env on top of the
    /// stack's; returns its index.
    pub async fn add_gateway(&mut self, extra: &[(&str, &str)]) -> usize {
        let name = self.next_gateway_name();
        let mut env = self.gateway_env(&name);
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self.gateways.push(Gateway::start(&name, env).await);
        self.gateways.len() - 1
    }

    /// Kills gateway `i` (SIGKILL) and starts a fresh one in its place (a
    /// new name and port: clients must reconnect, as in production).
    pub async fn restart_gateway(&mut self, i: usize) {
        self.gateways[i].kill().await;
        let name = self.next_gateway_name();
        self.gateways[i] = Gateway::start(&name, self.gateway_env(&name)).await;
    }

    /// Starts a persister (named pN) when none runs (never started, or
    /// killed / terminated); the old one, if any, is killed first.
    pub async fn start_persister(&mut self) {
        if let Some(old) = self.persister.as_mut() {
            old.kill().await;
        }
        self.started_persisters += 1;
        let name = format!("p{}", self.started_persisters);
        self.persister = Some(Persister::start(&name, self.persister_env(&name)).await);
    }

    /// Starts one more persister (named pN) beside the running ones, in the
    /// same consumer group; returns its index in `extra_persisters`.
    pub async fn start_extra_persister(&mut self) -> usize {
        self.started_persisters += 1;
        let name = format!("p{}", self.started_persisters);
        let persister = Persister::start(&name, self.persister_env(&name)).await;
        self.extra_persisters.push(persister);
        self.extra_persisters.len() - 1
    }

    /// An HS256 token for `user`, valid for an hour.
    pub fn token(&self, user: Uuid) -> String {
        self.token_expiring_in(user, 3600)
    }

    /// A token that expires `secs` from now (negative: already expired; note
    /// that JWT validators often allow some leeway past `exp`).
    pub fn token_expiring_in(&self, user: Uuid, secs: i64) -> String {
        mint_token(&self.secret, user, now_secs() + secs)
    }

    /// A token with exactly `claims`, signed with the stack's secret.
    pub fn token_with_claims(&self, claims: Value) -> String {
        mint_claims(&self.secret, &claims)
    }

    /// A token for `user` signed with another secret (must be refused).
    pub fn token_signed_with(&self, user: Uuid, secret: &str) -> String {
        mint_token(secret, user, now_secs() + 3600)
    }

    /// A WebSocket to gateway `gw` as `user` (token in `Authorization`).
    pub async fn connect(&self, gw: usize, user: Uuid) -> Client {
        let token = self.token(user);
        match Client::connect(&self.gateways[gw].ws_url(), Some(&token), false).await {
            Ok(mut client) => {
                client.user = Some(user);
                client
            }
            Err(e) => panic!(
                "connecting {user} to {}: {e}\n{}",
                self.gateways[gw].name,
                self.gateways[gw].logs_tail(40)
            ),
        }
    }

    /// A WebSocket handshake with `Authorization: Bearer <token>` when a
    /// token is given; `Err(status)` when the gateway refuses the upgrade.
    /// Transport failures panic.
    pub async fn try_connect_raw(&self, gw: usize, token: Option<&str>) -> Result<Client, u16> {
        self.try_connect_with(gw, token, false).await
    }

    /// Like `try_connect_raw`, with the token in the `?token=` query
    /// parameter (how browsers authenticate).
    pub async fn try_connect_query(&self, gw: usize, token: Option<&str>) -> Result<Client, u16> {
        self.try_connect_with(gw, token, true).await
    }

    async fn try_connect_with(&self, gw: usize, token: Option<&str>, in_query: bool) -> Result<Client, u16> {
        self.handshake(gw, token, in_query, &client::ConnectOptions::default())
            .await
    }

    /// A handshake with the token in `Authorization: Bearer` (when given)
    /// and `options` (an `Origin`, a small receive buffer); `Err(status)`
    /// when the gateway refuses the upgrade. Transport failures panic.
    pub async fn try_connect_options(
        &self,
        gw: usize,
        token: Option<&str>,
        options: &client::ConnectOptions,
    ) -> Result<Client, u16> {
        self.handshake(gw, token, false, options).await
    }

    async fn handshake(
        &self,
        gw: usize,
        token: Option<&str>,
        in_query: bool,
        options: &client::ConnectOptions,
    ) -> Result<Client, u16> {
        match Client::connect_with(&self.gateways[gw].ws_url(), token, in_query, options).await {
            Ok(client) => Ok(client),
            Err(client::ConnectError::Status(status)) => Err(status),
            Err(e) => panic!("connecting to {}: {e}", self.gateways[gw].name),
        }
    }

    /// The REST API of gateway `gw`.
    pub fn http(&self, gw: usize) -> Api {
        Api::new(self.gateways[gw].http_url(), self.secret.clone())
    }

    /// Polls `user`'s view of `chat`'s history until it holds at least `n`
    /// messages; returns all of them (oldest first, paging past the API's
    /// 500 per request). Fails after `timeout`.
    pub async fn wait_for_history(&self, user: Uuid, chat: Uuid, n: usize, timeout: Duration) -> Vec<Value> {
        let gw = self
            .gateways
            .iter()
            .position(|g| g.is_running())
            .expect("wait_for_history needs a running gateway");
        let api = self.http(gw);
        let deadline = Instant::now() + timeout;
        loop {
            let (status, messages) = api.history_all(user, chat).await;
            if status == 200 && messages.len() >= n {
                return messages;
            }
            if Instant::now() >= deadline {
                panic!(
                    "history of chat {chat} did not reach {n} messages within {timeout:?}; \
                     last answer: {status}, {} message(s), the last ones: {}\n{}",
                    messages.len(),
                    Value::Array(messages[messages.len().saturating_sub(3)..].to_vec()),
                    self.logs_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sum of the samples of counter or gauge `name` whose labels
    /// contain `label`, from gateway `gw`'s `/metrics` (0 when none yet).
    pub async fn metric(&self, gw: usize, name: &str, label: &str) -> f64 {
        let (status, text) = self.http(gw).get_text("/metrics").await;
        assert_eq!(status, 200, "/metrics: {text}");
        metric_sum(&text, name, label)
    }

    /// Polls `check` until it gives `Some`, and returns that; fails after
    /// `timeout` saying it waited for `what`, with the processes' output.
    /// For a state the product reaches by itself (a row stored, an entry
    /// read, a dead letter written), never to let time pass.
    pub async fn eventually<T>(&self, what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check().await {
                return found;
            }
            if Instant::now() >= deadline {
                panic!("no {what} within {timeout:?}\n{}", self.logs_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last `lines` lines of every process's output, for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for g in &self.gateways {
            out.push_str(&g.logs_tail(lines));
        }
        for p in self.persister.iter().chain(&self.extra_persisters) {
            out.push_str(&p.logs_tail(lines));
        }
        out
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // A failing test shows what the processes said (unless it was
        // already forwarded live).
        if std::thread::panicking() && test_log().is_none() {
            eprintln!("--- process output (last lines) ---\n{}", self.logs_tail(60));
        }
    }
}

/// Signs `{sub, exp, iat}` with HS256.
pub fn mint_token(secret: &str, user: Uuid, exp: i64) -> String {
    mint_claims(
        secret,
        &json!({ "sub": user.to_string(), "exp": exp, "iat": now_secs() }),
    )
}

/// Signs any claims with HS256, for tokens the gateway must refuse (a `sub`
/// that is not a UUID, a missing `exp`, ...).
pub fn mint_claims(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("signing a token")
}

/// The id in `value`, which must be a UUID in canonical lowercase text (the
/// contract's form of every id); fails naming `what` otherwise.
pub fn canonical_uuid(value: &Value, what: &str) -> Uuid {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    let id = Uuid::parse_str(text).unwrap_or_else(|e| panic!("{what} is not a UUID ({e}): {value}"));
    assert_eq!(id.to_string(), text, "{what} is not in canonical lowercase form");
    id
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// `RUST_LOG` for the children when `TEST_LOG` is set (`1`/`true` mean
/// `info`); `None` when it is not, and the children log at `warn`.
pub fn test_log() -> Option<String> {
    let value = std::env::var("TEST_LOG").ok().filter(|v| !v.is_empty())?;
    Some(match value.as_str() {
        "1" | "true" | "yes" | "on" => "info".to_string(),
        _ => value,
    })
}

/// A port that was free a moment ago (bind port 0, read it, drop). Another
/// process may take it before the caller binds, so starters retry.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// A directory `/tmp/chat-it-<kind>-<random>`, removed on drop. It holds an
/// `owner` file with this process's pid, so a later run can sweep the
/// directories of a test process that was killed before it could clean up.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        sweep_stale_dirs();
        let path = Path::new("/tmp").join(format!("chat-it-{kind}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        std::fs::write(path.join("owner"), std::process::id().to_string())
            .unwrap_or_else(|e| panic!("writing {}/owner: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Once per test process: removes `/tmp/chat-it-*` directories whose owner
/// process is gone, stopping a PostgreSQL cluster left running in one.
fn sweep_stale_dirs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(entries) = std::fs::read_dir("/tmp") else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if !name.to_string_lossy().starts_with("chat-it-") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(path.join("owner"))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            else {
                continue;
            };
            if process_alive(pid) {
                continue;
            }
            if path.join("data/postmaster.pid").exists() {
                postgres::stop_cluster(&path.join("data"));
            }
            let _ = std::fs::remove_dir_all(&path);
        }
    });
}

pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The last `lines` lines of `text`.
pub(crate) fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
