//! HTTP routes (warp 0.4): one `routes(state)` builder used by the server and by tests.
//! Handlers stay thin: parse, call the session engine, shape the reply. Every failure is an
//! [`ApiError`] rendered once by its `Reply` impl or by [`crate::error::recover`].

mod history;
mod ops;
mod probe;
mod recognize;
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
}

/// The whole route tree, with the error recovery and request tracing attached.
pub fn routes(
    state: AppState,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible> + Clone {
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
        .recover(crate::error::recover)
        .unify()
        .with(warp::trace::request())
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
            SessionError::TooMany { .. } => ApiError::TooBusy {
                code: "too_many_sessions",
                message: e.to_string(),
                retry_after_s: 5,
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
