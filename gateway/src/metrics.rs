//! Prometheus metrics: the recorder and its text rendering for `/metrics`.
//!
//! Labels are event types, error codes and close codes, never user or chat
//! ids (their number is unbounded).

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the process-wide recorder, labelling everything with `node`.
    pub fn install(node: &str) -> Metrics {
        let builder = PrometheusBuilder::new()
            .add_global_label("node", node)
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
            .expect("bucket list is not empty");
        let handle = match builder.install_recorder() {
            Ok(h) => h,
            // A second install in one process (tests) renders its own registry.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        Metrics { handle }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}
