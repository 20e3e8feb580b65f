//! Running the scenarios: who connects where, groups over REST, the phases
//! of a traffic run (fixed rate, or `max` steps), and the connections
//! scenario.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{stream, StreamExt};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cli::{Common, Mode, Traffic};
use crate::conn::{self, open, reader, writer, ws_config, Endpoint, SendCmd, Shared, Ws};
use crate::report::{
    new_histogram, Connections, GatewayMemory, Latency, MachineCpu, Phase, ProcCpu, SelfCpu, StoppedBy,
};
use crate::schedule::{assign, Schedule};
use crate::sys::{self, ns_at, self_cpu};
use crate::tracker::{PhaseTracker, Recipients};

/// The URL namespace of RFC 4122: private chat ids are v5 UUIDs in it.
const URL_NAMESPACE: Uuid = Uuid::from_u128(0x6ba7b811_9dad_11d1_80b4_00c04fd430c8);

/// Queued sends per writer before the dispatcher counts them as not sent.
const WRITER_QUEUE: usize = 4096;

pub struct Ctx {
    pub endpoints: Vec<Endpoint>,
    pub api: String,
    pub common: Common,
    pub shared: Arc<Shared>,
    /// Processes whose CPU is reported: the gateways (gw1, gw2, … from
    /// --gateway-pid) and every --watch.
    pub watch: Vec<(String, u32)>,
    /// Token expiry, seconds since the epoch.
    pub token_exp: u64,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
}

pub fn mint(secret: &str, user: &Uuid, exp: u64) -> String {
    let now = sys::now_ns() / 1_000_000_000;
    let sub = user.to_string();
    encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: &sub,
            iat: now,
            exp,
        },
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// The private chat of two users (client contract, Chats). Computed here
/// from the contract rather than taken from `shared`, so the load tool
/// checks the server's reading of it instead of sharing it.
pub fn dm_chat(a: &Uuid, b: &Uuid) -> Uuid {
    let (a, b) = (a.to_string(), b.to_string());
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    Uuid::new_v5(&URL_NAMESPACE, format!("dm:{lo}:{hi}").as_bytes())
}

/// One sending connection.
#[derive(Debug, Clone, PartialEq)]
pub struct SenderSpec {
    pub conn: usize,
    /// `"to":"<user>"` or `"chat":"<chat>"`.
    pub target: String,
    /// The connections its messages are owed to (one per user here, so the
    /// sender has no other device to receive them).
    pub to: Recipients,
}

/// Who connects where and who sends to whom.
#[derive(Debug, Default)]
pub struct Population {
    pub users: Vec<Uuid>,
    pub gateway_of: Vec<usize>,
    pub senders: Vec<SenderSpec>,
    pub chats: Vec<Uuid>,
}

/// `pairs` pairs; pair p's users on gateways p and p+1 (mod n): different
/// gateways whenever there are two or more. Both send to each other.
pub fn private_population(pairs: usize, gateways: usize) -> Population {
    let mut p = Population::default();
    for i in 0..pairs {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        p.users.extend([a, b]);
        p.gateway_of.extend([i % gateways, (i + 1) % gateways]);
        p.senders.push(SenderSpec {
            conn: 2 * i,
            target: format!(r#""to":"{b}""#),
            to: Recipients::range_except(2 * i + 1..2 * i + 2, 2 * i),
        });
        p.senders.push(SenderSpec {
            conn: 2 * i + 1,
            target: format!(r#""to":"{a}""#),
            to: Recipients::range_except(2 * i..2 * i + 1, 2 * i + 1),
        });
        p.chats.push(dm_chat(&a, &b));
    }
    p
}

/// Senders per group: `fraction` of `size`, rounded, at least one.
pub fn senders_per_group(size: usize, fraction: f64) -> usize {
    ((size as f64 * fraction).round() as usize).clamp(1, size.max(1))
}

/// `groups` × `size` users, member m of group g on gateway (g·size + m) mod
/// n; the first `senders_per_group` members of each group send, ordered so
/// that consecutive messages go to different groups, each to the other
/// members' connections. `chats` are the created groups' ids.
pub fn group_population(groups: usize, size: usize, fraction: f64, gateways: usize, chats: &[Uuid]) -> Population {
    let mut p = Population::default();
    for g in 0..groups {
        for m in 0..size {
            p.users.push(Uuid::new_v4());
            p.gateway_of.push((g * size + m) % gateways);
        }
    }
    let per = senders_per_group(size, fraction);
    for m in 0..per {
        for (g, chat) in chats.iter().enumerate().take(groups) {
            p.senders.push(SenderSpec {
                conn: g * size + m,
                target: format!(r#""chat":"{chat}""#),
                to: Recipients::range_except(g * size..(g + 1) * size, g * size + m),
            });
        }
    }
    p.chats = chats.to_vec();
    p
}

/// Creates the groups over REST, member 0 of each as the creator.
async fn create_groups(ctx: &Ctx, pop: &Population, groups: usize, size: usize) -> anyhow::Result<Vec<Uuid>> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    let mut chats = Vec::with_capacity(groups);
    for g in 0..groups {
        let members = &pop.users[g * size..(g + 1) * size];
        let token = mint(&ctx.common.secret, &members[0], ctx.token_exp);
        let others: Vec<String> = members[1..].iter().map(|u| u.to_string()).collect();
        let resp = client
            .post(format!("{}/v1/chats", ctx.api))
            .bearer_auth(token)
            .json(
                &serde_json::json!({"title": format!("loadgen group {g}"), "visibility": "private", "members": others}),
            )
            .send()
            .await
            .with_context(|| format!("POST {}/v1/chats", ctx.api))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if status.as_u16() != 201 {
            bail!("POST /v1/chats answered {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body).context("chat creation answer")?;
        let id = v["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("no chat id in {body}"))?;
        chats.push(id);
    }
    Ok(chats)
}

/// Opens every user's connection, `connect_concurrency` at a time.
async fn connect_all(ctx: &Ctx, pop: &Population) -> anyhow::Result<Vec<Ws>> {
    let config = ws_config(ctx.common.read_buffer);
    let limit = Duration::from_secs_f64(ctx.common.connect_timeout);
    let mut results: Vec<(usize, Result<Ws, String>)> = stream::iter(0..pop.users.len())
        .map(|i| {
            let ep = &ctx.endpoints[pop.gateway_of[i]];
            let token = mint(&ctx.common.secret, &pop.users[i], ctx.token_exp);
            async move { (i, open(ep, &token, config, limit).await) }
        })
        .buffer_unordered(ctx.common.connect_concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|(i, _)| *i);
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut conns = Vec::with_capacity(results.len());
    for (_, r) in results {
        match r {
            Ok(ws) => conns.push(ws),
            Err(why) => *failures.entry(why).or_default() += 1,
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} connections failed: {failures:?}",
            failures.values().sum::<u64>(),
            pop.users.len()
        );
    }
    Ok(conns)
}

/// Every connection's reader and writer, running.
pub struct Running {
    /// Writer queues of the senders, by sender index.
    senders: Vec<mpsc::Sender<SendCmd>>,
    /// Writer queues of the other connections (closed at the end).
    others: Vec<mpsc::Sender<SendCmd>>,
    tasks: Vec<JoinHandle<()>>,
    /// Whom each sender's messages are owed to, by sender index.
    recipients: Vec<Recipients>,
}

fn start(conns: Vec<Ws>, pop: &Population, body_len: usize, shared: &Arc<Shared>) -> Running {
    let mut sender_of: Vec<Option<usize>> = vec![None; conns.len()];
    for (s, spec) in pop.senders.iter().enumerate() {
        sender_of[spec.conn] = Some(s);
    }
    let mut senders: Vec<Option<mpsc::Sender<SendCmd>>> = vec![None; pop.senders.len()];
    let mut others = Vec::new();
    let mut tasks = Vec::with_capacity(conns.len() * 2);
    for (i, ws) in conns.into_iter().enumerate() {
        let (sink, stream) = ws.split();
        let sender = sender_of[i];
        tasks.push(tokio::spawn(reader(stream, i, sender, shared.clone())));
        let (tx, rx) = mpsc::channel(if sender.is_some() { WRITER_QUEUE } else { 1 });
        let (me, target) = match sender {
            Some(s) => (s as u32, pop.senders[s].target.clone()),
            None => (u32::MAX, String::new()),
        };
        tasks.push(tokio::spawn(writer(sink, rx, me, target, body_len)));
        match sender {
            Some(s) => senders[s] = Some(tx),
            None => others.push(tx),
        }
    }
    Running {
        senders: senders
            .into_iter()
            .map(|s| s.expect("every sender has a connection"))
            .collect(),
        others,
        tasks,
        recipients: pop.senders.iter().map(|s| s.to).collect(),
    }
}

async fn stop(running: Running, shared: &Shared) {
    shared.stop.cancel();
    drop(running.senders);
    drop(running.others);
    let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(running.tasks)).await;
}

/// CPU counters at one instant.
struct Snapshot {
    at: Instant,
    user: f64,
    sys: f64,
    procs: Vec<Option<f64>>,
    machine_busy: Option<f64>,
}

fn snapshot(watch: &[(String, u32)]) -> Snapshot {
    let (user, sys) = self_cpu();
    Snapshot {
        at: Instant::now(),
        user,
        sys,
        procs: watch.iter().map(|(_, pid)| sys::tree_cpu_secs(*pid)).collect(),
        machine_busy: sys::machine_cpu().map(|(busy, _)| busy),
    }
}

fn cpu_between(a: &Snapshot, b: &Snapshot, watch: &[(String, u32)]) -> (SelfCpu, Vec<ProcCpu>, MachineCpu) {
    let secs = (b.at - a.at).as_secs_f64().max(1e-9);
    let user = b.user - a.user;
    let sys = b.sys - a.sys;
    let me = SelfCpu {
        user_s: round3(user),
        sys_s: round3(sys),
        cores: round3((user + sys) / secs),
    };
    let procs = watch
        .iter()
        .zip(a.procs.iter().zip(&b.procs))
        .filter_map(|((name, pid), (x, y))| {
            let cpu = y.as_ref()? - x.as_ref()?;
            Some(ProcCpu {
                name: name.clone(),
                pid: *pid,
                cpu_s: round3(cpu),
                cores: round3(cpu / secs),
            })
        })
        .collect::<Vec<ProcCpu>>();
    let machine = match (a.machine_busy, b.machine_busy) {
        (Some(x), Some(y)) => {
            let busy = (y - x) / secs;
            let known = me.cores + procs.iter().map(|p| p.cores).sum::<f64>();
            MachineCpu {
                busy_cores: round3(busy),
                other_cores: round3((busy - known).max(0.0)),
            }
        }
        _ => MachineCpu::default(),
    };
    (me, procs, machine)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs one phase, judges it against the traffic's bounds and prints its line.
async fn judged_phase(
    ctx: &Ctx,
    running: &Running,
    traffic: &Traffic,
    phase: u32,
    rate: f64,
    warmup: f64,
    window: f64,
) -> Phase {
    let mut p = run_phase(ctx, running, phase, rate, warmup, window, traffic.drain).await;
    p.judge(traffic.p99_bound_ms, traffic.lag_bound_ms);
    eprint!("{}", phase_line(&p));
    p
}

/// One phase at `rate` msgs/s: `warmup` s unmeasured, then `window` s
/// measured, then up to `drain` s for what is owed.
async fn run_phase(ctx: &Ctx, running: &Running, phase: u32, rate: f64, warmup: f64, window: f64, drain: f64) -> Phase {
    let length = Duration::from_secs_f64(warmup + window);
    let schedule = Schedule::new(rate, length);
    let n = running.senders.len() as u64;
    let plan: Vec<(u64, Recipients)> = (0..n)
        .map(|s| (schedule.count_for(s, n), running.recipients[s as usize]))
        .collect();
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + Duration::from_secs_f64(warmup);
    let window_end = start + length;
    let start_ns = ns_at(start);
    let tracker = Arc::new(PhaseTracker::new(
        phase,
        (ns_at(window_start), ns_at(window_end)),
        &plan,
        16,
    ));
    *ctx.shared.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(tracker.clone());

    let watch = ctx.watch.clone();
    let first = tokio::spawn(async move {
        tokio::time::sleep_until(window_start.into()).await;
        snapshot(&watch)
    });

    // The dispatcher: whatever is due by now goes out; then sleep until
    // the next message is due. Sends never wait for acks.
    tokio::time::sleep_until(start.into()).await;
    let total = schedule.total();
    let mut next = 0u64;
    while next < total {
        let due = schedule.due_by(start.elapsed());
        while next < due {
            let (s, k) = assign(next, n);
            let cmd = SendCmd {
                tracker: tracker.clone(),
                k: k as u32,
                sched_ns: start_ns + schedule.offset_of(next).as_nanos() as u64,
            };
            if running.senders[s as usize].try_send(cmd).is_err() {
                tracker.on_not_sent(1);
            }
            next += 1;
        }
        if next < total {
            tokio::time::sleep_until((start + schedule.offset_of(next)).into()).await;
        }
    }
    tokio::time::sleep_until(window_end.into()).await;
    let last = snapshot(&ctx.watch);
    let first = first.await.unwrap_or_else(|_| snapshot(&ctx.watch));
    let (loadgen_cpu, processes, machine_cpu) = cpu_between(&first, &last, &ctx.watch);

    let drain_start = Instant::now();
    let drain_limit = Duration::from_secs_f64(drain);
    while !tracker.settled(total) && drain_start.elapsed() < drain_limit {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let tally = tracker.tally();
    let errors = tracker.errors.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let scheduled_fanout: f64 = plan.iter().map(|&(c, to)| c as f64 * to.fanout() as f64).sum::<f64>();
    let sent = tracker.sent.load(Relaxed);
    let not_sent = tracker.not_sent.load(Relaxed);
    let fanout = if total > 0 {
        scheduled_fanout / total as f64
    } else {
        0.0
    };
    let mut result = Phase {
        phase,
        rate,
        warmup_s: warmup,
        window_s: window,
        scheduled: total,
        sent,
        acked: tracker.acked.load(Relaxed),
        errored: tracker.errored.load(Relaxed),
        not_sent,
        queued_at_end: 0,
        unacked: tally.unacked,
        fanout: round3(fanout),
        offered_msgs_per_s: rate,
        sent_per_s: round3(tracker.sent_in_window.load(Relaxed) as f64 / window),
        delivered_per_s: round3(tracker.delivered_in_window.load(Relaxed) as f64 / window),
        delivered: tracker.delivered.load(Relaxed),
        expected_deliveries: tracker.owed.load(Relaxed),
        lost_messages: tally.lost_messages,
        missing_deliveries: tally.missing_deliveries,
        duplicate_deliveries: tracker.duplicates.load(Relaxed),
        unexpected_deliveries: tracker.unexpected.load(Relaxed),
        latency: Latency::from_histogram(&tracker.e2e.merged()),
        ack_latency: Latency::from_histogram(&tracker.ack.merged()),
        send_lag: Latency::from_histogram(&tracker.lag.merged()),
        errors,
        drain_s: round3(drain_s),
        loadgen_cpu,
        processes,
        machine_cpu,
        pass: false,
        fail_reasons: Vec::new(),
    };
    result.queued_at_end = result.queued();
    result
}

/// What a traffic scenario yields.
pub struct TrafficOutcome {
    pub phases: Vec<Phase>,
    pub last_passing: Option<Phase>,
    /// Max mode: why the steps stopped.
    pub stopped_by: Option<StoppedBy>,
}

/// Sets up `pop` (connections), runs the phases, and closes everything.
pub async fn traffic(ctx: &Ctx, traffic: &Traffic, pop: Population) -> anyhow::Result<TrafficOutcome> {
    if pop.senders.is_empty() {
        bail!("nobody sends");
    }
    let setup = Duration::from_secs_f64(ctx.common.setup_timeout);
    let conns = tokio::time::timeout(setup, connect_all(ctx, &pop))
        .await
        .context("setup timed out")??;
    let running = start(conns, &pop, traffic.body_bytes, &ctx.shared);
    eprintln!(
        "loadgen: {} connections open, {} senders, fanout {}",
        pop.users.len(),
        pop.senders.len(),
        pop.senders[0].to.fanout()
    );
    let mut phases = Vec::new();
    let mut last_passing = None;
    let mut stopped_by = None;
    match traffic.mode {
        Mode::Fixed => {
            check_size(traffic, traffic.rate, traffic.warmup + traffic.duration)?;
            let p = judged_phase(
                ctx,
                &running,
                traffic,
                1,
                traffic.rate,
                traffic.warmup,
                traffic.duration,
            )
            .await;
            phases.push(p);
        }
        Mode::Max => {
            let mut rate = traffic.rate;
            stopped_by = Some(StoppedBy::MaxSteps);
            for step in 1..=traffic.max_steps {
                if let Some(limit) = step_limit(traffic, rate) {
                    eprintln!(
                        "loadgen: next rate {rate:.0} msg/s is past {}; stopping with every step passing",
                        limit.option()
                    );
                    stopped_by = Some(limit);
                    break;
                }
                let p = judged_phase(
                    ctx,
                    &running,
                    traffic,
                    step as u32,
                    rate,
                    traffic.step_warmup,
                    traffic.step_secs,
                )
                .await;
                let pass = p.pass;
                phases.push(p.clone());
                if !pass {
                    stopped_by = Some(StoppedBy::FailedStep);
                    break;
                }
                last_passing = Some(p);
                rate *= traffic.factor;
                // Let queues on every side empty before the next step.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    if stopped_by == Some(StoppedBy::MaxSteps) {
        eprintln!("loadgen: --max-steps reached with every step passing: the last step is a lower bound");
    }
    stop(running, &ctx.shared).await;
    Ok(TrafficOutcome {
        phases,
        last_passing,
        stopped_by,
    })
}

/// The limit of the run's own that forbids a `max` step at `rate`, if any.
fn step_limit(traffic: &Traffic, rate: f64) -> Option<StoppedBy> {
    if rate > traffic.max_rate {
        Some(StoppedBy::MaxRate)
    } else if check_size(traffic, rate, traffic.step_warmup + traffic.step_secs).is_err() {
        Some(StoppedBy::MaxMessages)
    } else {
        None
    }
}

fn check_size(traffic: &Traffic, rate: f64, secs: f64) -> anyhow::Result<()> {
    let n = rate * secs;
    if n > traffic.max_messages as f64 {
        bail!(
            "{n:.0} messages in one phase exceed --max-messages {}",
            traffic.max_messages
        );
    }
    if rate <= 0.0 || !rate.is_finite() {
        bail!("--rate must be positive");
    }
    Ok(())
}

fn phase_line(p: &Phase) -> String {
    format!(
        "loadgen: phase {} {:.0} msg/s → {:.0} deliveries/s, p99 {:.3} ms, ack p99 {:.3} ms, lost {}, errors {}: {}{}\n",
        p.phase,
        p.rate,
        p.delivered_per_s,
        p.latency.p99_ms,
        p.ack_latency.p99_ms,
        p.lost_messages,
        p.errored,
        if p.pass { "pass" } else { "fail" },
        if p.fail_reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", p.fail_reasons.join("; "))
        }
    )
}

pub async fn private(ctx: &Ctx, t: &Traffic, pairs: usize) -> anyhow::Result<(TrafficOutcome, Vec<Uuid>)> {
    let pop = private_population(pairs, ctx.endpoints.len());
    let chats = pop.chats.clone();
    write_chats(ctx, &chats)?;
    Ok((traffic(ctx, t, pop).await?, chats))
}

pub async fn group(
    ctx: &Ctx,
    t: &Traffic,
    groups: usize,
    size: usize,
    fraction: f64,
) -> anyhow::Result<(TrafficOutcome, Vec<Uuid>)> {
    if size < 2 {
        bail!("--size must be at least 2 (someone must receive)");
    }
    let n = ctx.endpoints.len();
    // Users first (the creators need tokens), then the groups, then the senders.
    let users_only = group_population(groups, size, fraction, n, &[]);
    let setup = Duration::from_secs_f64(ctx.common.setup_timeout);
    let chats = tokio::time::timeout(setup, create_groups(ctx, &users_only, groups, size))
        .await
        .context("creating groups timed out")??;
    let mut pop = group_population(groups, size, fraction, n, &chats);
    pop.users = users_only.users;
    write_chats(ctx, &chats)?;
    Ok((traffic(ctx, t, pop).await?, chats))
}

fn write_chats(ctx: &Ctx, chats: &[Uuid]) -> anyhow::Result<()> {
    if let Some(path) = &ctx.common.chats_out {
        let text: String = chats.iter().map(|c| format!("{c}\n")).collect();
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The connections scenario.
pub async fn connections(
    ctx: &Ctx,
    count: usize,
    concurrency: usize,
    hold: f64,
    open_timeout: f64,
) -> anyhow::Result<Connections> {
    let n = ctx.endpoints.len();
    // Tokens are made before the clock starts: the rate is the server's.
    let tokens: Vec<String> = (0..count)
        .map(|_| mint(&ctx.common.secret, &Uuid::new_v4(), ctx.token_exp))
        .collect();
    let config = ws_config(ctx.common.read_buffer);
    let limit = Duration::from_secs_f64(ctx.common.connect_timeout);
    let pids = &ctx.common.gateway_pids;
    let rss_before: Vec<Option<u64>> = pids.iter().map(|p| sys::vm_rss(*p)).collect();
    let loadgen_rss_before = sys::self_rss();

    let first = snapshot(&ctx.watch);
    let started = Instant::now();
    let mut handshake = new_histogram();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_gateway = vec![0u64; n];
    let mut tasks = Vec::with_capacity(count);
    let mut sinks = Vec::with_capacity(count);
    {
        let mut opened = stream::iter(0..count)
            .map(|i| {
                let ep = &ctx.endpoints[i % n];
                let token = &tokens[i];
                async move {
                    let t0 = Instant::now();
                    let r = open(ep, token, config, limit).await;
                    (i, r, t0.elapsed())
                }
            })
            .buffer_unordered(concurrency.max(1));
        let deadline = tokio::time::Instant::from(started + Duration::from_secs_f64(open_timeout));
        loop {
            let item = tokio::select! {
                item = opened.next() => item,
                _ = tokio::time::sleep_until(deadline) => {
                    eprintln!("loadgen: --open-timeout reached");
                    break;
                }
            };
            let Some((i, r, took)) = item else { break };
            match r {
                Ok(ws) => {
                    handshake.saturating_record(took.as_nanos() as u64);
                    per_gateway[i % n] += 1;
                    let (sink, stream) = ws.split();
                    sinks.push(sink);
                    tasks.push(tokio::spawn(reader(stream, i, None, ctx.shared.clone())));
                }
                Err(why) => *failures.entry(why).or_default() += 1,
            }
        }
    }
    let open_s = started.elapsed().as_secs_f64();
    let last = snapshot(&ctx.watch);
    let (loadgen_cpu, processes, machine_cpu) = cpu_between(&first, &last, &ctx.watch);
    let opened = sinks.len() as u64;
    let failed = count as u64 - opened;
    let not_tried = failed - failures.values().sum::<u64>();
    if not_tried > 0 {
        failures.insert("not tried (open timeout)".into(), not_tried);
    }

    // Let the gateways settle, then read their memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after: Vec<Option<u64>> = pids.iter().map(|p| sys::vm_rss(*p)).collect();
    let loadgen_rss_after = sys::self_rss();
    let one_to_one = pids.len() == n;
    let gateways: Vec<GatewayMemory> = pids
        .iter()
        .enumerate()
        .map(|(g, pid)| {
            let conns = one_to_one.then(|| per_gateway[g]);
            let delta = match (rss_before[g], rss_after[g]) {
                (Some(b), Some(a)) => Some(a as f64 - b as f64),
                _ => None,
            };
            GatewayMemory {
                pid: *pid,
                rss_before: rss_before[g],
                rss_after: rss_after[g],
                connections: conns,
                bytes_per_connection: match (delta, conns) {
                    (Some(d), Some(c)) if c > 0 => Some((d / c as f64).round()),
                    _ => None,
                },
            }
        })
        .collect();
    let total_delta: Option<f64> = gateways
        .iter()
        .map(|g| Some(g.rss_after? as f64 - g.rss_before? as f64))
        .sum();
    let bytes_per_connection = match total_delta {
        Some(d) if opened > 0 && !pids.is_empty() => Some((d / opened as f64).round()),
        _ => None,
    };
    if hold > 1.0 {
        tokio::time::sleep(Duration::from_secs_f64(hold - 1.0)).await;
    }
    let closed_while_held: u64 = ctx.shared.closes().values().sum();

    // Close: readers stop, every socket gets a close frame (bounded in time).
    ctx.shared.stop.cancel();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        stream::iter(sinks).for_each_concurrent(256, |mut sink| async move {
            use futures_util::SinkExt;
            let _ = sink.send(tokio_tungstenite::tungstenite::Message::Close(None)).await;
            let _ = sink.close().await;
        }),
    )
    .await;
    let _ = tokio::time::timeout(Duration::from_secs(5), futures_util::future::join_all(tasks)).await;

    Ok(Connections {
        requested: count as u64,
        opened,
        failed,
        failures,
        concurrency,
        open_s: round3(open_s),
        connect_per_s: round3(opened as f64 / open_s.max(1e-9)),
        handshake: Latency::from_histogram(&handshake),
        gateways,
        bytes_per_connection,
        loadgen_rss_before,
        loadgen_rss_after,
        closed_while_held,
        loadgen_cpu,
        processes,
        machine_cpu,
    })
}

/// Resolves the endpoints and the API base.
pub async fn endpoints(common: &Common) -> anyhow::Result<(Vec<Endpoint>, String)> {
    let mut eps = Vec::new();
    for g in &common.gateways {
        eps.push(conn::resolve(g, common.allow_non_loopback).await?);
    }
    let api = match &common.api {
        Some(a) => {
            let uri: tokio_tungstenite::tungstenite::http::Uri = a.parse().context("--api is not a URL")?;
            if uri.scheme_str() != Some("http") {
                bail!("--api must be an http:// URL");
            }
            let host = uri.host().context("--api has no host")?;
            conn::check_host(host, uri.port_u16().unwrap_or(80), common.allow_non_loopback).await?;
            a.trim_end_matches('/').to_string()
        }
        None => eps[0].http_base.clone(),
    };
    Ok((eps, api))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_pairs_straddle_gateways() {
        let p = private_population(3, 2);
        assert_eq!(p.users.len(), 6);
        assert_eq!(p.senders.len(), 6);
        for i in 0..3 {
            assert_ne!(p.gateway_of[2 * i], p.gateway_of[2 * i + 1]);
        }
        assert_eq!(p.senders[0].target, format!(r#""to":"{}""#, p.users[1]));
        assert_eq!(p.senders[1].target, format!(r#""to":"{}""#, p.users[0]));
        assert_eq!(p.chats[0], dm_chat(&p.users[1], &p.users[0]));
        // Each message is owed to the peer's connection only.
        let (to0, to1) = (p.senders[0].to, p.senders[1].to);
        assert_eq!(
            (to0.fanout(), to0.bit(1), to0.bit(0), to0.bit(2)),
            (1, Some(0), None, None)
        );
        assert_eq!((to1.fanout(), to1.bit(0), to1.bit(1)), (1, Some(0), None));
    }

    #[test]
    fn dm_chat_id_follows_the_contract() {
        // uuid v5 (URL namespace) of "dm:<smaller>:<larger>".
        let a: Uuid = "00000000-0000-4000-8000-000000000001".parse().unwrap();
        let b: Uuid = "00000000-0000-4000-8000-000000000002".parse().unwrap();
        let want = Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("dm:{a}:{b}").as_bytes());
        assert_eq!(dm_chat(&a, &b), want);
        assert_eq!(dm_chat(&b, &a), want);
        assert_eq!(URL_NAMESPACE, Uuid::NAMESPACE_URL);
    }

    #[test]
    fn groups_spread_over_gateways_and_senders_interleave() {
        let chats: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let p = group_population(3, 10, 0.2, 2, &chats);
        assert_eq!(p.users.len(), 30);
        assert_eq!(p.gateway_of.iter().filter(|&&g| g == 0).count(), 15);
        assert_eq!(p.senders.len(), 6);
        // Consecutive senders are in different groups.
        assert_eq!(p.senders[0].target, format!(r#""chat":"{}""#, chats[0]));
        assert_eq!(p.senders[1].target, format!(r#""chat":"{}""#, chats[1]));
        assert_eq!(p.senders[3].conn, 1);
        assert!(p.senders.iter().all(|s| s.to.fanout() == 9));
        // Sender 3 is member 1 of group 0: owed to members 0 and 2..10.
        let to = p.senders[3].to;
        assert_eq!(to, Recipients::range_except(0..10, 1));
        assert_eq!(
            (to.bit(0), to.bit(1), to.bit(2), to.bit(10)),
            (Some(0), None, Some(1), None)
        );
        assert_eq!(senders_per_group(100, 0.0), 1);
        assert_eq!(senders_per_group(100, 1.0), 100);
    }

    #[test]
    fn max_steps_stop_at_the_runs_own_limits() {
        let t = Traffic {
            mode: Mode::Max,
            rate: 100.0,
            duration: 30.0,
            warmup: 5.0,
            drain: 5.0,
            body_bytes: 100,
            p99_bound_ms: 50.0,
            step_secs: 8.0,
            step_warmup: 2.0,
            factor: 1.5,
            max_steps: 12,
            max_rate: 5_000.0,
            max_messages: 40_000,
            lag_bound_ms: 20.0,
        };
        assert_eq!(step_limit(&t, 3_000.0), None); // 30,000 messages
        assert_eq!(step_limit(&t, 4_500.0), Some(StoppedBy::MaxMessages)); // 45,000
        assert_eq!(step_limit(&t, 6_000.0), Some(StoppedBy::MaxRate));
    }

    #[test]
    fn tokens_verify_with_the_secret() {
        use jsonwebtoken::{decode, DecodingKey, Validation};
        let user = Uuid::new_v4();
        let exp = sys::now_ns() / 1_000_000_000 + 60;
        let token = mint("0123456789abcdef0123", &user, exp);
        let data = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"0123456789abcdef0123"),
            &Validation::new(Algorithm::HS256),
        )
        .unwrap();
        assert_eq!(data.claims["sub"], user.to_string());
        assert_eq!(data.claims["exp"], exp);
    }
}
