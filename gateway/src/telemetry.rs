//! Logs: tracing to stderr, as text or JSON, filtered by RUST_LOG.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber once; later calls do nothing.
pub fn init(json: bool, node_id: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // tungstenite logs every frame it reads at TRACE, `auth` tokens and
    // message bodies included: it never logs below DEBUG here.
    let filter = filter.add_directive("tungstenite=debug".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    if result.is_ok() {
        tracing::info!(node = node_id, "logging started");
    }
}
