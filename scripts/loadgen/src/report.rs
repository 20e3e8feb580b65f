//! What a run reports: one JSON object (printed as one line on stdout) and
//! a readable summary (stderr). Latencies are milliseconds with microsecond
//! resolution; rates are per second of the measured window.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Percentiles of a latency histogram recorded in nanoseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

fn ms(ns: f64) -> f64 {
    (ns / 1e3).round() / 1e3
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50) as f64),
            p90_ms: ms(h.value_at_quantile(0.90) as f64),
            p99_ms: ms(h.value_at_quantile(0.99) as f64),
            p999_ms: ms(h.value_at_quantile(0.999) as f64),
            max_ms: ms(h.max() as f64),
            mean_ms: ms(h.mean()),
        }
    }
}

/// A histogram for nanosecond latencies from 1 ns to 10 minutes at 3
/// significant digits; larger values are clamped to the top.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds")
}

/// CPU of one process (and its children) over the measured window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProcCpu {
    pub name: String,
    pub pid: u32,
    pub cpu_s: f64,
    /// cpu_s / window seconds: 1.0 is one core busy all the time.
    pub cores: f64,
}

/// The load tool's own CPU over the measured window.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SelfCpu {
    pub user_s: f64,
    pub sys_s: f64,
    pub cores: f64,
}

/// The whole machine's CPU over the measured window, in cores busy: the
/// watched processes, the load tool, and everything else (other work on a
/// shared machine makes figures noisy; this says how much there was).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MachineCpu {
    pub busy_cores: f64,
    /// busy − load tool − watched processes.
    pub other_cores: f64,
}

/// One phase: a fixed-rate run, or one step of `max` mode.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Phase {
    pub phase: u32,
    /// Offered rate, messages/s (all senders together).
    pub rate: f64,
    pub warmup_s: f64,
    pub window_s: f64,
    /// Messages scheduled in the whole phase (warmup included).
    pub scheduled: u64,
    /// Written to a socket.
    pub sent: u64,
    pub acked: u64,
    /// Answered with `error` (counted by code in `errors`).
    pub errored: u64,
    /// Scheduled but not written (the sender's connection was gone or its
    /// queue in the load tool was full).
    pub not_sent: u64,
    /// Scheduled, and still in a writer's queue in the load tool when the
    /// drain ended: scheduled − sent − not_sent.
    pub queued_at_end: u64,
    /// Sent, and neither acked nor refused by the end of the drain.
    pub unacked: u64,
    /// Recipient connections per message.
    pub fanout: f64,
    /// Messages sent within the window, per second.
    pub offered_msgs_per_s: f64,
    /// Messages actually written within the window, per second.
    pub sent_per_s: f64,
    /// Distinct deliveries received within the window, per second: a group
    /// message to 100 members counts as its 99 deliveries, a duplicate not.
    pub delivered_per_s: f64,
    /// Distinct deliveries of this phase's messages, received at any time:
    /// (message, expected recipient connection) pairs received.
    pub delivered: u64,
    /// Deliveries owed for acked messages (acked × fanout).
    pub expected_deliveries: u64,
    /// Acked messages that some expected recipient connection had not
    /// received by the end of the drain.
    pub lost_messages: u64,
    /// (acked message, expected recipient connection) pairs not received.
    pub missing_deliveries: u64,
    /// Receipts of a message by an expected recipient connection that had
    /// already received it.
    pub duplicate_deliveries: u64,
    /// Receipts by a connection the message was not owed to (the sending
    /// connection itself, a non-member), or naming no message of the phase.
    pub unexpected_deliveries: u64,
    /// Send (the schedule's time) → receipt, for messages sent in the window.
    pub latency: Latency,
    /// Send (the schedule's time) → ack.
    pub ack_latency: Latency,
    /// Schedule → written by the load tool: its own lateness. Large values
    /// mean the load tool, not the server, was the limit.
    pub send_lag: Latency,
    pub errors: BTreeMap<String, u64>,
    /// Seconds the drain took (until everything owed arrived, or its limit).
    pub drain_s: f64,
    pub loadgen_cpu: SelfCpu,
    pub processes: Vec<ProcCpu>,
    pub machine_cpu: MachineCpu,
    /// Whether this phase meets the `max` mode's bounds.
    pub pass: bool,
    /// Why not, when it does not.
    pub fail_reasons: Vec<String>,
}

impl Phase {
    /// Scheduled messages neither sent nor counted as not sent: still in
    /// the load tool's writer queues.
    pub fn queued(&self) -> u64 {
        self.scheduled.saturating_sub(self.sent + self.not_sent)
    }

    /// The `max` mode's test: p99 within the bound, and every scheduled
    /// message written, acked (no error) and delivered exactly once to
    /// every expected recipient connection and to no other.
    pub fn judge(&mut self, p99_bound_ms: f64, loadgen_lag_bound_ms: f64) {
        let mut why = Vec::new();
        if self.latency.count == 0 {
            why.push("no deliveries measured".to_string());
        }
        if self.latency.p99_ms > p99_bound_ms {
            why.push(format!("p99 {:.3} ms > {p99_bound_ms} ms", self.latency.p99_ms));
        }
        if self.lost_messages > 0 {
            why.push(format!(
                "{} messages lost ({} deliveries missing)",
                self.lost_messages, self.missing_deliveries
            ));
        }
        if self.duplicate_deliveries > 0 {
            why.push(format!("{} duplicate deliveries", self.duplicate_deliveries));
        }
        if self.unexpected_deliveries > 0 {
            why.push(format!(
                "{} unexpected deliveries (to a connection not owed the message)",
                self.unexpected_deliveries
            ));
        }
        if self.unacked > 0 {
            why.push(format!("{} messages not acked", self.unacked));
        }
        if self.errored > 0 {
            why.push(format!("{} sends refused", self.errored));
        }
        if self.not_sent > 0 {
            why.push(format!("{} messages not sent", self.not_sent));
        }
        let queued = self.queued();
        if queued > 0 {
            why.push(format!(
                "{queued} messages still queued in the load tool at the end of the drain"
            ));
        }
        if self.send_lag.p99_ms > loadgen_lag_bound_ms {
            why.push(format!(
                "load tool late: send lag p99 {:.3} ms > {loadgen_lag_bound_ms} ms",
                self.send_lag.p99_ms
            ));
        }
        self.pass = why.is_empty();
        self.fail_reasons = why;
    }
}

/// Result of the `connections` scenario.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Connections {
    pub requested: u64,
    pub opened: u64,
    pub failed: u64,
    pub failures: BTreeMap<String, u64>,
    pub concurrency: usize,
    pub open_s: f64,
    /// Connections opened per second of `open_s`.
    pub connect_per_s: f64,
    /// TCP connect + WebSocket handshake (the server checks the JWT).
    pub handshake: Latency,
    pub gateways: Vec<GatewayMemory>,
    /// Sum over the gateways of (RSS after − RSS before) / opened.
    pub bytes_per_connection: Option<f64>,
    pub loadgen_rss_before: Option<u64>,
    pub loadgen_rss_after: Option<u64>,
    /// Connections closed by the server while held.
    pub closed_while_held: u64,
    pub loadgen_cpu: SelfCpu,
    pub processes: Vec<ProcCpu>,
    pub machine_cpu: MachineCpu,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct GatewayMemory {
    pub pid: u32,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// Connections opened to this gateway, when the pids match the
    /// `--gateway` list one to one; else None.
    pub connections: Option<u64>,
    pub bytes_per_connection: Option<f64>,
}

/// Why `max` mode stopped stepping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoppedBy {
    /// A step failed: the ceiling is between it and the step before.
    FailedStep,
    /// --max-steps steps ran, all passing.
    MaxSteps,
    /// The next step's rate was past --max-rate.
    MaxRate,
    /// The next step would have scheduled more than --max-messages.
    MaxMessages,
}

impl StoppedBy {
    pub fn option(self) -> &'static str {
        match self {
            StoppedBy::FailedStep => "a failing step",
            StoppedBy::MaxSteps => "--max-steps",
            StoppedBy::MaxRate => "--max-rate",
            StoppedBy::MaxMessages => "--max-messages",
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub scenario: String,
    pub mode: String,
    pub label: Option<String>,
    pub started_unix_ms: u64,
    pub gateways: Vec<String>,
    pub config: serde_json::Value,
    pub nofile_limit: u64,
    /// Fixed mode: the one phase. Max mode: every step run, in order.
    pub phases: Vec<Phase>,
    /// Max mode: the fastest step that passed.
    pub last_passing: Option<Phase>,
    /// Max mode: whether a step failed, so that the step after
    /// `last_passing` is the ceiling. False when the run stopped at a limit
    /// of its own with every step passing: `last_passing` is then a lower
    /// bound. None in other modes.
    pub ceiling_found: Option<bool>,
    /// Max mode: why the steps stopped.
    pub stopped_by: Option<StoppedBy>,
    pub connections: Option<Connections>,
    /// Connections ended by the server or the network during the run, by
    /// reason (`close 1008`, `eof`, …).
    pub closes: BTreeMap<String, u64>,
    /// Acks and deliveries that arrived after their phase was over.
    pub stale: u64,
    /// Frames that were not ours or not understood.
    pub foreign: u64,
    /// `error` events that answered no send of ours, by code.
    pub other_errors: BTreeMap<String, u64>,
    /// Whole run, setup included.
    pub loadgen_cpu_total: SelfCpu,
    pub wall_s: f64,
    pub error: Option<String>,
}

fn lat_line(name: &str, l: &Latency) -> String {
    format!(
        "  {name:<12} p50 {:>9.3}  p90 {:>9.3}  p99 {:>9.3}  p99.9 {:>9.3}  max {:>9.3} ms  (n={})",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
    )
}

fn phase_text(p: &Phase, out: &mut String) {
    let _ = writeln!(
        out,
        "phase {} at {:.0} msg/s ({:.0} s measured after {:.0} s warmup): {}",
        p.phase,
        p.rate,
        p.window_s,
        p.warmup_s,
        if p.pass { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        out,
        "  offered {:.0} msg/s, delivered {:.0}/s (fanout {}), sent {} acked {} errored {} not sent {} queued at end {} unacked {}",
        p.offered_msgs_per_s,
        p.delivered_per_s,
        p.fanout,
        p.sent,
        p.acked,
        p.errored,
        p.not_sent,
        p.queued_at_end,
        p.unacked
    );
    let _ = writeln!(
        out,
        "  lost {} messages ({} deliveries missing), {} duplicate and {} unexpected deliveries, drain {:.2} s",
        p.lost_messages, p.missing_deliveries, p.duplicate_deliveries, p.unexpected_deliveries, p.drain_s
    );
    let _ = writeln!(out, "{}", lat_line("end-to-end", &p.latency));
    let _ = writeln!(out, "{}", lat_line("send→ack", &p.ack_latency));
    let _ = writeln!(out, "{}", lat_line("send lag", &p.send_lag));
    if !p.errors.is_empty() {
        let _ = writeln!(out, "  errors: {:?}", p.errors);
    }
    let mut cpu = format!(
        "  cpu (cores): loadgen {:.2} (user {:.1} s, sys {:.1} s)",
        p.loadgen_cpu.cores, p.loadgen_cpu.user_s, p.loadgen_cpu.sys_s
    );
    for pc in &p.processes {
        let _ = write!(cpu, ", {} {:.2}", pc.name, pc.cores);
    }
    let _ = write!(
        cpu,
        "; machine busy {:.2}, other work {:.2}",
        p.machine_cpu.busy_cores, p.machine_cpu.other_cores
    );
    let _ = writeln!(out, "{cpu}");
    if !p.fail_reasons.is_empty() {
        let _ = writeln!(out, "  fails: {}", p.fail_reasons.join("; "));
    }
}

impl Report {
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("report serializes")
    }

    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "loadgen {} {} mode {} against {}",
            self.version,
            self.scenario,
            self.mode,
            self.gateways.join(", ")
        );
        for p in &self.phases {
            phase_text(p, &mut out);
        }
        if self.mode == "max" {
            // A limit of the run's own, not a failing step, ended it.
            let limit = self.stopped_by.filter(|s| *s != StoppedBy::FailedStep);
            match (&self.last_passing, limit) {
                (Some(p), None) => {
                    let _ = writeln!(
                        out,
                        "max: last passing step {} at {:.0} msg/s: {:.0} deliveries/s, p99 {:.3} ms",
                        p.phase, p.rate, p.delivered_per_s, p.latency.p99_ms
                    );
                }
                (Some(p), Some(limit)) => {
                    let _ = writeln!(
                        out,
                        "max: last passing step {} at {:.0} msg/s: {:.0} deliveries/s, p99 {:.3} ms; \
                         no ceiling found: every step passed until {}, so this is a lower bound",
                        p.phase,
                        p.rate,
                        p.delivered_per_s,
                        p.latency.p99_ms,
                        limit.option()
                    );
                }
                (None, None) => {
                    let _ = writeln!(out, "max: no step passed");
                }
                (None, Some(limit)) => {
                    let _ = writeln!(out, "max: no step run (stopped by {})", limit.option());
                }
            }
        }
        if let Some(c) = &self.connections {
            let _ = writeln!(
                out,
                "connections: {} of {} opened in {:.2} s = {:.0}/s (concurrency {}), {} failed {:?}",
                c.opened, c.requested, c.open_s, c.connect_per_s, c.concurrency, c.failed, c.failures
            );
            let _ = writeln!(out, "{}", lat_line("handshake", &c.handshake));
            for g in &c.gateways {
                let _ = writeln!(
                    out,
                    "  gateway pid {}: RSS {:?} → {:?} bytes, {:?} connections, {:?} bytes/connection",
                    g.pid, g.rss_before, g.rss_after, g.connections, g.bytes_per_connection
                );
            }
            if let Some(b) = c.bytes_per_connection {
                let _ = writeln!(out, "  gateways: {:.0} bytes ({:.1} KiB) per connection", b, b / 1024.0);
            }
            let mut cpu = format!("  cpu (cores) while opening: loadgen {:.2}", c.loadgen_cpu.cores);
            for pc in &c.processes {
                let _ = write!(cpu, ", {} {:.2}", pc.name, pc.cores);
            }
            let _ = write!(
                cpu,
                "; machine busy {:.2}, other work {:.2}",
                c.machine_cpu.busy_cores, c.machine_cpu.other_cores
            );
            let _ = writeln!(out, "{cpu}");
        }
        let _ = writeln!(
            out,
            "loadgen total: {:.1} s wall, cpu user {:.1} s sys {:.1} s",
            self.wall_s, self.loadgen_cpu_total.user_s, self.loadgen_cpu_total.sys_s
        );
        if !self.closes.is_empty() {
            let _ = writeln!(out, "connections ended during the run: {:?}", self.closes);
        }
        if self.stale + self.foreign > 0 || !self.other_errors.is_empty() {
            let _ = writeln!(
                out,
                "late arrivals {}, foreign frames {}, other errors {:?}",
                self.stale, self.foreign, self.other_errors
            );
        }
        if let Some(e) = &self.error {
            let _ = writeln!(out, "error: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = new_histogram();
        for i in 1..=1000u64 {
            h.record(i * 1_000_000).unwrap(); // 1 ms .. 1000 ms
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 1000);
        // 3 significant digits: within 0.1 %.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(l.p50_ms, 500.0), "{l:?}");
        assert!(near(l.p90_ms, 900.0), "{l:?}");
        assert!(near(l.p99_ms, 990.0), "{l:?}");
        assert!(near(l.p999_ms, 999.0), "{l:?}");
        assert!(near(l.max_ms, 1000.0), "{l:?}");
        assert!(near(l.mean_ms, 500.5), "{l:?}");
    }

    #[test]
    fn microsecond_resolution_and_empty() {
        let mut h = new_histogram();
        h.record(123_456).unwrap(); // 0.123456 ms
        let l = Latency::from_histogram(&h);
        // Within the histogram's resolution (3 significant digits).
        assert!((l.p50_ms - 0.1235).abs() <= 0.001, "{l:?}");
        assert_eq!(Latency::from_histogram(&new_histogram()), Latency::default());
        // Out-of-range values clamp instead of failing.
        h.saturating_record(u64::MAX);
        assert!(Latency::from_histogram(&h).max_ms >= 600_000.0 * 0.999);
    }

    fn sample_phase() -> Phase {
        Phase {
            phase: 1,
            rate: 1000.0,
            warmup_s: 1.0,
            window_s: 10.0,
            latency: Latency {
                count: 10,
                p99_ms: 12.0,
                ..Latency::default()
            },
            ..Phase::default()
        }
    }

    #[test]
    fn judge_names_every_failure() {
        let mut p = sample_phase();
        p.judge(20.0, 50.0);
        assert!(p.pass, "{:?}", p.fail_reasons);
        p.latency.p99_ms = 25.0;
        p.lost_messages = 2;
        p.errored = 1;
        p.judge(20.0, 50.0);
        assert!(!p.pass);
        assert_eq!(p.fail_reasons.len(), 3, "{:?}", p.fail_reasons);
    }

    #[test]
    fn judge_fails_duplicates_unexpected_and_queued_sends() {
        let mut p = sample_phase();
        (p.scheduled, p.sent, p.acked) = (100, 100, 100);
        p.judge(20.0, 50.0);
        assert!(p.pass, "{:?}", p.fail_reasons);
        p.duplicate_deliveries = 1;
        p.judge(20.0, 50.0);
        assert!(!p.pass);
        assert_eq!(p.fail_reasons, ["1 duplicate deliveries"]);
        p.duplicate_deliveries = 0;
        p.unexpected_deliveries = 2;
        p.judge(20.0, 50.0);
        assert!(!p.pass);
        assert_eq!(p.fail_reasons.len(), 1);
        assert!(
            p.fail_reasons[0].starts_with("2 unexpected deliveries"),
            "{:?}",
            p.fail_reasons
        );
        // 3 sends neither written nor given up when the drain ended.
        p.unexpected_deliveries = 0;
        (p.sent, p.acked, p.not_sent) = (95, 95, 2);
        p.judge(20.0, 50.0);
        assert!(!p.pass);
        assert_eq!(
            p.fail_reasons,
            [
                "2 messages not sent",
                "3 messages still queued in the load tool at the end of the drain"
            ]
        );
    }

    fn sample_report(p: Phase) -> Report {
        Report {
            tool: "loadgen",
            version: "0.1.0",
            scenario: "group".into(),
            mode: "max".into(),
            label: None,
            started_unix_ms: 1,
            gateways: vec!["ws://127.0.0.1:8081".into()],
            config: serde_json::json!({"groups": 10}),
            nofile_limit: 20000,
            phases: vec![p.clone()],
            last_passing: Some(p),
            ceiling_found: Some(true),
            stopped_by: Some(StoppedBy::FailedStep),
            connections: None,
            closes: BTreeMap::new(),
            stale: 0,
            foreign: 0,
            other_errors: BTreeMap::new(),
            loadgen_cpu_total: SelfCpu::default(),
            wall_s: 12.0,
            error: None,
        }
    }

    #[test]
    fn a_max_run_stopped_by_its_own_limit_reports_a_lower_bound() {
        let mut p = sample_phase();
        p.pass = true;
        let mut r = sample_report(p);
        assert!(!r.text().contains("lower bound"));
        r.ceiling_found = Some(false);
        for (by, name, option) in [
            (StoppedBy::MaxSteps, "max-steps", "--max-steps"),
            (StoppedBy::MaxRate, "max-rate", "--max-rate"),
            (StoppedBy::MaxMessages, "max-messages", "--max-messages"),
        ] {
            r.stopped_by = Some(by);
            let v: serde_json::Value = serde_json::from_str(&r.json_line()).unwrap();
            assert_eq!(v["ceiling_found"], false);
            assert_eq!(v["stopped_by"], name);
            let text = r.text();
            assert!(text.contains("max: last passing step 1"), "{text}");
            assert!(
                text.contains(&format!("every step passed until {option}, so this is a lower bound")),
                "{text}"
            );
        }
        r.last_passing = None;
        assert!(r.text().contains("max: no step run (stopped by --max-messages)"));
    }

    #[test]
    fn json_report_shape() {
        let mut p = sample_phase();
        p.errors.insert("rate_limited".into(), 3);
        p.processes.push(ProcCpu {
            name: "gw1".into(),
            pid: 10,
            cpu_s: 5.0,
            cores: 0.5,
        });
        let r = sample_report(p);
        let line = r.json_line();
        assert!(!line.contains('\n'), "one line");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        for key in [
            "tool",
            "scenario",
            "mode",
            "config",
            "phases",
            "last_passing",
            "ceiling_found",
            "stopped_by",
            "connections",
            "loadgen_cpu_total",
            "nofile_limit",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        let ph = &v["phases"][0];
        for key in [
            "offered_msgs_per_s",
            "delivered_per_s",
            "lost_messages",
            "missing_deliveries",
            "duplicate_deliveries",
            "unexpected_deliveries",
            "queued_at_end",
            "unacked",
            "errors",
            "latency",
            "ack_latency",
            "send_lag",
            "loadgen_cpu",
            "processes",
            "pass",
        ] {
            assert!(ph.get(key).is_some(), "missing phases[0].{key}");
        }
        for key in ["count", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms"] {
            assert!(ph["latency"].get(key).is_some(), "missing latency.{key}");
        }
        assert_eq!(ph["errors"]["rate_limited"], 3);
        assert_eq!(ph["processes"][0]["name"], "gw1");
        assert_eq!(v["last_passing"]["latency"]["p99_ms"], 12.0);
        assert_eq!(v["ceiling_found"], true);
        assert_eq!(v["stopped_by"], "failed-step");
        assert!(r.text().contains("max: last passing step 1"));
    }
}
