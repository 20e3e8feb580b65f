//! The product's processes: gateways and persisters, started from the
//! binaries cargo built, plus `persister migrate`.
//!
//! Each child announces its address on stdout (`listening on ADDR`,
//! `metrics on ADDR`); the harness reads that line (30 s at most) and keeps
//! everything else the child prints in memory, so a failing test can show
//! it. With `TEST_LOG` set, output is also forwarded as it comes. Children
//! are killed when their value drops and when the test process dies.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use super::test_log;

/// How long a process may take to print its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Output kept per process (the newest bytes).
const LOG_LIMIT: usize = 1 << 20;

/// The gateway binary cargo built for this test.
pub fn gateway_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gateway"))
}

/// The persister binary: the sibling of the gateway binary (scripts/test
/// builds the whole workspace before testing).
pub fn persister_binary() -> PathBuf {
    let path = gateway_binary().with_file_name("persister");
    assert!(
        path.exists(),
        "persister binary not found at {}: run `cargo build -p persister` first \
         (scripts/test builds the whole workspace)",
        path.display()
    );
    path
}

/// Runs `persister migrate` on `database_url`; panics with its output when
/// it fails or takes over a minute.
pub async fn migrate(database_url: &str) {
    let mut cmd = Command::new(persister_binary());
    cmd.arg("migrate")
        .env_clear()
        .envs(base_env())
        .env("DATABASE_URL", database_url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("`persister migrate` took over 60 s")
        .expect("spawning `persister migrate`");
    assert!(
        out.status.success(),
        "`persister migrate` failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a one-shot persister command (`persister <args>`, e.g.
/// `dead-letters replay --all`) with `env` and returns its output, whatever
/// its exit status; fails the test if it takes over a minute.
pub async fn run_persister(args: &[&str], env: Vec<(String, String)>) -> std::process::Output {
    let mut cmd = Command::new(persister_binary());
    cmd.args(args)
        .env_clear()
        .envs(base_env())
        .envs(env)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    die_with_parent_tokio(&mut cmd);
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("`persister {}` took over 60 s", args.join(" ")))
        .unwrap_or_else(|e| panic!("spawning `persister {}`: {e}", args.join(" ")))
}

/// A gateway process.
pub struct Gateway {
    /// Its `GATEWAY_NODE_ID`.
    pub name: String,
    pub addr: SocketAddr,
    pub process: ChildProcess,
}

impl Gateway {
    /// Starts the gateway binary with exactly `env` (plus PATH and logging)
    /// and waits for `listening on ADDR`.
    pub async fn start(name: &str, env: Vec<(String, String)>) -> Gateway {
        let (process, addr) = ChildProcess::start(name, gateway_binary(), &[], env, "listening on ").await;
        Gateway {
            name: name.to_string(),
            addr,
            process,
        }
    }

    /// `ws://ADDR/v1/ws`
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// `http://ADDR`
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A persister process.
pub struct Persister {
    /// Its `PERSISTER_CONSUMER`.
    pub name: String,
    pub metrics_addr: SocketAddr,
    pub process: ChildProcess,
}

impl Persister {
    /// Starts the persister binary with exactly `env` (plus PATH and
    /// logging) and waits for `metrics on ADDR`.
    pub async fn start(name: &str, env: Vec<(String, String)>) -> Persister {
        let (process, metrics_addr) = ChildProcess::start(name, persister_binary(), &[], env, "metrics on ").await;
        Persister {
            name: name.to_string(),
            metrics_addr,
            process,
        }
    }

    /// `http://ADDR/metrics`
    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics_addr)
    }

    /// The sum of the samples of counter or gauge `name` whose labels
    /// contain `label`, from its `/metrics` (0 when none yet), as
    /// `Stack::metric` reads a gateway's.
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let text = reqwest::get(self.metrics_url())
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("{}'s /metrics: {e}", self.name));
        let text = text
            .text()
            .await
            .unwrap_or_else(|e| panic!("{}'s /metrics: {e}", self.name));
        super::metric_sum(&text, name, label)
    }
}

macro_rules! deref_to_process {
    ($t:ty) => {
        impl Deref for $t {
            type Target = ChildProcess;
            fn deref(&self) -> &ChildProcess {
                &self.process
            }
        }
        impl DerefMut for $t {
            fn deref_mut(&mut self) -> &mut ChildProcess {
                &mut self.process
            }
        }
    };
}
deref_to_process!(Gateway);
deref_to_process!(Persister);

/// A child process with its output captured.
pub struct ChildProcess {
    name: String,
    child: Child,
    exit: Option<ExitStatus>,
    logs: Arc<Mutex<String>>,
}

impl ChildProcess {
    /// Spawns `program` and waits for a stdout line starting with `ready`;
    /// the rest of that line is the address. Panics with the process's
    /// output if it exits first or takes over `START_TIMEOUT`.
    pub async fn start(
        name: &str,
        program: PathBuf,
        args: &[&str],
        env: Vec<(String, String)>,
        ready: &'static str,
    ) -> (ChildProcess, SocketAddr) {
        let mut cmd = Command::new(&program);
        cmd.args(args)
            .env_clear()
            .envs(base_env())
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        die_with_parent_tokio(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", program.display()));
        let logs = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = oneshot::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        tokio::spawn(pump(name.to_string(), stdout, logs.clone(), Some((ready, ready_tx))));
        tokio::spawn(pump(name.to_string(), stderr, logs.clone(), None));
        let mut process = ChildProcess {
            name: name.to_string(),
            child,
            exit: None,
            logs,
        };

        let line = tokio::select! {
            line = ready_rx => line.ok(),
            _ = tokio::time::sleep(START_TIMEOUT) => {
                process.kill().await;
                panic!(
                    "{name} ({}) did not print `{ready}ADDR` within {START_TIMEOUT:?}:\n{}",
                    program.display(),
                    process.logs()
                );
            }
        };
        let Some(line) = line else {
            // Stdout closed before the line: the process is exiting.
            let status = process.wait(Duration::from_secs(5)).await;
            panic!(
                "{name} ({}) exited ({status}) before printing `{ready}ADDR`:\n{}",
                program.display(),
                process.logs()
            );
        };
        let addr = line.trim().parse().unwrap_or_else(|e| {
            panic!(
                "{name} printed `{ready}{line}`, not an address ({e}):\n{}",
                process.logs()
            )
        });
        (process, addr)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> Option<u32> {
        if self.exit.is_some() {
            None
        } else {
            self.child.id()
        }
    }

    /// Whether the harness has not seen the process exit (it was not
    /// killed, terminated or waited for). `try_exit` checks for real.
    pub fn is_running(&self) -> bool {
        self.exit.is_none() && self.child.id().is_some()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.start_kill();
            if let Ok(status) = self.child.wait().await {
                self.exit = Some(status);
            }
        }
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of our own, not yet reaped, child.
            unsafe { libc::kill(pid as i32, signal) };
        }
    }

    /// SIGTERM, then waits for the exit; a process still running after
    /// `timeout` is killed and the test fails.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(timeout).await
    }

    /// Waits for the process to exit; after `timeout` it is killed and the
    /// test fails with its output.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.exit {
            return status;
        }
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exit = Some(status);
                status
            }
            Ok(Err(e)) => panic!("waiting for {}: {e}", self.name),
            Err(_) => {
                self.kill().await;
                panic!(
                    "{} did not exit within {timeout:?}; killed it. Output:\n{}",
                    self.name,
                    self.logs()
                );
            }
        }
    }

    /// Everything the process printed so far (the last MiB).
    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").clone()
    }

    /// The last `lines` lines of output, headed by the process's name.
    pub fn logs_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        format!("--- {} ---\n{}\n", self.name, super::tail_lines(&logs, lines))
    }
}

/// Reads `from` line by line into `logs` (and to stderr with TEST_LOG);
/// the first line starting with a `ready` prefix is also sent, without the
/// prefix, to whoever waits for it.
async fn pump(
    name: String,
    from: impl AsyncRead + Unpin,
    logs: Arc<Mutex<String>>,
    mut ready: Option<(&'static str, oneshot::Sender<String>)>,
) {
    let forward = test_log().is_some();
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some((prefix, _)) = &ready {
            if let Some(rest) = line.strip_prefix(prefix) {
                let rest = rest.to_string();
                if let Some((_, tx)) = ready.take() {
                    let _ = tx.send(rest);
                }
            }
        }
        if forward {
            eprintln!("[{name}] {line}");
        }
        let mut logs = logs.lock().expect("log lock");
        logs.push_str(&line);
        logs.push('\n');
        if logs.len() > LOG_LIMIT {
            let mut cut = logs.len() - LOG_LIMIT / 2;
            while !logs.is_char_boundary(cut) {
                cut += 1;
            }
            logs.drain(..cut);
        }
    }
}

/// What every child gets besides the env it is given: PATH, backtraces,
/// no colours, and `RUST_LOG` (`warn`, or the filter in `TEST_LOG`).
fn base_env() -> Vec<(String, String)> {
    vec![
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        ),
        ("RUST_BACKTRACE".to_string(), "1".to_string()),
        // Output goes to a pipe and a buffer, not a terminal.
        ("NO_COLOR".to_string(), "1".to_string()),
        ("RUST_LOG".to_string(), test_log().unwrap_or_else(|| "warn".to_string())),
    ]
}

/// Makes the child get SIGKILL when the thread that spawned it dies, so a
/// test process killed with Ctrl-C leaves no server behind.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs in the hook.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn die_with_parent_tokio(cmd: &mut Command) {
    // SAFETY: as above.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}
