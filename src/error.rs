//! The one error type handlers return, and its single mapping to HTTP: a status plus
//! `{"error": {"code": "snake_case", "message": "..."}}` (shared/api.md, Conventions).

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
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
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
        let mut resp =
            warp::reply::with_status(warp::reply::json(&body), self.status()).into_response();
        if let Self::TooBusy { retry_after_s, .. } = self {
            resp.headers_mut().insert(
                warp::http::header::RETRY_AFTER,
                warp::http::HeaderValue::from(retry_after_s),
            );
        }
        resp
    }
}

/// Rejection raised before a chunk body is read when its Content-Length exceeds the limit.
#[derive(Debug)]
pub struct ChunkTooLarge {
    /// Declared body size, bytes.
    pub len: u64,
    /// Configured limit, bytes.
    pub max: usize,
}

impl warp::reject::Reject for ChunkTooLarge {}

/// Rejection for a request body that could not be read in time (or at all).
#[derive(Debug)]
pub struct BodyError(pub String);

impl warp::reject::Reject for BodyError {}

/// Rejection for a request whose headers exceed the configured limits.
#[derive(Debug)]
pub struct HeadersTooLarge(pub String);

impl warp::reject::Reject for HeadersTooLarge {}

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
    } else if rej.find::<warp::filters::cors::CorsForbidden>().is_some() {
        ApiError::Forbidden {
            code: "cors_forbidden",
            message: "this Origin is not in the CORS allow-list (cors_origins)".into(),
        }
    } else if let Some(e) = rej.find::<ChunkTooLarge>() {
        ApiError::TooLarge {
            code: "chunk_too_large",
            message: format!(
                "chunk of {} bytes exceeds max_chunk_bytes ({} bytes)",
                e.len, e.max
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
