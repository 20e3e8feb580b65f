//! `gateway`: reads its configuration, starts, prints where it listens, and
//! serves until SIGTERM or SIGINT.

use anyhow::Context;
use gateway::config::Config;
use gateway::{telemetry, App};

/// jemalloc instead of glibc's malloc: glibc's allocator took about an
/// eighth of the gateway's CPU in a profile of private messages; with
/// jemalloc the gateways spend about a tenth less CPU per private message
/// and per new connection, at about the same memory per connection
/// (11.0-11.3 KiB; docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::from_env().context("configuration")?;
    // Built by hand rather than by `#[tokio::main]`, so the configuration
    // sets its number of threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
        .context("async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    telemetry::init(&config.log_filter, config.log_json, &config.node_id).context("RUST_LOG")?;
    let app = App::build(config).await.context("start")?;
    let addr = app.local_addr().context("local address")?;
    // Tests and scripts read this line to learn the port.
    println!("listening on {addr}");
    app.run(shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
