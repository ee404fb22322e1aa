//! Session routes (shared/api.md, "Sessions (realtime)").

use super::{respond, with_state, AppState};
use crate::error::{ApiError, ChunkTooLarge};
use crate::session::CreateOptions;
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Filter;

/// Query of `POST /v1/sessions/{id}/audio`.
#[derive(Debug, Deserialize)]
struct AudioQuery {
    seq: u64,
    last: Option<String>,
    after: Option<u64>,
    session_token: Option<String>,
}

/// Query of `GET /v1/sessions/{id}/events` and the other session calls.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    wait_ms: Option<u64>,
    session_token: Option<String>,
}

fn flag(v: Option<&str>) -> Result<bool, ApiError> {
    match v {
        None | Some("0" | "false" | "") => Ok(false),
        Some("1" | "true") => Ok(true),
        Some(other) => Err(ApiError::bad_request(
            "invalid_query",
            format!("last={other:?}: use 1 or 0"),
        )),
    }
}

fn header_token() -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("x-session-token")
}

/// Rejects before the body is read when the declared length exceeds `max`.
fn chunk_limit(max: usize) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(move |len: Option<u64>| async move {
            match len {
                Some(len) if len > max as u64 => {
                    Err(warp::reject::custom(ChunkTooLarge { len, max }))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
}

/// All `/v1/sessions` routes.
pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let max_chunk = state.config.max_chunk_bytes;
    let max_json = state.config.max_json_bytes;

    // POST /v1/sessions
    let create = warp::path!("v1" / "sessions")
        .and(warp::post())
        .and(super::caller(&state))
        .and(warp::body::content_length_limit(max_json))
        .and(super::body(&state))
        .and(with_state(state.clone()))
        .then(create_session);

    // POST /v1/sessions/{id}/audio?seq=N[&last=1][&after=K]
    let audio = warp::path!("v1" / "sessions" / String / "audio")
        .and(warp::post())
        .and(chunk_limit(max_chunk))
        .and(warp::query::<AudioQuery>())
        .and(header_token())
        .and(warp::header::optional::<String>("content-type"))
        .and(super::body(&state))
        .and(with_state(state.clone()))
        .then(upload_chunk);

    // GET /v1/sessions/{id}/events?after=K&wait_ms=W
    let events = warp::path!("v1" / "sessions" / String / "events")
        .and(warp::get())
        .and(warp::query::<EventsQuery>())
        .and(header_token())
        .and(with_state(state.clone()))
        .then(poll_events);

    // POST /v1/sessions/{id}/finish
    let finish = warp::path!("v1" / "sessions" / String / "finish")
        .and(warp::post())
        .and(warp::query::<EventsQuery>())
        .and(header_token())
        .and(with_state(state.clone()))
        .then(finish_session);

    // GET /v1/sessions/{id}
    let get = warp::path!("v1" / "sessions" / String)
        .and(warp::get())
        .and(warp::query::<EventsQuery>())
        .and(header_token())
        .and(with_state(state.clone()))
        .then(get_session);

    // DELETE /v1/sessions/{id}
    let delete = warp::path!("v1" / "sessions" / String)
        .and(warp::delete())
        .and(warp::query::<EventsQuery>())
        .and(header_token())
        .and(with_state(state))
        .then(cancel_session);

    create
        .or(audio)
        .unify()
        .or(events)
        .unify()
        .or(finish)
        .unify()
        .or(get)
        .unify()
        .or(delete)
        .unify()
}

async fn create_session(user: Option<String>, body: Bytes, state: AppState) -> Response {
    respond(
        async {
            let opts: CreateOptions = if body.iter().all(u8::is_ascii_whitespace) {
                CreateOptions::default()
            } else {
                serde_json::from_slice(&body).map_err(|e| {
                    ApiError::bad_request("invalid_json", format!("session options: {e}"))
                })?
            };
            let created = state.sessions.create(opts, user).await?;
            Ok(warp::reply::with_status(
                warp::reply::json(&created),
                StatusCode::CREATED,
            ))
        }
        .await,
    )
}

async fn upload_chunk(
    id: String,
    q: AudioQuery,
    header_token: Option<String>,
    content_type: Option<String>,
    body: Bytes,
    state: AppState,
) -> Response {
    respond(
        async {
            let last = flag(q.last.as_deref())?;
            if content_type.as_deref().is_some_and(|c| c.starts_with("multipart/")) {
                return Err(ApiError::UnsupportedAudio(
                    "audio chunks are raw bytes (application/octet-stream), not multipart; use POST /v1/recognize for file uploads".into(),
                ));
            }
            check_chunk(state.config.max_chunk_bytes, body.len(), last)?;
            let token = header_token.or(q.session_token);
            let ack = state.sessions.upload(&id, token.as_deref(), q.seq, last, body).await?;
            let mut reply = serde_json::to_value(&ack).map_err(anyhow::Error::from)?;
            if let Some(after) = q.after {
                let poll = state.sessions.poll(&id, token.as_deref(), after, Some(Duration::ZERO)).await?;
                if let (Some(obj), serde_json::Value::Object(p)) = (reply.as_object_mut(), serde_json::to_value(poll).map_err(anyhow::Error::from)?) {
                    obj.extend(p);
                }
            }
            Ok(warp::reply::json(&reply))
        }
        .await,
    )
}

/// The checks every chunk passes before the session sees it, whatever the transport.
///
/// # Errors
/// 413 `chunk_too_large` over `max_chunk_bytes`; 400 `empty_chunk` for an empty chunk that is
/// not the last.
pub(super) fn check_chunk(max_chunk_bytes: usize, len: usize, last: bool) -> Result<(), ApiError> {
    if len > max_chunk_bytes {
        return Err(ApiError::TooLarge {
            code: "chunk_too_large",
            message: format!("chunk of {len} bytes exceeds max_chunk_bytes ({max_chunk_bytes})"),
        });
    }
    if len == 0 && !last {
        return Err(ApiError::bad_request(
            "empty_chunk",
            "empty chunk: only the last chunk (last=1) may be empty",
        ));
    }
    Ok(())
}

async fn poll_events(
    id: String,
    q: EventsQuery,
    header_token: Option<String>,
    state: AppState,
) -> Response {
    let token = header_token.or(q.session_token);
    let wait = q.wait_ms.map(Duration::from_millis);
    respond(
        state
            .sessions
            .poll(&id, token.as_deref(), q.after.unwrap_or(0), wait)
            .await
            .map(|r| warp::reply::json(&r))
            .map_err(ApiError::from),
    )
}

async fn finish_session(
    id: String,
    q: EventsQuery,
    header_token: Option<String>,
    state: AppState,
) -> Response {
    let token = header_token.or(q.session_token);
    respond(
        state
            .sessions
            .finish(&id, token.as_deref())
            .await
            .map(|r| warp::reply::json(&r))
            .map_err(ApiError::from),
    )
}

async fn get_session(
    id: String,
    q: EventsQuery,
    header_token: Option<String>,
    state: AppState,
) -> Response {
    let token = header_token.or(q.session_token);
    respond(
        state
            .sessions
            .info(&id, token.as_deref())
            .await
            .map(|r| warp::reply::json(&r))
            .map_err(ApiError::from),
    )
}

async fn cancel_session(
    id: String,
    q: EventsQuery,
    header_token: Option<String>,
    state: AppState,
) -> Response {
    let token = header_token.or(q.session_token);
    respond(
        state
            .sessions
            .cancel(&id, token.as_deref())
            .await
            .map(|r| warp::reply::json(&r))
            .map_err(ApiError::from),
    )
}
