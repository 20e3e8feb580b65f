//! Operations (contract: Operations; close code 1001): health, readiness
//! and metrics endpoints, and a clean shutdown on SIGTERM.

use std::time::Duration;

use crate::harness::{self, Stack, StackOptions, DEFAULT_TIMEOUT};

/// The grace period the shutdown test gives the gateway.
const GRACE_SECS: u64 = 5;

fn one_gateway(env: Vec<(String, String)>) -> StackOptions {
    StackOptions {
        gateways: 1,
        persister: false,
        env,
        ..StackOptions::default()
    }
}

/// Checks that `text` is in the Prometheus text format: comments, or
/// `name{labels} value`. Returns the metric names of the samples.
fn prometheus_samples(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "not a metric name: {line:?}"
        );
        let rest = &line[name_end..];
        let rest = match rest.strip_prefix('{') {
            Some(labels) => &labels[labels.rfind('}').unwrap_or_else(|| panic!("unclosed labels: {line:?}")) + 1..],
            None => rest,
        };
        let value = rest
            .split_whitespace()
            .next()
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "not a number: {value:?} in {line:?}");
        names.push(name.to_string());
    }
    names
}

#[tokio::test]
async fn a_gateway_serves_health_readiness_and_metrics_without_a_token() {
    let stack = Stack::start(one_gateway(vec![])).await;
    let api = stack.http(0);
    // Some traffic, so there is something to count.
    let user = harness::user();
    let mut client = stack.connect(0, user).await;
    client.ping().await;
    client.send_message_to(user, "counted").await;

    let (status, body) = api.get_text("/healthz").await;
    assert_eq!(status, 200, "/healthz: {body}");
    let (status, body) = api.get_text("/readyz").await;
    assert_eq!(status, 200, "/readyz: {body}");
    let (status, body) = api.get_text("/metrics").await;
    assert_eq!(status, 200, "/metrics: {body}");
    let names = prometheus_samples(&body);
    assert!(
        names.iter().any(|n| n.starts_with("gateway_")),
        "no gateway_ metric in /metrics:\n{body}"
    );
}

#[tokio::test]
async fn sigterm_closes_open_sockets_with_1001_and_the_gateway_exits_cleanly() {
    let mut stack = Stack::start(one_gateway(vec![(
        "GATEWAY_DRAIN_SECS".to_string(),
        GRACE_SECS.to_string(),
    )]))
    .await;
    let (alice, bob) = (harness::user(), harness::user());
    let mut alice_0 = stack.connect(0, alice).await;
    let mut bob_0 = stack.connect(0, bob).await;
    alice_0.ping().await;
    bob_0.send_message_to(alice, "before the shutdown").await;
    alice_0.expect("message", DEFAULT_TIMEOUT).await;

    stack.gateways[0].signal(libc::SIGTERM);
    let guard = Duration::from_secs(GRACE_SECS + 2);
    for (who, client) in [("Alice", &mut alice_0), ("Bob", &mut bob_0)] {
        let closed = client.expect("__close", guard).await;
        assert_eq!(closed["code"], 1001, "{who}: {closed}");
    }
    let status = stack.gateways[0].wait(guard).await;
    assert_eq!(status.code(), Some(0), "the gateway exited with {status}");
}

/// libfaketime from Debian's `libfaketime` package (scripts/test installs
/// it), in the machine's multiarch folder: preloaded into a gateway, it
/// shifts that gateway's wall clock and nothing else on the machine.
fn libfaketime() -> String {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|dir| dir.path().join("faketime/libfaketimeMT.so.1"))
        .find(|lib| lib.exists())
        .map(|lib| lib.display().to_string())
        .expect("no /usr/lib/*/faketime/libfaketimeMT.so.1: run scripts/test, or apt-get install libfaketime")
}

/// Starts one more gateway of `stack` whose wall clock runs `shift` (a
/// libfaketime offset such as "-15s") from the machine's; its timers keep
/// the true monotonic clock.
async fn add_gateway_with_clock(stack: &mut Stack, shift: &str) -> usize {
    let libfaketime = libfaketime();
    stack
        .add_gateway(&[
            ("LD_PRELOAD", libfaketime.as_str()),
            ("FAKETIME", shift),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ])
        .await
}

#[tokio::test]
async fn a_gateway_whose_clock_lags_redis_past_the_accept_deadline_is_not_ready_and_says_why() {
    let mut stack = Stack::start(one_gateway(vec![])).await;
    // 15 s behind: past the 10 s deadline. 6 s behind: within it.
    let lagging = add_gateway_with_clock(&mut stack, "-15s").await;
    let slightly_behind = add_gateway_with_clock(&mut stack, "-6s").await;
    let (alice, bob) = (harness::user(), harness::user());

    let (status, body) = stack.http(lagging).get_text("/readyz").await;
    assert_eq!(status, 503, "/readyz of the gateway 15 s behind: {body}");
    assert!(
        body.contains("clock") && body.contains("behind"),
        "/readyz says why: {body}"
    );
    let offset = stack.metric(lagging, "gateway_clock_offset_seconds", "").await;
    assert!(
        (14.0..16.0).contains(&offset),
        "gateway_clock_offset_seconds of the gateway 15 s behind: {offset}"
    );
    // What readiness guards against: the accept deadline refuses its sends.
    let mut on_lagging = stack.connect(lagging, alice).await;
    let reply = on_lagging
        .request(serde_json::json!({ "type": "send", "to": bob.to_string(), "body": "stamped 15 s late" }))
        .await;
    assert_eq!(
        reply["code"], "unavailable",
        "a send through the gateway 15 s behind: {reply}"
    );
    assert!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("after it was sent")),
        "refused by the accept deadline: {reply}"
    );

    // Behind by less than the deadline, a gateway still serves: ready,
    // its offset shown, its sends accepted.
    let (status, body) = stack.http(slightly_behind).get_text("/readyz").await;
    assert_eq!(status, 200, "/readyz of the gateway 6 s behind: {body}");
    let offset = stack.metric(slightly_behind, "gateway_clock_offset_seconds", "").await;
    assert!(
        (5.0..7.0).contains(&offset),
        "gateway_clock_offset_seconds of the gateway 6 s behind: {offset}"
    );
    let mut on_slightly_behind = stack.connect(slightly_behind, alice).await;
    on_slightly_behind.send_message_to(bob, "stamped 6 s late").await;

    // The gateway with a true clock: ready, its offset near zero.
    let (status, body) = stack.http(0).get_text("/readyz").await;
    assert_eq!(status, 200, "/readyz of the on-time gateway: {body}");
    let offset = stack.metric(0, "gateway_clock_offset_seconds", "").await;
    assert!(
        offset.abs() < 1.0,
        "gateway_clock_offset_seconds of the on-time gateway: {offset}"
    );
    let mut on_time = stack.connect(0, alice).await;
    on_time.send_message_to(bob, "stamped on time").await;
}
