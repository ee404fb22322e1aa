//! Session routes (shared/api.md, "Sessions (realtime)").

use super::{respond, session_ref, with_state, AppState, BodyLimit, SessionRef};
use crate::error::ApiError;
use crate::session::{CreateOptions, SessionError, UploadAck, UploadReply};
use bytes::Bytes;
use serde::Deserialize;
use std::time::Duration;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Query of `POST /v1/sessions/{id}/audio` (the token is read by [`session_ref`]).
#[derive(Debug, Deserialize)]
struct AudioQuery {
    seq: u64,
    last: Option<String>,
    after: Option<u64>,
}

/// Query of `POST /v1/sessions/{id}/finalize`.
#[derive(Debug, Deserialize)]
struct FinalizeQuery {
    seq: Option<u64>,
}

/// Query of `GET /v1/sessions/{id}/events`.
#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    wait_ms: Option<u64>,
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

/// All `/v1/sessions` routes.
pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let chunk_limit = BodyLimit {
        max: state.sessions.limits().max_chunk_bytes as u64,
        code: "chunk_too_large",
        name: "max_chunk_bytes",
    };
    let json_limit = BodyLimit {
        max: state.config.max_json_bytes,
        code: "body_too_large",
        name: "max_json_bytes",
    };

    // POST /v1/sessions
    let create = warp::path!("v1" / "sessions")
        .and(warp::post())
        .and(super::caller(&state))
        .and(super::body(&state, json_limit))
        .and(with_state(state.clone()))
        .then(create_session)
        .map(respond);

    // POST /v1/sessions/{id}/audio?seq=N[&last=1][&after=K]
    let audio = session_ref(warp::path!("v1" / "sessions" / String / "audio").and(warp::post()))
        .and(warp::query::<AudioQuery>())
        .and(warp::header::optional::<String>("content-type"))
        .and(super::body(&state, chunk_limit))
        .and(with_state(state.clone()))
        .then(upload_chunk)
        .map(respond);

    // GET /v1/sessions/{id}/events?after=K&wait_ms=W
    let events = session_ref(warp::path!("v1" / "sessions" / String / "events").and(warp::get()))
        .and(warp::query::<EventsQuery>())
        .and(with_state(state.clone()))
        .then(poll_events)
        .map(respond);

    // POST /v1/sessions/{id}/finish
    let finish = session_ref(warp::path!("v1" / "sessions" / String / "finish").and(warp::post()))
        .and(with_state(state.clone()))
        .then(finish_session)
        .map(respond);

    // POST /v1/sessions/{id}/finalize[?seq=N]
    let finalize =
        session_ref(warp::path!("v1" / "sessions" / String / "finalize").and(warp::post()))
            .and(warp::query::<FinalizeQuery>())
            .and(with_state(state.clone()))
            .then(finalize_sentence)
            .map(respond);

    // GET /v1/sessions/{id}
    let get = session_ref(warp::path!("v1" / "sessions" / String).and(warp::get()))
        .and(with_state(state.clone()))
        .then(get_session)
        .map(respond);

    // DELETE /v1/sessions/{id}
    let delete = session_ref(warp::path!("v1" / "sessions" / String).and(warp::delete()))
        .and(with_state(state))
        .then(cancel_session)
        .map(respond);

    create
        .or(audio)
        .unify()
        .or(events)
        .unify()
        .or(finish)
        .unify()
        .or(finalize)
        .unify()
        .or(get)
        .unify()
        .or(delete)
        .unify()
}

/// Refuses options the API does not have (a misspelt `engnie` would otherwise be ignored):
/// 400 `invalid_option` naming the first unknown one (its first 16 characters).
fn check_known_options(v: &serde_json::Value) -> Result<(), ApiError> {
    // The option names, sorted: the fields of `CreateOptions` as it serialises (computed once).
    static KNOWN: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        let v = serde_json::to_value(CreateOptions::default()).unwrap_or_default();
        let mut names: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect();
        names.sort_unstable();
        names
    });
    let Some(given) = v.as_object() else {
        return Ok(()); // not an object: serde reports the type
    };
    match given.keys().find(|k| known.binary_search(k).is_err()) {
        None => Ok(()),
        Some(k) => {
            let names: Vec<&str> = known.iter().map(String::as_str).collect();
            Err(ApiError::bad_request(
                "invalid_option",
                format!(
                    "unknown session option {:?}; the options are {}",
                    k.chars().take(16).collect::<String>(),
                    names.join(", ")
                ),
            ))
        }
    }
}

async fn create_session(
    user: Option<String>,
    body: Bytes,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    // An empty body means every default; anything else must be a JSON object.
    let opts: CreateOptions = if body.is_empty() {
        CreateOptions::default()
    } else {
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("session options: {e}")))?;
        check_known_options(&v)?;
        serde_json::from_value(v)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("session options: {e}")))?
    };
    let created = state.sessions.create(opts, user).await?;
    Ok(warp::reply::with_status(
        warp::reply::json(&created),
        StatusCode::CREATED,
    ))
}

async fn upload_chunk(
    r: SessionRef,
    q: AudioQuery,
    content_type: Option<String>,
    body: Bytes,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    let last = flag(q.last.as_deref())?;
    if content_type
        .as_deref()
        .is_some_and(|c| c.starts_with("multipart/"))
    {
        return Err(ApiError::UnsupportedAudio(
            "audio chunks are raw bytes (application/octet-stream), not multipart; use POST /v1/recognize for file uploads".into(),
        ));
    }
    let len = body.len();
    let result = state
        .sessions
        .upload(&r.id, r.token(), q.seq, last, body)
        .await;
    count_chunk(&result, len);
    let ack = result?;
    let poll = match q.after {
        Some(after) => {
            let page = state
                .sessions
                .poll(&r.id, r.token(), after, Some(Duration::ZERO))
                .await?;
            count_delivered("poll", page.events.len());
            Some(page)
        }
        None => None,
    };
    Ok(warp::reply::json(&UploadReply { ack, poll }))
}

async fn poll_events(
    r: SessionRef,
    q: EventsQuery,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    let wait = q.wait_ms.map(Duration::from_millis);
    let page = state
        .sessions
        .poll(&r.id, r.token(), q.after.unwrap_or(0), wait)
        .await?;
    count_delivered("poll", page.events.len());
    Ok(warp::reply::json(&page))
}

/// Counts an upload by outcome (`voxpoll_chunks_total`) and a new chunk's bytes.
fn count_chunk(result: &Result<UploadAck, SessionError>, len: usize) {
    use crate::session::ingest::IngestError as E;
    let outcome = match result {
        Ok(ack) if ack.duplicate => "duplicate",
        Ok(_) => "accepted",
        Err(SessionError::Ingest(E::OutOfWindow { .. })) => "out_of_window",
        Err(SessionError::Ingest(E::Conflict { .. })) => "conflict",
        Err(SessionError::Ingest(E::AfterLast { .. })) => "after_last",
        Err(SessionError::Ingest(E::Backpressure { .. })) => "backpressure",
        Err(SessionError::RateLimited { .. }) => "rate_limited",
        Err(_) => "refused",
    };
    metrics::counter!(crate::metrics::CHUNKS, "outcome" => outcome).increment(1);
    if outcome == "accepted" {
        metrics::counter!(crate::metrics::CHUNK_BYTES).increment(len as u64);
    }
}

/// Counts events handed to a client (`voxpoll_events_delivered_total`).
pub(super) fn count_delivered(transport: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(crate::metrics::EVENTS_DELIVERED, "transport" => transport)
            .increment(n as u64);
    }
}

async fn finish_session(r: SessionRef, state: AppState) -> Result<impl Reply, ApiError> {
    let info = state.sessions.finish(&r.id, r.token()).await?;
    Ok(warp::reply::json(&info))
}

/// → `{"after_seq": N}`: the sentence ends after chunk N (`null`: no audio yet).
async fn finalize_sentence(
    r: SessionRef,
    q: FinalizeQuery,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    let at = state.sessions.finalize(&r.id, r.token(), q.seq).await?;
    Ok(warp::reply::json(&serde_json::json!({ "after_seq": at })))
}

async fn get_session(r: SessionRef, state: AppState) -> Result<impl Reply, ApiError> {
    let info = state.sessions.info(&r.id, r.token()).await?;
    Ok(warp::reply::json(&info))
}

async fn cancel_session(r: SessionRef, state: AppState) -> Result<impl Reply, ApiError> {
    let info = state.sessions.cancel(&r.id, r.token()).await?;
    Ok(warp::reply::json(&info))
}
