//! The connection loop: hyper's HTTP/1.1 connection (with upgrades, for WebSocket) serving the
//! warp route tree, with the limits warp's own `serve` does not expose:
//! - at most `max_connections` connections at once; past it a connection gets a 503
//!   `too_many_connections` JSON answer and is closed;
//! - a connection must send its first byte, and then its whole header section, within
//!   `header_read_timeout_ms` (silent and slow-header clients are cut off);
//! - HTTP/1.1 only: an HTTP/2 prior-knowledge preface (h2c) is not valid HTTP/1 and is refused
//!   by hyper's parser, so no HTTP/2 connection (with its own streams and timers) is ever held;
//! - hyper refuses header sections past twice `max_header_bytes`/`max_headers` outright (an
//!   empty 431), the route tree answers 431 with JSON below that; bodies must arrive within
//!   `request_timeout_ms` (`super::body`: 408 otherwise).

use crate::config::Config;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The body answered to a connection past `max_connections`.
const TOO_MANY_CONNECTIONS: &str = r#"{"error":{"code":"too_many_connections","message":"this instance holds its connection limit (max_connections); retry shortly"}}"#;

/// The whole 503 answer to a connection past `max_connections`, written before closing it.
fn refusal() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{TOO_MANY_CONNECTIONS}",
        TOO_MANY_CONNECTIONS.len()
    )
    .into_bytes()
}

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
    let slots = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            conns.spawn(refuse(stream));
            continue;
        };
        let svc = TowerToHyperService::new(svc.clone());
        let cfg = Arc::clone(&config);
        let stop = shutdown.clone();
        conns.spawn(async move {
            let _slot = slot;
            let header_timeout = Duration::from_millis(cfg.header_read_timeout_ms);
            // hyper's header timer starts at the first byte: a silent socket is cut off here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_headers(cfg.max_headers * 2)
                .max_buf_size((cfg.max_header_bytes * 2).max(8192));
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
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

/// Answers a connection past the cap with 503 `too_many_connections` (bounded to 1 s) and
/// closes it.
async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&refusal()).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::refusal;

    #[test]
    fn the_refusal_is_a_complete_json_answer() {
        let bytes = refusal();
        let text = std::str::from_utf8(&bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let declared: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(declared, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}
