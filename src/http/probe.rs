//! Diagnosis routes for `voxpoll doctor` (`/v1/probe/*`). They let the doctor measure, from the
//! client's side of every proxy, what the path does to held requests, streamed responses and
//! large bodies. They hold no session state; holds are bounded by `probe_max_hold_ms`, all
//! probes together by [`MAX_PROBE_HOLDS`] concurrent requests, and with auth on they need the
//! caller's credentials (`voxpoll doctor --api-key` / `--token`). `probe_max_hold_ms = 0` disables them (404).
//!
//! - `GET /v1/probe/hold?ms=N` answers `{"held_ms"}` after `min(N, probe_max_hold_ms)` ms;
//! - `GET /v1/probe/stream?events=N&interval_ms=I` sends N server-sent events I ms apart
//!   (a buffering proxy delivers them all at the end);
//! - `GET /v1/probe/ws` upgrades, sends `{"type":"ready"}`, echoes text frames and pings every
//!   `ws_ping_ms`; closes after `probe_max_hold_ms` (426 `upgrade_required` without upgrade);
//! - `POST /v1/probe/echo` reads a body of up to `probe_max_body_bytes` and answers
//!   `{"bytes", "connection", "via", "forwarded_for"}` (the headers the proxy sent upstream).

use super::{with_state, AppState};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::filters::ws::{Message, Ws};
use warp::http::HeaderMap;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Concurrent probes of every kind (`hold`, `stream`, `echo`, `ws`); more get 429
/// `backpressure`.
pub const MAX_PROBE_HOLDS: usize = 32;

#[derive(Debug, Deserialize)]
struct HoldQuery {
    ms: u64,
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    events: Option<u32>,
    interval_ms: Option<u64>,
}

/// The `/v1/probe/*` routes.
pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let holds = Arc::new(Semaphore::new(MAX_PROBE_HOLDS));
    let enabled = state.config.probe_max_hold_ms > 0;
    let max_body = state.config.probe_max_body_bytes;
    let on = warp::any()
        .and_then(move || async move {
            if enabled {
                Ok(())
            } else {
                Err(warp::reject::not_found())
            }
        })
        .untuple_one();
    let with_holds = warp::any().map(move || holds.clone());
    // Every probe takes a slot before any other work (the echo's body is read after it);
    // with auth on, probes need the caller's credentials like every other route.
    let slot = super::caller(&state).and(with_holds.clone()).and_then(
        |_caller: Option<String>, holds: Arc<Semaphore>| async move {
            holds
                .try_acquire_owned()
                .map_err(|_| warp::reject::custom(crate::error::ProbeBusy(MAX_PROBE_HOLDS)))
        },
    );

    let hold = warp::path!("v1" / "probe" / "hold")
        .and(warp::get())
        .and(on)
        .and(warp::query::<HoldQuery>())
        .and(slot.clone())
        .and(with_state(state.clone()))
        .then(hold);
    let stream = warp::path!("v1" / "probe" / "stream")
        .and(warp::get())
        .and(on)
        .and(warp::query::<StreamQuery>())
        .and(slot.clone())
        .then(stream);
    let echo = warp::path!("v1" / "probe" / "echo")
        .and(warp::post())
        .and(on)
        .and(slot.clone())
        .and(warp::header::headers_cloned())
        .and(super::body(
            &state,
            super::BodyLimit {
                max: max_body,
                code: "body_too_large",
                name: "probe_max_body_bytes",
            },
        ))
        .map(echo);
    let ws = warp::path!("v1" / "probe" / "ws")
        .and(warp::get())
        .and(on)
        .and(slot)
        .and(super::ws::optional_ws())
        .and(with_state(state))
        .map(probe_ws);
    hold.or(stream).unify().or(echo).unify().or(ws).unify()
}

fn probe_ws(slot: OwnedSemaphorePermit, ws: Option<Ws>, state: AppState) -> Response {
    let Some(ws) = ws else {
        return super::ws::upgrade_required();
    };
    let ping = Duration::from_millis(state.config.ws_ping_ms);
    let life = Duration::from_millis(state.config.probe_max_hold_ms);
    ws.max_message_size(64 * 1024)
        .on_upgrade(move |socket| async move {
            let _slot = slot; // held for the socket's life
            let (mut sink, mut stream) = socket.split();
            if sink
                .send(Message::text(r#"{"type":"ready"}"#))
                .await
                .is_err()
            {
                return;
            }
            let deadline = tokio::time::sleep(life);
            tokio::pin!(deadline);
            let mut tick = tokio::time::interval(ping);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    _ = tick.tick() => {
                        if sink.send(Message::ping(Bytes::new())).await.is_err() { return; }
                    }
                    msg = stream.next() => match msg {
                        Some(Ok(m)) if m.is_text() => {
                            if sink.send(m).await.is_err() { return; }
                        }
                        Some(Ok(m)) if m.is_close() => break,
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
            let _ = sink.send(Message::close_with(1000u16, "probe over")).await;
        })
        .into_response()
}

async fn hold(q: HoldQuery, _slot: OwnedSemaphorePermit, state: AppState) -> Response {
    let ms = q.ms.min(state.config.probe_max_hold_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    warp::reply::json(&json!({ "held_ms": ms })).into_response()
}

async fn stream(q: StreamQuery, permit: OwnedSemaphorePermit) -> Response {
    let n = q.events.unwrap_or(5).clamp(1, 20);
    let interval = Duration::from_millis(q.interval_ms.unwrap_or(400).min(2000));
    let events = futures_util::stream::unfold((0u32, permit), move |(i, permit)| async move {
        if i >= n {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        let ev = warp::sse::Event::default().data(format!("{{\"i\":{i}}}"));
        Some((Ok::<_, Infallible>(ev), (i + 1, permit)))
    });
    warp::sse::reply(events).into_response()
}

fn echo(_slot: OwnedSemaphorePermit, headers: HeaderMap, body: Bytes) -> Response {
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    warp::reply::json(&json!({
        "bytes": body.len(),
        "connection": h("connection"),
        "via": h("via"),
        "forwarded_for": h("x-forwarded-for"),
    }))
    .into_response()
}
