//! The operator's HTTP port: `GET /metrics` (Prometheus text) and `GET /healthz`.
//!
//! Owns the Prometheus recorder and its histogram buckets. It must never
//! serve data from the chats, nor take labels that grow with users or chats:
//! every label here has a fixed, small set of values.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;

/// Entries per batch.
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];
/// Seconds per committed transaction.
const WRITE_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide metrics recorder and returns the handle that
/// renders it. When a recorder is already installed (a second persister in
/// one test process), the handle renders an empty registry and a warning is
/// logged instead of failing.
/// Every metric is labelled `node` with the consumer name (the pod name on
/// Kubernetes).
pub fn install_recorder(node: &str) -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .add_global_label("node", node)
        .set_buckets_for_metric(Matcher::Full("persister_batch_size".into()), BATCH_SIZE_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("persister_write_seconds".into()), WRITE_SECONDS_BUCKETS));
    let builder = match builder {
        Ok(b) => b,
        // Only possible with empty bucket lists, which the constants are not.
        Err(e) => {
            tracing::warn!(error = %e, "histogram buckets refused; rendering summaries");
            PrometheusBuilder::new()
        }
    };
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::warn!(error = %e, "a metrics recorder is already installed; /metrics stays empty");
    }
    describe();
    handle
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "persister_jobs_stored_total",
        "Queue entries committed to PostgreSQL, by job kind."
    );
    describe_counter!("persister_batches_total", "Batches read from the stream.");
    describe_histogram!("persister_batch_size", Unit::Count, "Entries per batch read.");
    describe_histogram!(
        "persister_write_seconds",
        Unit::Seconds,
        "Duration of a committed PostgreSQL batch transaction."
    );
    describe_counter!(
        "persister_write_errors_total",
        "Batch transactions that failed (connection or data errors)."
    );
    describe_counter!(
        "persister_dead_letters_total",
        "Entries moved to chat:dead, by reason (refused, invalid, missing, version, kind, deleted)."
    );
    describe_counter!(
        "persister_write_fallbacks_total",
        "Batches whose direct COPY PostgreSQL refused (a stored id, a refused row), written again through the staging table."
    );
    describe_counter!(
        "persister_retries_total",
        "Refusals by PostgreSQL of an entry below PERSISTER_MAX_DELIVERIES (it is tried again)."
    );
    describe_gauge!(
        "persister_pending",
        "Entries read by some persister and not yet acknowledged (XPENDING)."
    );
    describe_gauge!(
        "persister_stream_length",
        "Entries in chat:queue, i.e. not yet stored, read or not (XLEN)."
    );
    describe_gauge!(
        "persister_oldest_pending_age_seconds",
        Unit::Seconds,
        "Age of the oldest entry not yet stored (the first in chat:queue), by the Redis clock; 0 when empty."
    );
}

/// Binds the metrics port; port 0 picks a free one (see `local_addr`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` fires.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, shutdown: CancellationToken) {
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            handle.render(),
            "content-type",
            "text/plain; version=0.0.4; charset=utf-8",
        )
    });
    let healthz = warp::path!("healthz").and(warp::get()).map(|| String::from("ok\n"));
    warp::serve(metrics.or(healthz))
        .incoming(listener)
        .graceful(async move { shutdown.cancelled().await })
        .run()
        .await;
}
