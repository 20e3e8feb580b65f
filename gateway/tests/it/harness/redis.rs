//! A throwaway `redis-server` on a free port, one per test (it starts in a
//! few milliseconds). Its data directory lives as long as the value, so
//! `stop()` then `restart()` on the same port brings back what the AOF kept.

use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{free_port, process::die_with_parent, TempDir};

/// How long Redis may take to answer PING after a (re)start, AOF replay
/// included.
const START_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Redis {
    port: u16,
    aof: bool,
    dir: TempDir,
    child: Option<Child>,
}

impl Redis {
    /// Redis without persistence.
    pub async fn start() -> Redis {
        Self::start_with(false).await
    }

    /// With `aof`: `appendonly yes`, `appendfsync always`, so every write
    /// acknowledged before a `stop()` (SIGKILL) is there after `restart()`.
    pub async fn start_with(aof: bool) -> Redis {
        let mut redis = Redis {
            port: 0,
            aof,
            dir: TempDir::new("redis"),
            child: None,
        };
        // The port was free when chosen; another process may take it first.
        for attempt in 1.. {
            redis.port = free_port();
            match redis.spawn_and_wait().await {
                Ok(()) => return redis,
                Err(e) if attempt < 5 && e.contains("Address already in use") => continue,
                Err(e) => panic!("starting redis-server: {e}"),
            }
        }
        unreachable!()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The same server over its unix socket (in its data directory).
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.dir.path().join("redis.sock").display())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the server (SIGKILL, no shutdown save) and waits for it to die.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same directory;
    /// returns once it answers PING (AOF loaded).
    pub async fn restart(&mut self) {
        self.stop().await;
        if let Err(e) = self.spawn_and_wait().await {
            panic!("restarting redis-server on port {}: {e}", self.port);
        }
    }

    /// A connection for tests that look at or change Redis directly.
    pub async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
        let client = ::redis::Client::open(self.url()).expect("a valid redis url");
        tokio::time::timeout(super::DEFAULT_TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .expect("connecting to redis timed out")
            .expect("connecting to redis")
    }

    /// Holds every write (scripts included) for `ms`; reads and PING are
    /// still served (`CLIENT PAUSE ms WRITE`).
    pub async fn pause_writes(&self, ms: u64) {
        let () = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(ms)
            .arg("WRITE")
            .query_async(&mut self.connection().await)
            .await
            .expect("CLIENT PAUSE");
    }

    /// PING over a raw socket; true on `+PONG` (not while loading the AOF).
    pub async fn ping(&self) -> bool {
        ping_raw(self.port).await
    }

    /// What the server wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("redis.log"))
            .map_err(|e| format!("opening redis.log: {e}"))?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(["--appendfsync", "always"])
            .arg("--unixsocket")
            .arg(self.dir.path().join("redis.sock"))
            .args(["--unixsocketperm", "700"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawning redis-server: {e} (install it: apt-get install redis-server)"))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Err(format!("redis-server exited ({status}):\n{}", self.log()));
            }
            if ping_raw(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop().await;
                return Err(format!("no PONG within {START_TIMEOUT:?}:\n{}", self.log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn ping_raw(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG"))
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
