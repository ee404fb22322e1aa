//! The one error type handlers return, and its single mapping to HTTP: a status plus
//! `{"error": {"code": "snake_case", "message": "..."}}` (shared/api.md, Conventions). Every
//! domain error (session engine, providers, one-shot recognition, storage) becomes an
//! [`ApiError`] here and nowhere else, so all transports answer alike.

use crate::oneshot::OneShotError;
use crate::provider::ProviderError;
use crate::session::ingest::IngestError;
use crate::session::{InvalidOption, SessionError};
use crate::store::StoreError;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

/// An error a client can act on. `code` strings are part of the API contract.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, bad query, bad option value).
    #[error("{message}")]
    BadRequest {
        /// Stable machine code, e.g. `invalid_json`, `invalid_option`.
        code: &'static str,
        /// Human text naming the offending field.
        message: String,
    },
    /// 401: credentials missing (`missing_session_token`).
    #[error("{message}")]
    Unauthorized {
        /// Machine code.
        code: &'static str,
        /// Human text.
        message: String,
    },
    /// 403: credentials do not grant access (`invalid_session_token`).
    #[error("{message}")]
    Forbidden {
        /// Machine code.
        code: &'static str,
        /// Human text.
        message: String,
    },
    /// 404 `session_not_found`.
    #[error("no session with id {0}")]
    SessionNotFound(String),
    /// 404 `not_found` for unknown routes.
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// 405 `method_not_allowed`.
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// 409: chunk sequencing conflict (`seq_conflict`, `seq_out_of_window`).
    #[error("{message}")]
    Conflict {
        /// `seq_conflict` or `seq_out_of_window`.
        code: &'static str,
        /// Says which seq the server expects.
        message: String,
    },
    /// 410 `session_closed`: the session no longer accepts audio.
    #[error("session {id} is {status} and accepts no more audio")]
    SessionClosed {
        /// Session id.
        id: String,
        /// Its current status.
        status: String,
    },
    /// 413: a body over its configured limit (`chunk_too_large`, `body_too_large`).
    #[error("{message}")]
    TooLarge {
        /// `chunk_too_large` or `body_too_large`.
        code: &'static str,
        /// Names the limit and its value in bytes.
        message: String,
    },
    /// 415 `unsupported_audio`.
    #[error("{0}")]
    UnsupportedAudio(String),
    /// 429 with `Retry-After` (seconds): `backpressure` or `too_many_sessions`.
    #[error("{message}")]
    TooBusy {
        /// `backpressure` or `too_many_sessions`.
        code: &'static str,
        /// What limit was hit.
        message: String,
        /// Seconds the client should wait.
        retry_after_s: u64,
    },
    /// 503 `not_ready` / `shutting_down`.
    #[error("{message}")]
    Unavailable {
        /// `not_ready` or `shutting_down`.
        code: &'static str,
        /// Why.
        message: String,
    },
    /// 404 for other resources (`history_not_found`).
    #[error("{message}")]
    NotFound {
        /// Machine code.
        code: &'static str,
        /// Human text.
        message: String,
    },
    /// 502: the provider answered with an error. `code` is voxpoll's (`provider_auth_failed`,
    /// `provider_busy`, …); `provider_code` keeps the upstream's own code in the body.
    #[error("{message}")]
    Upstream {
        /// voxpoll's code.
        code: String,
        /// The upstream's code verbatim.
        provider_code: Option<String>,
        /// Human text.
        message: String,
    },
    /// 426 `upgrade_required`: a WebSocket route reached without the upgrade headers (often a
    /// proxy that speaks HTTP/1.0 upstream or strips `Upgrade`).
    #[error("{0}")]
    UpgradeRequired(String),
    /// 408 `request_timeout`: the request was not answered within `request_timeout_ms`.
    #[error("{0}")]
    RequestTimeout(String),
    /// 431 `headers_too_large`: over `max_header_bytes` or `max_headers`.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// 503 `store_unavailable` with `Retry-After`: the database failed (locked, disk full,
    /// gone); nothing the request carried was acknowledged, so a retry is safe.
    #[error("the session store is unavailable; retry shortly")]
    StoreUnavailable(#[source] StoreError),
    /// 500: logged once here with its cause chain; the client sees an opaque message.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// 400 with the given code.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    /// The HTTP status this error maps to.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::SessionNotFound(_) | Self::RouteNotFound(_) | Self::NotFound { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::Upstream { .. } => StatusCode::BAD_GATEWAY,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::SessionClosed { .. } => StatusCode::GONE,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedAudio(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub fn retry_after_s(&self) -> Option<u64> {
        match self {
            Self::TooBusy { retry_after_s, .. } => Some(*retry_after_s),
            Self::StoreUnavailable(_) => Some(RETRY_UPLOAD_S),
            _ => None,
        }
    }

    /// The stable machine code of the JSON body.
    pub fn code(&self) -> &str {
        match self {
            Self::Upstream { code, .. } => code,
            Self::BadRequest { code, .. }
            | Self::NotFound { code, .. }
            | Self::Unauthorized { code, .. }
            | Self::Forbidden { code, .. }
            | Self::Conflict { code, .. }
            | Self::TooLarge { code, .. }
            | Self::TooBusy { code, .. }
            | Self::Unavailable { code, .. } => code,
            Self::SessionNotFound(_) => "session_not_found",
            Self::RouteNotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::SessionClosed { .. } => "session_closed",
            Self::UnsupportedAudio(_) => "unsupported_audio",
            Self::UpgradeRequired(_) => "upgrade_required",
            Self::RequestTimeout(_) => "request_timeout",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::Internal(e)
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(e) = &self {
            tracing::error!(error = %e, cause_chain = ?e, "internal error");
        }
        if let Self::StoreUnavailable(e) = &self {
            tracing::error!(error = %e, cause = ?e, "store unavailable");
        }
        let mut body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        if let Self::Upstream {
            provider_code: Some(pc),
            ..
        } = &self
        {
            body["error"]["provider_code"] = pc.clone().into();
        }
        self.reply_with(&body)
    }
}

impl ApiError {
    /// `body` as JSON with this error's status and, when it has one, its `Retry-After`: for
    /// envelopes other than voxpoll's own (the seeds', OpenAI's).
    pub fn reply_with(&self, body: &serde_json::Value) -> warp::reply::Response {
        let mut resp =
            warp::reply::with_status(warp::reply::json(body), self.status()).into_response();
        if let Some(s) = self.retry_after_s() {
            resp.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(s),
            );
        }
        resp
    }
}

/// Rejection for a body over its route's limit: declared (`len`, refused before any byte is
/// read) or found while reading a chunked body (`len` unknown).
#[derive(Debug)]
pub struct BodyTooLarge {
    /// Declared body size, bytes.
    pub len: Option<u64>,
    /// Configured limit, bytes.
    pub max: u64,
    /// The 413's code.
    pub code: &'static str,
    /// The option that sets the limit.
    pub name: &'static str,
}

impl warp::reject::Reject for BodyTooLarge {}

/// Rejection for a request body that could not be read in time (or at all).
#[derive(Debug)]
pub struct BodyError(pub String);

impl warp::reject::Reject for BodyError {}

/// Rejection for a request whose headers exceed the configured limits.
#[derive(Debug)]
pub struct HeadersTooLarge(pub String);

impl warp::reject::Reject for HeadersTooLarge {}

/// Rejection when every probe slot is taken (the number of slots).
#[derive(Debug)]
pub struct ProbeBusy(pub usize);

impl warp::reject::Reject for ProbeBusy {}

/// Rejection carrying a 401 from caller authentication.
#[derive(Debug)]
pub struct Denied {
    code: &'static str,
    message: String,
}

impl From<ApiError> for Denied {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unauthorized { code, message } => Self { code, message },
            other => Self {
                code: "unauthorized",
                message: other.to_string(),
            },
        }
    }
}

impl warp::reject::Reject for Denied {}

/// Maps warp's own rejections (no route, wrong method, bad body, over-limit body, bad query) onto
/// the same JSON error shape. Installed once with `.recover(..)` on the whole route tree.
pub async fn recover(rej: warp::Rejection) -> Result<Response, std::convert::Infallible> {
    let err = if let Some(b) = rej.find::<BodyError>() {
        ApiError::RequestTimeout(b.0.clone())
    } else if let Some(h) = rej.find::<HeadersTooLarge>() {
        ApiError::HeadersTooLarge(h.0.clone())
    } else if let Some(d) = rej.find::<Denied>() {
        ApiError::Unauthorized {
            code: d.code,
            message: d.message.clone(),
        }
    } else if let Some(b) = rej.find::<ProbeBusy>() {
        ApiError::TooBusy {
            code: "backpressure",
            message: format!("{} probes are already running; retry later", b.0),
            retry_after_s: 5,
        }
    } else if rej.find::<warp::filters::cors::CorsForbidden>().is_some() {
        ApiError::Forbidden {
            code: "cors_forbidden",
            message: "this Origin is not in the CORS allow-list (cors_origins)".into(),
        }
    } else if let Some(e) = rej.find::<BodyTooLarge>() {
        let what = if e.code == "chunk_too_large" {
            "chunk"
        } else {
            "body"
        };
        let size = e
            .len
            .map_or_else(|| format!("more than {}", e.max), |n| n.to_string());
        ApiError::TooLarge {
            code: e.code,
            message: format!(
                "{what} of {size} bytes exceeds {} ({} bytes)",
                e.name, e.max
            ),
        }
    } else if rej.is_not_found() {
        ApiError::RouteNotFound("this path".into())
    } else if let Some(e) = rej.find::<warp::filters::body::BodyDeserializeError>() {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON for this route: {e}"),
        )
    } else if let Some(e) = rej.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request("invalid_query", format!("query string is invalid: {e}"))
    } else if rej.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::TooLarge {
            code: "body_too_large",
            message: "request body exceeds this route's limit".into(),
        }
    } else if rej.find::<warp::reject::UnsupportedMediaType>().is_some() {
        ApiError::UnsupportedAudio("unsupported Content-Type for this route".into())
    } else if let Some(e) = rej.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request("missing_header", e.to_string())
    } else if let Some(e) = rej.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", e.to_string())
    } else if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::MethodNotAllowed
    } else if rej.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::bad_request("length_required", "Content-Length is required")
    } else {
        ApiError::Internal(anyhow::anyhow!("unhandled rejection: {rej:?}"))
    };
    Ok(err.into_response())
}

/// Seconds a client waits after `too_many_sessions`: sessions last seconds to minutes.
const RETRY_SESSIONS_S: u64 = 5;
/// Seconds a client waits after `provider_busy`: a provider slot frees as soon as any of its
/// sessions or one-shot requests ends, so sessions and one-shot requests share this value.
const RETRY_PROVIDER_S: u64 = 2;
/// Seconds a client waits after `backpressure` or `rate_limited`.
const RETRY_UPLOAD_S: u64 = 1;

/// Provider failures, the same for sessions and one-shot requests: 400 `invalid_option`
/// (unknown provider, an option it cannot honour), 503 `provider_unavailable`, 429
/// `provider_busy`, 413 `audio_rejected` (audio outside what the provider takes), 502 with the
/// upstream's code kept.
impl From<ProviderError> for ApiError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unsupported(m) => ApiError::bad_request("invalid_option", m),
            ProviderError::Unavailable(m) => ApiError::Unavailable {
                code: "provider_unavailable",
                message: m,
            },
            ProviderError::Busy(m) => ApiError::TooBusy {
                code: "provider_busy",
                message: m,
                retry_after_s: RETRY_PROVIDER_S,
            },
            ProviderError::AudioRejected(m) => ApiError::TooLarge {
                code: "audio_rejected",
                message: m,
            },
            ProviderError::Upstream {
                code,
                provider_code,
                message,
            } => ApiError::Upstream {
                code,
                provider_code,
                message,
            },
        }
    }
}

impl From<InvalidOption> for ApiError {
    fn from(e: InvalidOption) -> Self {
        ApiError::bad_request("invalid_option", e.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::StoreUnavailable(e)
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let message = e.to_string();
        match e {
            SessionError::NotFound(id) => ApiError::SessionNotFound(id),
            SessionError::MissingToken => ApiError::Unauthorized {
                code: "missing_session_token",
                message,
            },
            SessionError::WrongToken => ApiError::Forbidden {
                code: "invalid_session_token",
                message,
            },
            SessionError::Closed { id, status } => ApiError::SessionClosed { id, status },
            SessionError::ChunkTooLarge { .. } => ApiError::TooLarge {
                code: "chunk_too_large",
                message,
            },
            SessionError::EmptyChunk => ApiError::bad_request("empty_chunk", message),
            SessionError::Ingest(ie) => {
                let code = match ie {
                    IngestError::Conflict { .. } => "seq_conflict",
                    IngestError::OutOfWindow { .. } => "seq_out_of_window",
                    IngestError::AfterLast { .. } => "seq_after_last",
                    IngestError::Backpressure { .. } => {
                        return ApiError::TooBusy {
                            code: "backpressure",
                            message,
                            retry_after_s: RETRY_UPLOAD_S,
                        }
                    }
                };
                ApiError::Conflict { code, message }
            }
            SessionError::TooMany { .. } | SessionError::TooManyForUser { .. } => {
                ApiError::TooBusy {
                    code: "too_many_sessions",
                    message,
                    retry_after_s: RETRY_SESSIONS_S,
                }
            }
            SessionError::RateLimited { .. } | SessionError::CreatesRateLimited { .. } => {
                ApiError::TooBusy {
                    code: "rate_limited",
                    message,
                    retry_after_s: RETRY_UPLOAD_S,
                }
            }
            SessionError::InvalidOption(o) => o.into(),
            SessionError::UnsupportedAudio(m) => ApiError::UnsupportedAudio(m),
            SessionError::Provider(p) => p.into(),
            SessionError::ShuttingDown => ApiError::Unavailable {
                code: "shutting_down",
                message,
            },
            SessionError::Store(s) => s.into(),
        }
    }
}

impl From<OneShotError> for ApiError {
    fn from(e: OneShotError) -> Self {
        let message = e.to_string();
        match e {
            OneShotError::InvalidOption(o) => o.into(),
            OneShotError::UnsupportedAudio(m) => ApiError::UnsupportedAudio(m),
            OneShotError::TooLong { .. } => ApiError::TooLarge {
                code: "audio_too_long",
                message,
            },
            OneShotError::Provider(p) => p.into(),
            OneShotError::Busy(_) => ApiError::TooBusy {
                code: "too_many_recognitions",
                message,
                retry_after_s: RETRY_PROVIDER_S,
            },
            OneShotError::Store(s) => s.into(),
            OneShotError::Decoder(j) => ApiError::Internal(anyhow::Error::new(j)),
        }
    }
}
