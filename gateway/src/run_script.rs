//! Lua scripts that know which run of the Redis server they execute in.
//!
//! The accept script tells a restarted Redis (which may have lost its last
//! second of writes, seq increments included) from a running one by the
//! server's run id, and the recent cache uses it the same way (see
//! docs/architecture.md, Ordering). Asking `INFO` for it on every call cost
//! about 5 µs of Redis CPU per message, plus the parsing in Lua.
//!
//! Instead the run id is written into the script's text when it is loaded. A
//! restarted server starts with an empty script cache, so the first call after
//! a restart fails with NOSCRIPT and the script is loaded again, with the new
//! run id. Two rules keep an old run id out of a new run:
//!
//! - The load goes in one pipeline with an `INFO` (one connection, so one
//!   server run). If that `INFO` names another run than the text, the load is
//!   done again.
//! - Each load's text carries a nonce, so its SHA is this load's alone: a
//!   text that reached the wrong run is never called, by this process or by
//!   any other gateway.
//!
//! That is also why this is not redis-rs's `Script`: on NOSCRIPT it loads its
//! own text again, which would bring the old run id back. Loads are
//! single-flight: calls that find the script missing wait for one load.
//!
//! Redis 7 or newer only: Redis 6 wrote `SCRIPT LOAD` to the AOF and to
//! replicas, so a text with the old run id would survive a restart or a
//! failover. A load refuses an older server.
//!
//! This module owns the loading; it never decides what a script does.

use std::sync::{Arc, Mutex};

use redis::aio::ConnectionManager;
use redis::{ErrorKind, FromRedisValue, RedisResult, ToRedisArgs};
use tokio::sync::OnceCell;

use crate::redis_pool::{RedisError, RedisPool};

/// What a script's text says where the run id goes. An unreplaced one fails
/// in Redis (a global variable that does not exist), never silently.
const PLACEHOLDER: &str = "__REDIS_RUN_ID__";

/// Loads that found Redis restarting under them, tried before giving up.
const LOAD_TRIES: usize = 3;

pub struct RunScript {
    template: &'static str,
    /// The SHA of this script as loaded into the current run, once loaded.
    /// A new cell after NOSCRIPT; the cell makes the load single-flight.
    loaded: Mutex<Arc<OnceCell<String>>>,
}

/// The keys and arguments of one call.
#[derive(Default)]
pub struct ScriptCall {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
}

impl ScriptCall {
    pub fn new() -> ScriptCall {
        ScriptCall::default()
    }

    pub fn key(&mut self, key: impl Into<String>) -> &mut ScriptCall {
        self.keys.push(key.into());
        self
    }

    pub fn arg(&mut self, arg: impl ToRedisArgs) -> &mut ScriptCall {
        arg.write_redis_args(&mut self.args);
        self
    }
}

impl RunScript {
    /// `template` must name the run id as `__REDIS_RUN_ID__` (a Lua string
    /// is put there).
    pub fn new(template: &'static str) -> RunScript {
        RunScript {
            template,
            loaded: Mutex::new(Arc::new(OnceCell::new())),
        }
    }

    /// Runs the script (EVALSHA), loading it first when this run of Redis
    /// does not have it.
    pub async fn call<T: FromRedisValue>(&self, redis: &RedisPool, call: &ScriptCall) -> Result<T, RedisError> {
        let mut picked = redis.pick();
        redis.timed(picked.slot, self.call_on(&mut picked.conn, call)).await
    }

    /// Runs the script on the connection `conn` (for a caller that sends
    /// more on the same connection, in order, after it).
    pub(crate) async fn call_on<T: FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
        call: &ScriptCall,
    ) -> RedisResult<T> {
        self.call_inner(conn, call).await
    }

    async fn call_inner<T: FromRedisValue>(&self, conn: &mut ConnectionManager, call: &ScriptCall) -> RedisResult<T> {
        let sha = self.sha(conn).await?;
        match evalsha(&sha, call).query_async(conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                // Redis restarted (or its script cache was flushed).
                self.forget(&sha);
                let sha = self.sha(conn).await?;
                evalsha(&sha, call).query_async(conn).await
            }
            other => other,
        }
    }

    /// The loaded script's SHA, loading it first (once, whoever asks) when
    /// it is not.
    async fn sha(&self, conn: &mut ConnectionManager) -> RedisResult<String> {
        let cell = self.loaded.lock().unwrap_or_else(|e| e.into_inner()).clone();
        cell.get_or_try_init(|| self.load(conn)).await.cloned()
    }

    async fn load(&self, conn: &mut ConnectionManager) -> RedisResult<String> {
        for _ in 0..LOAD_TRIES {
            let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
            check_version(&info)?;
            let run = run_id(&info)?;
            let text = self.text_for(run, &uuid::Uuid::now_v7().to_string());
            let (sha, info_after): (String, String) = redis::pipe()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(&text)
                .cmd("INFO")
                .arg("server")
                .query_async(conn)
                .await?;
            if run_id(&info_after)? == run {
                return Ok(sha);
            }
            tracing::info!("redis restarted while a script was being loaded; loading it again");
        }
        Err((
            ErrorKind::ResponseError,
            "redis kept restarting while a script was loaded",
        )
            .into())
    }

    /// Forgets `sha`, unless another call has loaded a newer one meanwhile.
    fn forget(&self, sha: &str) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.get().map(String::as_str) == Some(sha) {
            *loaded = Arc::new(OnceCell::new());
        }
    }

    /// The text to load for run `run`; `nonce` makes its SHA unique.
    fn text_for(&self, run: &str, nonce: &str) -> String {
        format!(
            "-- loaded for redis run {run} ({nonce})\n{}",
            self.template.replace(PLACEHOLDER, &format!("'{run}'"))
        )
    }
}

fn evalsha(sha: &str, call: &ScriptCall) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha).arg(call.keys.len()).arg(&call.keys);
    for arg in &call.args {
        cmd.arg(&arg[..]);
    }
    cmd
}

/// Fails unless the server is Redis 7 or newer; the gateway checks at start,
/// and every load checks again (the server may have been replaced).
pub async fn require_redis_7(redis: &RedisPool) -> Result<(), RedisError> {
    let info: String = redis.query(redis::cmd("INFO").arg("server")).await?;
    check_version(&info).map_err(|e| RedisError::Unavailable(e.to_string()))
}

/// Refuses a Redis older than 7 (see the module's documentation).
fn check_version(info: &str) -> RedisResult<()> {
    let version = info_field(info, "redis_version");
    let major = version.and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match major {
        Some(major) if major >= 7 => Ok(()),
        _ => Err((
            ErrorKind::ClientError,
            "Redis 7 or newer is required",
            format!("this server says redis_version {}", version.unwrap_or("(none)")),
        )
            .into()),
    }
}

/// The `run_id` of an `INFO server` reply: 40 hex characters.
fn run_id(info: &str) -> RedisResult<&str> {
    info_field(info, "run_id")
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
        .ok_or_else(|| (ErrorKind::TypeError, "INFO server has no run_id").into())
}

/// The value of `name` in an `INFO` reply (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_id_is_read_from_info_server() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:5f3c0e1a9b\r\ntcp_port:6379\r\n";
        assert_eq!(run_id(info).unwrap(), "5f3c0e1a9b");
        assert!(run_id("# Server\r\nredis_version:7.0.15\r\n").is_err());
        assert!(
            run_id("run_id:'); evil\r\n").is_err(),
            "only a plain id goes into a script"
        );
    }

    #[test]
    fn a_redis_older_than_7_is_refused() {
        assert!(check_version("redis_version:7.0.15\r\n").is_ok());
        assert!(check_version("redis_version:7.2.4\r\nrun_id:ab\r\n").is_ok());
        let err = check_version("redis_version:6.2.14\r\n").unwrap_err();
        assert!(err.to_string().contains("Redis 7 or newer"), "{err}");
        assert!(check_version("# Server\r\n").is_err());
    }

    #[test]
    fn each_script_names_the_run_id_once_and_gets_it_as_a_string() {
        for template in [
            include_str!("scripts/accept.lua"),
            include_str!("scripts/recent_read.lua"),
            include_str!("scripts/recent_fill.lua"),
            include_str!("scripts/membership.lua"),
            include_str!("scripts/create_chat.lua"),
        ] {
            assert_eq!(template.matches(PLACEHOLDER).count(), 1, "{template}");
            let text = RunScript::new(template).text_for("abc123", "n1");
            assert!(text.contains("local run_id = 'abc123'"), "{text}");
            assert!(!text.contains(PLACEHOLDER));
        }
    }

    #[test]
    fn each_load_has_its_own_text() {
        let script = RunScript::new("local run_id = __REDIS_RUN_ID__");
        assert_ne!(script.text_for("abc", "n1"), script.text_for("abc", "n2"));
    }
}
