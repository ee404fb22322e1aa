//! The connection loop: hyper (through hyper-util) serving the warp route tree, with the limits
//! warp's own `serve` does not expose. Headers must arrive within `header_read_timeout_ms`
//! (slow-header clients are cut off); hyper refuses header sections past twice
//! `max_header_bytes`/`max_headers` outright, the route tree answers 431 with JSON below that;
//! bodies must arrive within `request_timeout_ms` (`super::body`: 408 otherwise).

use crate::config::Config;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `state`'s routes on `listener` until `shutdown`; then stops accepting, lets open
/// connections finish their requests, and returns once they are done (or after 5 s).
pub async fn serve(
    listener: TcpListener,
    state: super::AppState,
    config: Arc<Config>,
    shutdown: CancellationToken,
) {
    let svc = warp::service(super::routes(state));
    let conns = TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let svc = TowerToHyperService::new(svc.clone());
        let cfg = Arc::clone(&config);
        let stop = shutdown.clone();
        conns.spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms))
                .max_headers(cfg.max_headers * 2)
                .max_buf_size((cfg.max_header_bytes * 2).max(8192));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), conns.wait()).await;
}
