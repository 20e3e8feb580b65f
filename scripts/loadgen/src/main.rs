//! `loadgen`: the chat service's load tool.
//!
//! Speaks the client contract (../../shared/protocol.md) to any deployment
//! through its public endpoints: WebSocket `GET /v1/ws` with `?token=`, and
//! `POST /v1/chats` for groups. Scenarios `private`, `group` and
//! `connections`; traffic at a fixed offered rate (open loop) or rising in
//! steps until a bound breaks (`--mode max`). Prints one JSON line on stdout
//! and a readable summary on stderr.
//!
//! Exit status: 0 when the run completed (in `--mode fixed`, with its phase
//! passing every check); 1 when it could not run (setup, connections); 2 when
//! a `--mode fixed` phase failed a check (a message lost, p99 over the bound,
//! …: the JSON says which); 3 at the hard deadline. A `max` run that
//! completes exits 0: finding the failing step is its purpose.
//!
//! Safety: raises its own RLIMIT_NOFILE; connects only to the addresses it
//! is given (loopback unless `--allow-non-loopback`); every loop is bounded
//! and a watchdog thread ends the process at a hard deadline.

mod body;
mod cli;
mod conn;
mod history;
mod report;
mod run;
mod schedule;
mod sys;
mod tracker;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use cli::{Cli, Common, Mode, Scenario};
use report::{Report, SelfCpu};

fn main() {
    let cli = Cli::parse();
    let (soft, hard) = match sys::raise_nofile() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("loadgen: cannot raise RLIMIT_NOFILE: {e}");
            (0, 0)
        }
    };
    let deadline = hard_deadline(&cli.scenario);
    std::thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            eprintln!("loadgen: hard deadline of {} s reached; exiting", deadline.as_secs());
            println!(
                "{}",
                serde_json::json!({"tool": "loadgen", "error": format!("hard deadline of {} s reached", deadline.as_secs())})
            );
            std::process::exit(3);
        })
        .expect("spawn the deadline thread");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(run_cli(cli, soft.min(hard)));
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

/// Planned time + the setup allowance + 30 s.
fn hard_deadline(s: &Scenario) -> Duration {
    let secs = match s {
        Scenario::Private { common, traffic, .. } | Scenario::Group { common, traffic, .. } => {
            let planned = match traffic.mode {
                Mode::Fixed => traffic.warmup + traffic.duration + traffic.drain,
                Mode::Max => traffic.max_steps as f64 * (traffic.step_warmup + traffic.step_secs + traffic.drain + 0.6),
            };
            common.setup_timeout + planned + 30.0
        }
        Scenario::Connections { hold, open_timeout, .. } => open_timeout + hold.max(1.0) + 30.0,
        Scenario::History(h) => 2.0 * h.setup_timeout + h.warmup + h.duration + 30.0,
    };
    Duration::from_secs_f64(secs.clamp(1.0, 7.0 * 24.0 * 3600.0))
}

async fn run_cli(cli: Cli, nofile: u64) -> i32 {
    if let Scenario::History(h) = &cli.scenario {
        return match history::run(h).await {
            Ok(()) => 0,
            Err(e) => {
                println!(
                    "{}",
                    serde_json::json!({"tool": "loadgen", "scenario": "history", "error": format!("{e:#}")})
                );
                eprintln!("loadgen history: {e:#}");
                1
            }
        };
    }
    let started = Instant::now();
    let started_unix_ms = sys::now_ns() / 1_000_000;
    let cpu0 = sys::self_cpu();
    let (scenario, mode, common, config) = describe(&cli.scenario);
    let mut report = Report {
        tool: "loadgen",
        version: env!("CARGO_PKG_VERSION"),
        scenario: scenario.into(),
        mode: mode.into(),
        label: common.label.clone(),
        started_unix_ms,
        gateways: common.gateways.clone(),
        config,
        nofile_limit: nofile,
        phases: Vec::new(),
        last_passing: None,
        ceiling_found: None,
        stopped_by: None,
        connections: None,
        closes: BTreeMap::new(),
        stale: 0,
        foreign: 0,
        other_errors: BTreeMap::new(),
        loadgen_cpu_total: SelfCpu::default(),
        wall_s: 0.0,
        error: None,
    };
    let result = drive(&cli.scenario, &common, &mut report).await;
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    let (u1, s1) = sys::self_cpu();
    let wall = started.elapsed().as_secs_f64();
    report.wall_s = (wall * 1000.0).round() / 1000.0;
    report.loadgen_cpu_total = SelfCpu {
        user_s: ((u1 - cpu0.0) * 1000.0).round() / 1000.0,
        sys_s: ((s1 - cpu0.1) * 1000.0).round() / 1000.0,
        cores: (((u1 - cpu0.0 + s1 - cpu0.1) / wall.max(1e-9)) * 1000.0).round() / 1000.0,
    };
    println!("{}", report.json_line());
    eprint!("{}", report.text());
    if result.is_err() {
        1
    } else if report.mode == "fixed" && report.phases.iter().any(|p| !p.pass) {
        2
    } else {
        0
    }
}

async fn drive(scenario: &Scenario, common: &Common, report: &mut Report) -> anyhow::Result<()> {
    let (endpoints, api) = run::endpoints(common).await?;
    let mut watch: Vec<(String, u32)> = common
        .gateway_pids
        .iter()
        .enumerate()
        .map(|(i, pid)| (format!("gw{}", i + 1), *pid))
        .collect();
    watch.extend(common.watch.iter().cloned());
    let deadline_secs = hard_deadline(scenario).as_secs();
    let ctx = run::Ctx {
        endpoints,
        api,
        common: common.clone(),
        shared: Arc::new(conn::Shared::new()),
        watch,
        token_exp: sys::now_ns() / 1_000_000_000 + deadline_secs + 3600,
    };
    let outcome = match scenario {
        Scenario::Private { traffic, pairs, .. } => run::private(&ctx, traffic, *pairs).await.map(|(o, _)| o),
        Scenario::Group {
            traffic,
            groups,
            size,
            senders_fraction,
            ..
        } => run::group(&ctx, traffic, *groups, *size, *senders_fraction)
            .await
            .map(|(o, _)| o),
        Scenario::Connections {
            connections,
            concurrency,
            hold,
            open_timeout,
            ..
        } => {
            let c = run::connections(&ctx, *connections, *concurrency, *hold, *open_timeout).await;
            report.closes = ctx.shared.closes();
            report.connections = Some(c?);
            return Ok(());
        }
        Scenario::History(_) => unreachable!("history is run before drive"),
    };
    report.closes = ctx.shared.closes();
    report.stale = ctx.shared.stale.load(Relaxed);
    report.foreign = ctx.shared.foreign.load(Relaxed);
    report.other_errors = ctx
        .shared
        .other_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let outcome = outcome?;
    report.phases = outcome.phases;
    report.last_passing = outcome.last_passing;
    report.ceiling_found = outcome.stopped_by.map(|s| s == report::StoppedBy::FailedStep);
    report.stopped_by = outcome.stopped_by;
    Ok(())
}

fn describe(s: &Scenario) -> (&'static str, &'static str, Common, serde_json::Value) {
    use serde_json::json;
    let traffic_json = |t: &cli::Traffic| {
        json!({
            "mode": match t.mode { Mode::Fixed => "fixed", Mode::Max => "max" },
            "rate": t.rate, "duration": t.duration, "warmup": t.warmup, "drain": t.drain,
            "body_bytes": t.body_bytes, "p99_bound_ms": t.p99_bound_ms, "step_secs": t.step_secs,
            "step_warmup": t.step_warmup, "factor": t.factor, "max_steps": t.max_steps,
            "max_rate": t.max_rate, "lag_bound_ms": t.lag_bound_ms,
        })
    };
    let mode = |t: &cli::Traffic| match t.mode {
        Mode::Fixed => "fixed",
        Mode::Max => "max",
    };
    let (scenario, mode, common, mut config) = match s {
        Scenario::Private { common, traffic, pairs } => {
            let mut c = traffic_json(traffic);
            c["pairs"] = json!(pairs);
            ("private", mode(traffic), common, c)
        }
        Scenario::Group {
            common,
            traffic,
            groups,
            size,
            senders_fraction,
        } => {
            let mut c = traffic_json(traffic);
            c["groups"] = json!(groups);
            c["size"] = json!(size);
            c["senders_fraction"] = json!(senders_fraction);
            ("group", mode(traffic), common, c)
        }
        Scenario::Connections {
            common,
            connections,
            concurrency,
            hold,
            open_timeout,
        } => (
            "connections",
            "open",
            common,
            json!({"connections": connections, "concurrency": concurrency, "hold": hold, "open_timeout": open_timeout}),
        ),
        Scenario::History(_) => unreachable!("history is run before describe"),
    };
    config["read_buffer"] = json!(common.read_buffer);
    (scenario, mode, common.clone(), config)
}
