//! The load tool end to end against `floor`, the in-memory reference
//! server: each scenario opens its connections, counts what arrives, and
//! reports a message that never arrives as lost.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SECRET: &str = "floor-test-secret";

/// A running `floor` on two free loopback ports, killed on drop.
struct Floor {
    child: Child,
    gateways: Vec<String>,
}

impl Floor {
    fn start(extra: &[&str]) -> Floor {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
                l.local_addr().unwrap().port()
            })
            .collect();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_floor"));
        cmd.args(["--secret", SECRET, "--threads", "1"]).args(extra);
        for p in &ports {
            cmd.args(["--listen", &format!("127.0.0.1:{p}")]);
        }
        let child = cmd.stderr(Stdio::null()).spawn().expect("start floor");
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &ports {
            while TcpStream::connect(("127.0.0.1", *p)).is_err() {
                assert!(Instant::now() < deadline, "floor did not listen on {p}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Floor {
            child,
            gateways: ports.iter().map(|p| format!("ws://127.0.0.1:{p}")).collect(),
        }
    }

    /// Runs `loadgen <args>` against both ports; its JSON line and exit code.
    fn loadgen(&self, args: &[&str]) -> (Value, i32) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_loadgen"));
        cmd.args(args).args(["--secret", SECRET]);
        for g in &self.gateways {
            cmd.args(["--gateway", g]);
        }
        let out = cmd.stderr(Stdio::null()).output().expect("run loadgen");
        let line = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let json = serde_json::from_str(&line).unwrap_or_else(|e| panic!("loadgen printed {line:?}: {e}"));
        (json, out.status.code().unwrap_or(-1))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const FIXED: [&str; 10] = [
    "--mode",
    "fixed",
    "--rate",
    "40",
    "--duration",
    "2",
    "--warmup",
    "1",
    "--drain",
    "2",
];

fn only_phase(report: &Value) -> &Value {
    let phases = report["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 1, "{report}");
    &phases[0]
}

/// The phase passed: messages were acked, and each reached every
/// recipient it was owed to (`fanout` of them) exactly once, and no one else.
fn every_message_arrived_once(p: &Value, fanout: f64) {
    assert_eq!(p["pass"], true, "{p}");
    assert_eq!(p["fanout"], fanout, "{p}");
    assert!(p["acked"].as_u64().unwrap() > 0, "{p}");
    assert_eq!(p["delivered"], p["expected_deliveries"], "{p}");
    for zero in [
        "lost_messages",
        "missing_deliveries",
        "duplicate_deliveries",
        "unexpected_deliveries",
    ] {
        assert_eq!(p[zero], 0, "{zero}: {p}");
    }
}

#[test]
fn group_messages_reach_every_other_member_once() {
    let floor = Floor::start(&[]);
    let mut args = vec!["group", "--groups", "2", "--size", "6", "--senders-fraction", "0.34"];
    args.extend(FIXED);
    let (report, code) = floor.loadgen(&args);
    assert_eq!(code, 0, "{report}");
    every_message_arrived_once(only_phase(&report), 5.0);
}

#[test]
fn private_messages_reach_the_peer_on_the_other_port() {
    let floor = Floor::start(&[]);
    let mut args = vec!["private", "--pairs", "4"];
    args.extend(FIXED);
    let (report, code) = floor.loadgen(&args);
    assert_eq!(code, 0, "{report}");
    every_message_arrived_once(only_phase(&report), 1.0);
}

#[test]
fn a_message_acked_but_never_delivered_is_reported_lost() {
    let floor = Floor::start(&["--drop-every", "10"]);
    let mut args = vec!["private", "--pairs", "4"];
    args.extend(FIXED);
    let (report, code) = floor.loadgen(&args);
    let p = only_phase(&report);
    assert_eq!(code, 2, "a fixed run whose phase failed exits 2: {report}");
    assert_eq!(p["pass"], false, "a phase with losses fails: {p}");
    assert!(p["fail_reasons"][0].as_str().unwrap().contains("lost"), "{p}");
    let lost = p["lost_messages"].as_u64().unwrap();
    let acked = p["acked"].as_u64().unwrap();
    assert!(
        lost > 0 && lost <= acked / 5,
        "about one in ten lost: {lost} of {acked}"
    );
    assert_eq!(p["missing_deliveries"], lost, "one recipient each: {p}");
}

#[test]
fn idle_connections_open_and_stay_open() {
    let floor = Floor::start(&[]);
    let (report, code) = floor.loadgen(&["connections", "--connections", "60", "--hold", "0.5"]);
    let c = &report["connections"];
    assert_eq!(code, 0, "{report}");
    assert_eq!(c["opened"], 60, "{c}");
    assert_eq!(c["failed"], 0, "{c}");
    assert_eq!(c["closed_while_held"], 0, "{c}");
}
