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
