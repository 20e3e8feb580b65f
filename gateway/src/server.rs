//! The HTTP server loop: accepts TCP connections and serves the routes with
//! hyper, upgrades included.
//!
//! Ours rather than `warp::serve` for one reason: a handshake must arrive
//! within `GATEWAY_HANDSHAKE_TIMEOUT_SECS` (hyper's header read timeout), so a
//! slowloris client trickling its headers byte by byte is cut off instead of
//! holding a socket forever. On shutdown it stops accepting and lets open
//! HTTP exchanges finish; upgraded WebSockets are the sessions' to close.
//! It also hands each request's pending upgrade to the routes in a form a
//! warp filter can take (`ws::upgrade`).

use std::convert::Infallible;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use warp::http::Request;
use warp::reply::Response;
use warp::Filter;

use crate::ws::upgrade::PendingUpgrade;

/// Serves `routes` on `listener` until `shutdown` fires and open exchanges end.
pub async fn serve<F>(listener: TcpListener, routes: F, handshake_timeout: Duration, shutdown: CancellationToken)
where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let routes = warp::service(routes.clone());
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            if let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() {
                request.extensions_mut().insert(PendingUpgrade::new(on_upgrade));
            }
            routes.clone().call(request)
        });
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}
