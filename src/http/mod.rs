//! HTTP routes (warp 0.4): one `routes(state)` builder used by the server and by tests.
//! Handlers stay thin: parse, call the session engine, shape the reply. Every failure is an
//! [`ApiError`] rendered once by its `Reply` impl or by [`crate::error::recover`].

mod history;
mod ops;
mod probe;
mod recognize;
pub mod server;
mod sessions;
mod ws;

use crate::config::Config;
use crate::error::ApiError;
use crate::session::{SessionError, SessionManager};
use crate::store::HistoryStore;
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
        .with(warp::trace::request())
}

fn api(
    state: AppState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone {
    ops::routes(state.clone())
        .or(sessions::routes(state.clone()))
        .unify()
        .or(ws::routes(state.clone()))
        .unify()
        .or(probe::routes(state.clone()))
        .unify()
        .or(recognize::routes(state.clone()))
        .unify()
        .or(history::routes(state))
        .unify()
}

/// The request body, read within `request_timeout_ms` from the time the handler asks for it:
/// a client trickling its body gets 408 `request_timeout` instead of holding the connection.
fn body(
    state: &AppState,
) -> impl Filter<Extract = (bytes::Bytes,), Error = warp::Rejection> + Clone {
    let limit = std::time::Duration::from_millis(state.config.request_timeout_ms);
    warp::body::stream().and_then(move |s| collect_body(s, limit))
}

async fn collect_body<S, B>(
    s: S,
    limit: std::time::Duration,
) -> Result<bytes::Bytes, warp::Rejection>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    use futures_util::TryStreamExt;
    let read = async {
        let mut out = bytes::BytesMut::new();
        let mut s = std::pin::pin!(s);
        while let Some(mut chunk) = s.try_next().await? {
            while chunk.has_remaining() {
                let part = chunk.chunk();
                out.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok::<_, warp::Error>(out.freeze())
    };
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(warp::reject::custom(crate::error::BodyError(e.to_string()))),
        Err(_) => Err(warp::reject::custom(crate::error::BodyError(format!(
            "the request body did not arrive within {} ms (request_timeout_ms)",
            limit.as_millis()
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

/// Turns a handler's result into a response.
fn respond<T: warp::Reply>(r: Result<T, ApiError>) -> warp::reply::Response {
    match r {
        Ok(reply) => reply.into_response(),
        Err(e) => warp::Reply::into_response(e),
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        use crate::session::ingest::IngestError;
        match e {
            SessionError::NotFound(id) => ApiError::SessionNotFound(id),
            SessionError::MissingToken => ApiError::Unauthorized {
                code: "missing_session_token",
                message: e.to_string(),
            },
            SessionError::WrongToken => ApiError::Forbidden {
                code: "invalid_session_token",
                message: e.to_string(),
            },
            SessionError::Closed { id, status } => ApiError::SessionClosed { id, status },
            SessionError::Ingest(ref ie) => match ie {
                IngestError::Conflict { .. } => ApiError::Conflict {
                    code: "seq_conflict",
                    message: e.to_string(),
                },
                IngestError::OutOfWindow { .. } => ApiError::Conflict {
                    code: "seq_out_of_window",
                    message: e.to_string(),
                },
                IngestError::AfterLast { .. } => ApiError::Conflict {
                    code: "seq_after_last",
                    message: e.to_string(),
                },
                IngestError::Backpressure { .. } => ApiError::TooBusy {
                    code: "backpressure",
                    message: e.to_string(),
                    retry_after_s: 1,
                },
            },
            SessionError::TooMany { .. } | SessionError::TooManyForUser { .. } => {
                ApiError::TooBusy {
                    code: "too_many_sessions",
                    message: e.to_string(),
                    retry_after_s: 5,
                }
            }
            SessionError::RateLimited { .. } => ApiError::TooBusy {
                code: "rate_limited",
                message: e.to_string(),
                retry_after_s: 1,
            },
            SessionError::InvalidOption(m) => ApiError::bad_request("invalid_option", m),
            SessionError::UnsupportedAudio(m) => ApiError::UnsupportedAudio(m),
            SessionError::ProviderUnavailable(m) => ApiError::Unavailable {
                code: "provider_unavailable",
                message: m,
            },
            SessionError::ProviderBusy(m) => ApiError::TooBusy {
                code: "provider_busy",
                message: m,
                retry_after_s: 5,
            },
            SessionError::ShuttingDown => ApiError::Unavailable {
                code: "shutting_down",
                message: e.to_string(),
            },
            SessionError::Store(s) => ApiError::Internal(anyhow::Error::new(s)),
        }
    }
}
