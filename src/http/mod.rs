//! HTTP routes (warp 0.4): one `routes(state)` builder used by the server and by tests.
//! Handlers stay thin: parse, call the session engine, shape the reply. Every failure is an
//! [`ApiError`] rendered once by its `Reply` impl or by [`crate::error::recover`].

mod history;
mod openai;
mod ops;
mod probe;
mod recognize;
pub mod server;
mod sessions;
mod ui;
mod ws;

use crate::config::Config;
use crate::error::ApiError;
use crate::oneshot::Recognizer;
use crate::session::SessionManager;
use crate::store::HistoryStore;
use serde::Deserialize;
use std::sync::Arc;
use warp::Filter;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Server configuration.
    pub config: Arc<Config>,
    /// The session engine.
    pub sessions: SessionManager,
    /// Recognition history.
    pub history: Arc<dyn HistoryStore>,
    /// One-shot recognition.
    pub recognizer: Recognizer,
    /// Caller authentication (JWT, API keys); off when nothing is configured.
    pub auth: Arc<crate::auth::Authenticator>,
}

/// The whole route tree, with the CORS allow-list, error recovery and request tracing attached.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
    let origins = state.config.cors_origins.clone();
    let (max_bytes, max_count) = (state.config.max_header_bytes, state.config.max_headers);
    let tree = header_limits(max_bytes, max_count).and(api(state));
    // Without an allow-list no CORS headers are sent and `Origin` is not checked.
    let tree = if origins.is_empty() {
        tree.boxed()
    } else {
        let cors = warp::cors()
            .allow_origins(origins.iter().map(String::as_str))
            .allow_methods(["GET", "POST", "DELETE", "OPTIONS"])
            .allow_headers([
                "content-type",
                "authorization",
                "x-api-key",
                "x-session-token",
            ])
            .expose_headers(["retry-after"])
            .max_age(600);
        tree.with(cors)
            .map(warp::reply::Reply::into_response)
            .boxed()
    };
    tree.recover(crate::error::recover)
        .unify()
        .with(warp::log::custom(|info| {
            crate::metrics::observe_http(
                info.path(),
                info.method().as_str(),
                info.status().as_u16(),
                info.elapsed(),
            );
        }))
        .with(warp::trace::request())
}

/// The API's route groups. Each group is boxed: warp's `or` future is an enum as large as its
/// largest branch, and hyper keeps one per request in flight, so unboxed every waiting
/// long-poll would carry the state of the largest handler (one-shot recognition, multipart)
/// instead of its own (`scripts/bench-gateway` S2 measures the bytes per waiting poll).
fn api(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    ops::routes(state.clone())
        .boxed()
        .or(sessions::routes(state.clone()).boxed())
        .unify()
        .or(ws::routes(state.clone()).boxed())
        .unify()
        .or(probe::routes(state.clone()).boxed())
        .unify()
        .or(recognize::routes(state.clone()).boxed())
        .unify()
        .or(openai::routes(state.clone()).boxed())
        .unify()
        .or(history::routes(state).boxed())
        .unify()
        .or(ui::routes().boxed())
        .unify()
}

/// A route's body limit: at most `max` bytes however the body is framed (declared length or
/// chunked); past it 413 with `code`, naming the option `name`.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyLimit {
    /// Most bytes read.
    pub max: u64,
    /// The 413's code (`chunk_too_large`, `body_too_large`, `audio_too_large`).
    pub code: &'static str,
    /// The option that sets `max`.
    pub name: &'static str,
}

/// The request body, at most `limit.max` bytes (a declared larger length is refused before any
/// byte is read, a longer chunked body as soon as it passes the limit), read within
/// `request_timeout_ms` from the time the handler asks for it: a client trickling its body
/// gets 408 `request_timeout` instead of holding the connection.
fn body(
    state: &AppState,
    limit: BodyLimit,
) -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    let deadline = std::time::Duration::from_millis(state.config.request_timeout_ms);
    declared_length(limit)
        .and(warp::body::stream())
        .and_then(move |s| collect_body(s, limit, deadline))
}

/// Refuses a declared `Content-Length` over the limit before the body is read.
fn declared_length(limit: BodyLimit) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(move |len: Option<u64>| async move {
            match len {
                Some(len) if len > limit.max => {
                    Err(warp::reject::custom(crate::error::BodyTooLarge {
                        len: Some(len),
                        max: limit.max,
                        code: limit.code,
                        name: limit.name,
                    }))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
}

async fn collect_body<S, B>(
    s: S,
    limit: BodyLimit,
    deadline: std::time::Duration,
) -> Result<bytes::Bytes, warp::Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures_util::TryStreamExt;
    let read = async {
        let mut out = bytes::BytesMut::new();
        let mut s = std::pin::pin!(s);
        while let Some(mut chunk) = s
            .try_next()
            .await
            .map_err(|e| warp::reject::custom(crate::error::BodyError(e.to_string())))?
        {
            if (out.len() + chunk.remaining()) as u64 > limit.max {
                // Stop reading: the connection is closed after the answer.
                return Err(warp::reject::custom(crate::error::BodyTooLarge {
                    len: None,
                    max: limit.max,
                    code: limit.code,
                    name: limit.name,
                }));
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                out.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok(out.freeze())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(r) => r,
        Err(_) => Err(warp::reject::custom(crate::error::BodyError(format!(
            "the request body did not arrive within {} ms (request_timeout_ms)",
            deadline.as_millis()
        )))),
    }
}

/// Refuses requests whose header section is over `max_bytes` (names + values) or `max_count`.
fn header_limits(
    max_bytes: usize,
    max_count: usize,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::headers_cloned()
        .and_then(move |h: warp::http::HeaderMap| async move {
            let bytes: usize = h.iter().map(|(k, v)| k.as_str().len() + v.len()).sum();
            if h.len() > max_count || bytes > max_bytes {
                Err(warp::reject::custom(crate::error::HeadersTooLarge(
                    format!(
                    "{} headers, {bytes} bytes: at most {max_count} headers and {max_bytes} bytes",
                    h.len()
                ),
                )))
            } else {
                Ok(())
            }
        })
        .untuple_one()
}

/// The caller's user id (`None` while auth is off), or a 401 rejection.
fn caller(
    state: &AppState,
) -> impl Filter<Extract = (Option<String>,), Error = warp::Rejection> + Clone {
    let auth = Arc::clone(&state.auth);
    warp::header::optional::<String>("authorization")
        .and(warp::header::optional::<String>("x-api-key"))
        .and_then(move |authz: Option<String>, key: Option<String>| {
            let auth = Arc::clone(&auth);
            async move {
                auth.caller(authz.as_deref(), key.as_deref())
                    .map_err(|e| warp::reject::custom(crate::error::Denied::from(e)))
            }
        })
}

fn with_state(
    state: AppState,
) -> impl Filter<Extract = (AppState,), Error = std::convert::Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The target of a session call: the id from the path, and the session token from
/// `X-Session-Token` or, for clients that cannot set headers, `?session_token=`.
pub(super) struct SessionRef {
    /// Session id as given in the path.
    pub id: String,
    /// The token, header first.
    pub token: Option<String>,
}

impl SessionRef {
    /// The token, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    session_token: Option<String>,
}

/// Wraps a path filter that extracts a session id into one that extracts a [`SessionRef`].
fn session_ref<F>(path: F) -> impl Filter<Extract = (SessionRef,), Error = warp::Rejection> + Clone
where
    F: Filter<Extract = (String,), Error = warp::Rejection> + Clone,
{
    path.and(warp::header::optional::<String>("x-session-token"))
        .and(warp::query::<TokenQuery>())
        .map(|id, header: Option<String>, q: TokenQuery| SessionRef {
            id,
            token: header.or(q.session_token),
        })
}

/// Turns a handler's result into a response.
fn respond<T: warp::Reply>(r: Result<T, ApiError>) -> warp::reply::Response {
    match r {
        Ok(reply) => reply.into_response(),
        Err(e) => warp::Reply::into_response(e),
    }
}
