//! The probes `voxpoll doctor` runs against a deployment, each on its own connection so one
//! hung probe does not hide the others' results.

use super::{BodyProbe, HoldProbe, StreamProbe, WsProbe, SIZES};
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

pub(super) type Health = (bool, Option<bool>, Option<u16>, Option<String>, Option<u64>);

pub(super) async fn probe_health(http: &reqwest::Client, base: &str, timeout: Duration) -> Health {
    let https = base.starts_with("https://");
    let mut best: Option<u64> = None;
    let mut status = None;
    for _ in 0..3 {
        let t0 = Instant::now();
        match http
            .get(format!("{base}/health"))
            .timeout(timeout)
            .send()
            .await
        {
            Ok(r) => {
                status = Some(r.status().as_u16());
                let _ = r.bytes().await;
                let ms = t0.elapsed().as_millis() as u64;
                best = Some(best.map_or(ms, |b| b.min(ms)));
            }
            Err(e) => {
                let msg = error_chain(&e);
                let tls = https.then(|| !looks_like_tls(&msg));
                return (false, tls, None, Some(msg), None);
            }
        }
    }
    let ok = status == Some(200);
    (ok, https.then_some(true), status, None, best)
}

/// `GET /ready`'s `file_descriptors` (the server's own fd budget, [`crate::fdlimit`]), when the
/// deployment answers it; `None` through a path that hides `/ready` or from an older server.
pub(super) async fn probe_ready(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Option<crate::fdlimit::FdBudget> {
    let r = http
        .get(format!("{base}/ready"))
        .timeout(timeout)
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    serde_json::from_value(v.get("file_descriptors")?.clone()).ok()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn looks_like_tls(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("certificate") || m.contains("tls") || m.contains("handshake")
}

pub(super) async fn probe_ws(
    base: &str,
    timeout: Duration,
    credentials: &reqwest::header::HeaderMap,
) -> WsProbe {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let url = format!("{}/v1/probe/ws", base.replacen("http", "ws", 1));
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            return WsProbe {
                outcome: "error".into(),
                status: None,
                close_code: None,
                ready_ms: None,
                detail: e.to_string(),
            }
        }
    };
    for (k, v) in credentials {
        request.headers_mut().insert(k.clone(), v.clone());
    }
    let t0 = Instant::now();
    let mk = |outcome: &str, status, close_code, ready_ms, detail: String| WsProbe {
        outcome: outcome.into(),
        status,
        close_code,
        ready_ms,
        detail,
    };
    let conn = tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await;
    let mut ws = match conn {
        Err(_) => {
            return mk(
                "silent",
                None,
                None,
                None,
                format!("no answer to the upgrade within {} s", timeout.as_secs()),
            )
        }
        Ok(Err(WsError::Http(resp))) => {
            let status = resp.status().as_u16();
            return mk(
                "refused",
                Some(status),
                None,
                None,
                format!("upgrade answered {status} instead of 101"),
            );
        }
        Ok(Err(e)) => return mk("error", None, None, None, error_chain(&e)),
        Ok(Ok((ws, _))) => ws,
    };
    // The server speaks first; then one echo round trip.
    let deadline = Instant::now() + timeout;
    let mut ready_ms = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Err(_) => {
                let what = if ready_ms.is_some() {
                    "no echo"
                } else {
                    "101 Switching Protocols, then no frame"
                };
                return mk(
                    "silent",
                    None,
                    None,
                    ready_ms,
                    format!("{what} within {} s", timeout.as_secs()),
                );
            }
            Ok(None) | Ok(Some(Err(_))) => {
                return mk(
                    "closed",
                    None,
                    Some(1006),
                    ready_ms,
                    "socket dropped without a close frame".into(),
                )
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                return mk(
                    "closed",
                    None,
                    Some(code),
                    ready_ms,
                    format!("closed with {code} before the probe finished"),
                );
            }
            Ok(Some(Ok(Message::Text(t)))) => {
                if ready_ms.is_none() && t.contains("ready") {
                    ready_ms = Some(t0.elapsed().as_millis() as u64);
                    if ws.send(Message::text("{\"type\":\"echo\"}")).await.is_err() {
                        return mk(
                            "closed",
                            None,
                            Some(1006),
                            ready_ms,
                            "send failed after ready".into(),
                        );
                    }
                } else if t.contains("echo") {
                    let _ = ws.close(None).await;
                    return mk(
                        "ok",
                        None,
                        None,
                        ready_ms,
                        "upgrade passed; frames flow both ways".into(),
                    );
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub(super) async fn probe_hold(http: &reqwest::Client, base: &str, asked_ms: u64) -> HoldProbe {
    let t0 = Instant::now();
    let r = http
        .get(format!("{base}/v1/probe/hold?ms={asked_ms}"))
        .timeout(Duration::from_millis(asked_ms + 15_000))
        .send()
        .await;
    let cut = |status| HoldProbe {
        asked_ms,
        survived: false,
        cut_at_ms: Some(t0.elapsed().as_millis() as u64),
        status,
    };
    match r {
        Ok(resp) if resp.status().is_success() => match resp.bytes().await {
            Ok(_) => HoldProbe {
                asked_ms,
                survived: true,
                cut_at_ms: None,
                status: Some(200),
            },
            Err(_) => cut(Some(200)),
        },
        Ok(resp) => cut(Some(resp.status().as_u16())),
        Err(_) => cut(None),
    }
}

pub(super) async fn probe_stream(
    http: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> StreamProbe {
    const EVENTS: u64 = 5;
    const INTERVAL_MS: u64 = 400;
    let t0 = Instant::now();
    let fail = |e: String| StreamProbe {
        buffered: None,
        first_event_ms: None,
        total_ms: None,
        error: Some(e),
    };
    let resp = match http
        .get(format!(
            "{base}/v1/probe/stream?events={EVENTS}&interval_ms={INTERVAL_MS}"
        ))
        // As browsers and WeChat do: compressing proxies (nginx `gzip on`) buffer then.
        .header("accept-encoding", "gzip")
        .timeout(timeout + Duration::from_millis(EVENTS * INTERVAL_MS))
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return fail(format!("HTTP {}", r.status().as_u16())),
        Err(e) => return fail(error_chain(&e)),
    };
    let mut body = resp.bytes_stream();
    let mut first = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(b) if !b.is_empty() && first.is_none() => {
                first = Some(t0.elapsed().as_millis() as u64)
            }
            Ok(_) => {}
            Err(e) => return fail(error_chain(&e)),
        }
    }
    let total = t0.elapsed().as_millis() as u64;
    let span = (EVENTS - 1) * INTERVAL_MS;
    let buffered = first.map(|f| f + span / 2 >= total && total >= span);
    StreamProbe {
        buffered,
        first_event_ms: first,
        total_ms: Some(total),
        error: None,
    }
}

pub(super) async fn probe_body(
    http: &reqwest::Client,
    base: &str,
    max: usize,
    timeout: Duration,
) -> BodyProbe {
    let mut out = BodyProbe {
        largest_ok: None,
        refused_at: None,
        refused_status: None,
    };
    let try_size = |size: usize| async move {
        let r = http
            .post(format!("{base}/v1/probe/echo"))
            .header("content-type", "application/octet-stream")
            .body(vec![0u8; size])
            .timeout(timeout)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(Some(resp.status().as_u16())),
            Err(_) => Err(None),
        }
    };
    for size in SIZES.into_iter().filter(|&s| s <= max) {
        match try_size(size).await {
            Ok(()) => out.largest_ok = Some(size),
            Err(status) => {
                out.refused_at = Some(size);
                out.refused_status = status;
                break;
            }
        }
    }
    // Narrow down to the largest body that passes, in 1 KiB steps: a proxy refusing 16 KB
    // (the first size tried) may still pass 8 KB chunks.
    if let Some(mut hi) = out.refused_at {
        let mut lo = out.largest_ok.unwrap_or(0);
        while hi - lo > 1024 {
            let mid = (lo + (hi - lo) / 2) / 1024 * 1024;
            let mid = mid.max(lo + 1024);
            match try_size(mid).await {
                Ok(()) => lo = mid,
                Err(status) => {
                    hi = mid;
                    out.refused_status = status;
                }
            }
        }
        out.largest_ok = (lo > 0).then_some(lo);
        out.refused_at = Some(hi);
    }
    out
}
