//! Command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Load tool for the chat service: drives gateways through the client contract and \
             prints one JSON line (stdout) and a summary (stderr)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// P pairs of users, the two of a pair on different gateways, each
    /// sending private messages to the other.
    Private {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        /// Pairs of users (2 connections each).
        #[arg(long, default_value_t = 1000)]
        pairs: usize,
    },
    /// G groups of S members spread round-robin over the gateways, a
    /// fraction of the members sending to their group.
    Group {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        traffic: Traffic,
        #[arg(long, default_value_t = 10)]
        groups: usize,
        /// Members per group (one connection each).
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// Fraction of each group's members that send (at least one).
        #[arg(long, default_value_t = 0.1)]
        senders_fraction: f64,
    },
    /// C idle connections opened as fast as allowed: connect rate, and the
    /// gateways' resident memory per connection (with --gateway-pid).
    Connections {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Handshakes in flight at once.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        /// Seconds to keep the connections open after the last one opened
        /// (RSS is read after 1 s of it).
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
        /// Give up opening after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        open_timeout: f64,
    },
    /// History reads: GET /v1/chats/{chat}/messages?limit=L (the latest
    /// page) from C keep-alive HTTP clients, closed loop, for D seconds.
    History(HistoryArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// The WebSocket URL setup sends through (and whose http base is the
    /// default --api).
    #[arg(long)]
    pub gateway: String,
    /// Base URL of the gateway to read history from (http://host:port).
    #[arg(long)]
    pub api: Option<String>,
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Reuse this chat (with --user, a member) instead of creating one.
    #[arg(long)]
    pub chat: Option<uuid::Uuid>,
    #[arg(long)]
    pub user: Option<uuid::Uuid>,
    /// Write "CHAT USER" of the chat created to this file.
    #[arg(long)]
    pub chat_out: Option<PathBuf>,
    /// Only set up (create, send, wait for a full page on --api); no reads.
    #[arg(long)]
    pub setup_only: bool,
    /// Messages sent at setup.
    #[arg(long, default_value_t = 300)]
    pub messages: usize,
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// Page size read.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Concurrent HTTP clients (one request in flight each).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Seconds allowed for setup and for history to show a full page.
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    #[arg(long)]
    pub allow_non_loopback: bool,
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// A gateway (or load balancer) WebSocket URL, e.g. ws://127.0.0.1:8081;
    /// repeat for several. Without a path, /v1/ws is used.
    #[arg(long = "gateway", required = true)]
    pub gateways: Vec<String>,
    /// Base URL of the REST API (creating groups); default: the first
    /// gateway's, over http.
    #[arg(long)]
    pub api: Option<String>,
    /// The HS256 secret tokens are signed with.
    #[arg(long, env = "CHAT_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Gateway process ids, in the order of --gateway: their RSS (connections
    /// scenario) and CPU are reported. Repeat for several.
    #[arg(long = "gateway-pid")]
    pub gateway_pids: Vec<u32>,
    /// Another process whose CPU (with its direct children's) to report, as
    /// NAME=PID, e.g. redis=1234 or postgres=<postmaster pid>. Repeatable.
    #[arg(long = "watch", value_parser = parse_watch)]
    pub watch: Vec<(String, u32)>,
    /// Allow gateway addresses that are not loopback.
    #[arg(long)]
    pub allow_non_loopback: bool,
    /// Seconds allowed for the setup (groups, connections).
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    /// Seconds allowed for one connection's TCP connect and handshake.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Handshakes in flight at once during setup.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Client read buffer per connection, bytes (tungstenite's default is
    /// 128 KiB). tungstenite zero-fills it before every read attempt, so a
    /// small one costs the load tool less CPU; frames here are ~300 bytes.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Write the chat ids used (one per line) to this file, e.g. to count
    /// persisted messages afterwards.
    #[arg(long)]
    pub chats_out: Option<PathBuf>,
    /// Free text copied to the report.
    #[arg(long)]
    pub label: Option<String>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One phase at --rate for --duration after --warmup.
    Fixed,
    /// Steps from --rate, ×--factor each, until one fails.
    Max,
}

#[derive(Args, Debug, Clone)]
pub struct Traffic {
    #[arg(long, value_enum, default_value = "fixed")]
    pub mode: Mode,
    /// Offered messages/s, all senders together (max mode: the first step).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured seconds (fixed mode).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds sent before measuring (fixed mode).
    #[arg(long, default_value_t = 5.0)]
    pub warmup: f64,
    /// Seconds allowed, after the last send, for acks and deliveries to arrive.
    #[arg(long, default_value_t = 5.0)]
    pub drain: f64,
    /// Message body length in bytes (at least the stamp, ~30 bytes).
    #[arg(long, default_value_t = 100)]
    pub body_bytes: usize,
    /// A step (max mode) or the phase (fixed mode, which then exits 2)
    /// fails when end-to-end p99 exceeds this.
    #[arg(long, default_value_t = 50.0)]
    pub p99_bound_ms: f64,
    /// Max mode: measured seconds per step.
    #[arg(long, default_value_t = 10.0)]
    pub step_secs: f64,
    /// Max mode: seconds sent before measuring, per step.
    #[arg(long, default_value_t = 2.0)]
    pub step_warmup: f64,
    /// Max mode: rate multiplier between steps.
    #[arg(long, default_value_t = 1.5)]
    pub factor: f64,
    /// Max mode: at most this many steps.
    #[arg(long, default_value_t = 12)]
    pub max_steps: usize,
    /// Never offer more than this many messages/s.
    #[arg(long, default_value_t = 2_000_000.0)]
    pub max_rate: f64,
    /// Never schedule more than this many messages in one phase (memory bound).
    #[arg(long, default_value_t = 20_000_000)]
    pub max_messages: u64,
    /// Max mode: a step also fails when the load tool's own send lag p99
    /// exceeds this (it, not the server, was the limit).
    #[arg(long, default_value_t = 20.0)]
    pub lag_bound_ms: f64,
}

fn parse_watch(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
    let pid = pid.parse().map_err(|_| format!("not a pid: {pid:?}"))?;
    if name.is_empty() {
        return Err("empty NAME".into());
    }
    Ok((name.to_string(), pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_group_run() {
        let cli = Cli::try_parse_from([
            "loadgen",
            "group",
            "--gateway",
            "ws://127.0.0.1:8081",
            "--gateway",
            "ws://127.0.0.1:8082",
            "--secret",
            "0123456789abcdef",
            "--mode",
            "max",
            "--watch",
            "redis=42",
            "--size",
            "50",
        ])
        .unwrap();
        match cli.scenario {
            Scenario::Group {
                common, traffic, size, ..
            } => {
                assert_eq!(common.gateways.len(), 2);
                assert_eq!(common.watch, vec![("redis".to_string(), 42)]);
                assert_eq!(traffic.mode, Mode::Max);
                assert_eq!(size, 50);
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_watch("nopid").is_err());
        assert!(parse_watch("=3").is_err());
    }
}
