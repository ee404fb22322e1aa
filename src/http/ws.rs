//! WebSocket transport on the same session model as the HTTP routes:
//! `GET /v1/sessions/{id}/ws?after=K` (token in `X-Session-Token` or `?session_token=`).
//!
//! The socket carries exactly what the HTTP routes carry, so a client may switch transport at any
//! time and resume with its cursor and next seq; duplicates are answered as duplicates.
//!
//! Server → client, text frames (JSON):
//! - `{"type":"ready","session_id","cursor","status","epoch","max_chunk_bytes","ping_ms"}` at once
//!   after the upgrade (a client that never sees it is behind a proxy that swallows the socket);
//! - `{"type":"events", ...}` with the fields of a poll answer (`events`, `next_cursor`, `status`,
//!   `epoch`, `done`), pushed as events are appended; after `done` the server closes with 1000;
//! - `{"type":"ack","seq","acked_seq","duplicate"}` per chunk;
//! - `{"type":"error","seq","status","error":{"code","message"},"retry_after_ms"}` for a refused
//!   chunk or message (same codes and HTTP statuses as the HTTP routes; the socket stays open);
//! - `{"type":"pong"}`; and WebSocket pings every `ws_ping_ms`, so proxies with a read timeout
//!   do not cut a quiet socket.
//!
//! Client → server:
//! - binary frame = one chunk: 4-byte big-endian `seq`, 1 flag byte (bit 0 = last), the audio
//!   bytes (at most `max_chunk_bytes`; a frame over twice that closes the socket with 1009);
//! - text `{"type":"finish"}`, `{"type":"cancel"}`, `{"type":"ping"}`, and
//!   `{"type":"finalize"[, "seq": N]}` (answered `{"type":"finalized","after_seq":N}`).

use super::{respond, session_ref, with_state, AppState, SessionRef};
use crate::error::ApiError;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::sync::mpsc;
use warp::filters::ws::{Message, WebSocket, Ws};
use warp::reply::Response;
use warp::{Filter, Reply};

/// Bytes before the audio in a chunk frame: seq (u32 BE) and flags.
pub const CHUNK_HEADER_BYTES: usize = 5;

#[derive(Debug, Deserialize)]
struct WsQuery {
    after: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ClientMessage {
    #[serde(rename = "type")]
    kind: String,
    /// `finalize` only: end the sentence after this chunk (default: the highest contiguous).
    seq: Option<u64>,
}

/// `GET /v1/sessions/{id}/ws`.
pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    session_ref(warp::path!("v1" / "sessions" / String / "ws").and(warp::get()))
        .and(warp::query::<WsQuery>())
        .and(optional_ws())
        .and(with_state(state))
        .then(upgrade)
}

async fn upgrade(r: SessionRef, q: WsQuery, ws: Option<Ws>, state: AppState) -> Response {
    let SessionRef { id, token } = r;
    // Unknown session or wrong token: a plain HTTP error, before any upgrade.
    if let Err(e) = state.sessions.info(&id, token.as_deref()).await {
        return respond::<Response>(Err(e.into()));
    }
    let Some(ws) = ws else {
        return upgrade_required();
    };
    // Frames a little over the chunk limit get the HTTP route's 413 `chunk_too_large` as an
    // error frame; only frames past twice the limit end the socket (close 1009).
    let max = 2 * state.sessions.limits().max_chunk_bytes + CHUNK_HEADER_BYTES;
    let after = q.after.unwrap_or(0);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| serve(socket, id, token, after, state))
        .into_response()
}

/// The upgrade when the request asks for one; `None` for a plain request (answered with
/// [`upgrade_required`]).
pub(super) fn optional_ws(
) -> impl Filter<Extract = (Option<Ws>,), Error = std::convert::Infallible> + Clone {
    warp::ws().map(Some).or(warp::any().map(|| None)).unify()
}

/// 426 `upgrade_required`: a WebSocket route reached without the upgrade headers.
pub(super) fn upgrade_required() -> Response {
    respond::<Response>(Err(ApiError::UpgradeRequired(
        "this route needs a WebSocket upgrade (Connection: upgrade, Upgrade: websocket); a proxy may have dropped the headers".into(),
    )))
}

fn text(v: &Value) -> Message {
    Message::text(v.to_string())
}

fn error_frame(seq: Option<u64>, e: &ApiError) -> Message {
    let retry = e.retry_after_s().map(|s| s * 1000);
    text(&json!({
        "type": "error",
        "seq": seq,
        "status": e.status().as_u16(),
        "error": {"code": e.code(), "message": e.to_string()},
        "retry_after_ms": retry,
    }))
}

/// Runs one socket: a writer task (frames + pings), an events task (the long-poll loop, pushed),
/// and this task reading client frames until the client or the events task ends.
async fn serve(socket: WebSocket, id: String, token: Option<String>, after: u64, state: AppState) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let ping = Duration::from_millis(state.config.ws_ping_ms);

    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(ping);
        tick.tick().await;
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let closing = msg.is_close();
                    if sink.send(msg).await.is_err() || closing {
                        break;
                    }
                }
                _ = tick.tick() => {
                    if sink.send(Message::ping(Bytes::new())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });

    let ready = state.sessions.info(&id, token.as_deref()).await;
    let Ok(info) = ready else {
        let _ = tx
            .send(Message::close_with(1011u16, "session vanished"))
            .await;
        let _ = writer.await;
        return;
    };
    let _ = tx
        .send(text(&json!({
            "type": "ready",
            "session_id": id,
            "cursor": after,
            "status": info.status,
            "epoch": info.epoch,
            "max_chunk_bytes": state.sessions.limits().max_chunk_bytes,
            "ping_ms": state.config.ws_ping_ms,
        })))
        .await;

    let events = tokio::spawn(push_events(
        id.clone(),
        token.clone(),
        after,
        state.clone(),
        tx.clone(),
    ));

    while let Some(next) = stream.next().await {
        let msg = match next {
            Ok(msg) => msg,
            Err(e) => {
                // A frame past the socket's limit (RFC 6455 §7.4.1: 1009 "message too big"),
                // or a frame that breaks the protocol (1002).
                let text = e.to_string();
                let code = if text.contains("Space limit") || text.contains("too long") {
                    1009u16
                } else {
                    1002
                };
                tracing::debug!(error = %text, code, "socket read failed");
                let _ = tx.send(Message::close_with(code, "frame refused")).await;
                break;
            }
        };
        if msg.is_close() {
            break;
        }
        let reply = if msg.is_binary() {
            Some(on_chunk(&id, token.as_deref(), msg.into_bytes(), &state).await)
        } else if let Ok(t) = msg.to_str() {
            on_text(&id, token.as_deref(), t, &state).await
        } else {
            None // ping/pong: answered by the library
        };
        if let Some(reply) = reply {
            if tx.send(reply).await.is_err() {
                break;
            }
        }
        if events.is_finished() {
            break;
        }
    }
    events.abort();
    drop(tx);
    let _ = writer.await;
}

async fn on_chunk(id: &str, token: Option<&str>, frame: Bytes, state: &AppState) -> Message {
    if frame.len() < CHUNK_HEADER_BYTES {
        return error_frame(
            None,
            &ApiError::bad_request(
                "invalid_frame",
                format!(
                    "a chunk frame starts with a 4-byte seq and a flag byte; got {} bytes",
                    frame.len()
                ),
            ),
        );
    }
    let seq = u64::from(u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]));
    let last = frame[4] & 1 == 1;
    let body = frame.slice(CHUNK_HEADER_BYTES..);
    match state.sessions.upload(id, token, seq, last, body).await {
        Ok(ack) => text(&json!({
            "type": "ack",
            "seq": seq,
            "acked_seq": ack.acked_seq,
            "duplicate": ack.duplicate,
        })),
        Err(e) => error_frame(Some(seq), &e.into()),
    }
}

async fn on_text(id: &str, token: Option<&str>, t: &str, state: &AppState) -> Option<Message> {
    let (kind, seq) = match serde_json::from_str::<ClientMessage>(t) {
        Ok(m) => (m.kind, m.seq),
        Err(e) => {
            return Some(error_frame(
                None,
                &ApiError::bad_request("invalid_json", format!("socket message: {e}")),
            ))
        }
    };
    let result = match kind.as_str() {
        "ping" => return Some(text(&json!({"type": "pong"}))),
        "finish" => state.sessions.finish(id, token).await,
        "finalize" => {
            return match state.sessions.finalize(id, token, seq).await {
                Ok(at) => Some(text(&json!({"type": "finalized", "after_seq": at}))),
                Err(e) => Some(error_frame(None, &ApiError::from(e))),
            }
        }
        "cancel" => state.sessions.cancel(id, token).await,
        other => {
            return Some(error_frame(
                None,
                &ApiError::bad_request(
                    "invalid_message",
                    format!("unknown message type {other:?}: use finish, finalize, cancel or ping"),
                ),
            ))
        }
    };
    // The state change shows up as events; only failures need an answer.
    result.err().map(|e| error_frame(None, &ApiError::from(e)))
}

/// The long-poll loop of the HTTP transport, pushed: every batch of events after the cursor
/// goes out as one `events` frame; after `done` the socket is closed with 1000.
async fn push_events(
    id: String,
    token: Option<String>,
    mut cursor: u64,
    state: AppState,
    tx: mpsc::Sender<Message>,
) {
    let hold = Duration::from_millis(state.sessions.limits().poll_max_hold_ms);
    loop {
        let r = match state
            .sessions
            .poll(&id, token.as_deref(), cursor, Some(hold))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.send(error_frame(None, &ApiError::from(e))).await;
                let _ = tx.send(Message::close_with(1011u16, "poll failed")).await;
                return;
            }
        };
        if !r.events.is_empty() || r.done {
            cursor = r.next_cursor;
            let done = r.done;
            let mut v = serde_json::to_value(&r).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("type".into(), "events".into());
            }
            super::sessions::count_delivered("ws", r.events.len());
            if tx.send(text(&v)).await.is_err() {
                return;
            }
            if done {
                let _ = tx.send(Message::close_with(1000u16, "session ended")).await;
                return;
            }
        } else if state.sessions.shutting_down() {
            let _ = tx
                .send(Message::close_with(1001u16, "server stopping"))
                .await;
            return;
        }
    }
}
