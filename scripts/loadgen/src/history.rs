//! The `history` scenario: `GET /v1/chats/{chat}/messages?limit=L` (the
//! latest page) from C keep-alive HTTP clients for D seconds, closed loop,
//! against one gateway. Setup (unless `--chat` is given) creates a group,
//! sends N messages over one WebSocket (one at a time, each acked) and waits
//! until history on `--api` returns a full page.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::body::{parse_incoming, Incoming};
use crate::cli::HistoryArgs;
use crate::conn;
use crate::report::{new_histogram, Latency};
use crate::run::mint;
use crate::sys;

/// Runs the scenario; prints one JSON line (stdout) and a summary (stderr).
pub async fn run(a: &HistoryArgs) -> anyhow::Result<()> {
    let ep = conn::resolve(&a.gateway, a.allow_non_loopback).await?;
    let api = match &a.api {
        Some(api) => {
            let uri: tokio_tungstenite::tungstenite::http::Uri = api.parse().context("--api is not a URL")?;
            if uri.scheme_str() != Some("http") {
                bail!("--api must be an http:// URL");
            }
            conn::check_host(
                uri.host().context("--api has no host")?,
                uri.port_u16().unwrap_or(80),
                a.allow_non_loopback,
            )
            .await?;
            api.trim_end_matches('/').to_string()
        }
        None => ep.http_base.clone(),
    };
    let exp = sys::now_ns() / 1_000_000_000 + 24 * 3600;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(a.concurrency.max(1))
        .build()
        .context("HTTP client")?;
    let (chat, user) = match (a.chat, a.user) {
        (Some(c), Some(u)) => (c, u),
        (None, None) => {
            let user = Uuid::new_v4();
            let chat = setup(a, &ep, &api, &client, &mint(&a.secret, &user, exp)).await?;
            if let Some(path) = &a.chat_out {
                std::fs::write(path, format!("{chat} {user}\n")).with_context(|| format!("write {path:?}"))?;
            }
            (chat, user)
        }
        _ => bail!("--chat and --user go together"),
    };
    let token = mint(&a.secret, &user, exp);
    let url = format!("{api}/v1/chats/{chat}/messages?limit={}", a.limit);
    wait_full(&client, &url, &token, a.limit, Duration::from_secs_f64(a.setup_timeout)).await?;
    if a.setup_only {
        println!(
            "{}",
            serde_json::json!({"tool": "loadgen", "scenario": "history", "setup_only": true, "chat": chat, "user": user})
        );
        return Ok(());
    }
    let cpu0 = sys::self_cpu();
    let warm_end = Instant::now() + Duration::from_secs_f64(a.warmup);
    let end = warm_end + Duration::from_secs_f64(a.duration);
    let mut tasks = Vec::new();
    for _ in 0..a.concurrency.max(1) {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            closed_loop(client, url, token, warm_end, end).await
        }));
    }
    let mut hist = new_histogram();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut failures = std::collections::BTreeMap::<String, u64>::new();
    for t in tasks {
        let w = t.await.context("client task")?;
        hist.add(&w.hist).context("merge histograms")?;
        ok += w.ok;
        failed += w.failed;
        for (k, v) in w.failures {
            *failures.entry(k).or_default() += v;
        }
    }
    let (u1, s1) = sys::self_cpu();
    let rps = ok as f64 / a.duration.max(1e-9);
    let lat = Latency::from_histogram(&hist);
    let line = serde_json::json!({
        "tool": "loadgen", "version": env!("CARGO_PKG_VERSION"), "scenario": "history",
        "label": a.label, "api": api, "chat": chat, "limit": a.limit,
        "concurrency": a.concurrency, "warmup_s": a.warmup, "duration_s": a.duration,
        "ok": ok, "failed": failed, "failures": failures,
        "requests_per_s": (rps * 10.0).round() / 10.0, "latency_ms": lat,
        "loadgen_cpu_s": ((u1 - cpu0.0 + s1 - cpu0.1) * 1000.0).round() / 1000.0,
    });
    println!("{line}");
    eprintln!(
        "history {}: {} clients, {:.0} s: {:.1} req/s, ok {ok}, failed {failed}; latency ms p50 {} p90 {} p99 {} max {}",
        a.label.as_deref().unwrap_or(&api),
        a.concurrency,
        a.duration,
        rps,
        lat.p50_ms,
        lat.p90_ms,
        lat.p99_ms,
        lat.max_ms
    );
    if ok == 0 || failed > 0 {
        bail!("{failed} requests failed, {ok} succeeded");
    }
    Ok(())
}

async fn setup(
    a: &HistoryArgs,
    ep: &conn::Endpoint,
    api: &str,
    client: &reqwest::Client,
    token: &str,
) -> anyhow::Result<Uuid> {
    let other = Uuid::new_v4().to_string();
    let resp = client
        .post(format!("{api}/v1/chats"))
        .bearer_auth(token)
        .json(&serde_json::json!({"title": "loadgen history", "visibility": "private", "members": [other]}))
        .send()
        .await
        .with_context(|| format!("POST {api}/v1/chats"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if status.as_u16() != 201 {
        bail!("POST /v1/chats answered {status}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("chat creation answer")?;
    let chat: Uuid = v["id"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no chat id in {body}"))?;
    let limit = Duration::from_secs_f64(a.setup_timeout);
    let mut ws = conn::open(ep, token, conn::ws_config(64 * 1024), limit)
        .await
        .map_err(|e| anyhow::anyhow!("WebSocket to {}: {e}", ep.url))?;
    let pad = "x".repeat(a.body_bytes.saturating_sub(24));
    for i in 0..a.messages {
        let reference = format!("h{i}");
        let frame = serde_json::json!({"type": "send", "chat": chat, "ref": reference,
                                       "body": format!("history bench {i} {pad}")});
        ws.send(Message::text(frame.to_string())).await.context("send")?;
        loop {
            let msg = tokio::time::timeout(limit, ws.next())
                .await
                .context("no ack in time")?
                .context("connection closed")?
                .context("read")?;
            let Message::Text(text) = msg else { continue };
            match parse_incoming(&text) {
                Incoming::Ack { reference: Some(r) } if r == reference => break,
                Incoming::Error {
                    code,
                    reference: Some(r),
                } if r == reference => bail!("send {i}: error {code}"),
                _ => {}
            }
        }
    }
    let _ = ws.close(None).await;
    Ok(chat)
}

/// Polls until the page holds `limit` messages (PostgreSQL may lag the acks).
async fn wait_full(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    limit: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + within;
    loop {
        let resp = client.get(url).bearer_auth(token).send().await;
        let mut seen = None;
        if let Ok(r) = resp {
            if r.status().is_success() {
                if let Ok(v) = r.json::<serde_json::Value>().await {
                    seen = v["messages"].as_array().map(|m| m.len());
                }
            }
        }
        if seen == Some(limit) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("GET {url}: {seen:?} messages, not {limit}, after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Worker {
    hist: Histogram<u64>,
    ok: u64,
    failed: u64,
    failures: Vec<(String, u64)>,
}

async fn closed_loop(client: reqwest::Client, url: String, token: String, warm_end: Instant, end: Instant) -> Worker {
    let mut w = Worker {
        hist: new_histogram(),
        ok: 0,
        failed: 0,
        failures: Vec::new(),
    };
    let auth = format!("Bearer {token}");
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let result = match client.get(&url).header("authorization", &auth).send().await {
            Ok(r) if r.status().is_success() => r.bytes().await.map(|_| ()).map_err(|e| format!("body: {e}")),
            Ok(r) => Err(format!("http {}", r.status().as_u16())),
            Err(e) => Err(if e.is_timeout() {
                "timeout".into()
            } else {
                "connect/io".into()
            }),
        };
        if t0 < warm_end {
            continue;
        }
        match result {
            Ok(()) => {
                w.ok += 1;
                w.hist.saturating_record(t0.elapsed().as_nanos().max(1) as u64);
            }
            Err(reason) => {
                w.failed += 1;
                match w.failures.iter_mut().find(|(k, _)| *k == reason) {
                    Some(e) => e.1 += 1,
                    None => w.failures.push((reason, 1)),
                }
            }
        }
    }
    w
}
