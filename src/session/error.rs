//! What the session engine refuses and why. Transport-free: `crate::error` turns each variant
//! into its HTTP status and code, once, for every transport.

use super::ingest::IngestError;
use super::options::InvalidOption;
use crate::provider::ProviderError;
use crate::store::StoreError;

/// Session-engine failures.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown session id (or a malformed one, cut to 64 characters).
    #[error("no session with id {0}")]
    NotFound(String),
    /// No session token given.
    #[error("this call needs the session's token (X-Session-Token header or session_token query parameter)")]
    MissingToken,
    /// Wrong session token.
    #[error("the session token does not match this session")]
    WrongToken,
    /// The session accepts no more audio.
    #[error("session {id} is {status} and accepts no more audio")]
    Closed {
        /// Session id.
        id: String,
        /// Its status.
        status: String,
    },
    /// A chunk body over `max_chunk_bytes`.
    #[error("chunk of {len} bytes exceeds max_chunk_bytes ({max})")]
    ChunkTooLarge {
        /// Body size, bytes.
        len: usize,
        /// `max_chunk_bytes`.
        max: usize,
    },
    /// An empty chunk that is not the last.
    #[error("empty chunk: only the last chunk (last=1) may be empty")]
    EmptyChunk,
    /// A chunk was refused by the reorder buffer.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// Too many open sessions on this instance.
    #[error("{open} sessions are open, the limit is {max}; retry later")]
    TooMany {
        /// Open now.
        open: usize,
        /// `max_sessions`.
        max: usize,
    },
    /// Too many open sessions for this user.
    #[error("this user has {open} sessions open, the limit is {max}; finish one or retry later")]
    TooManyForUser {
        /// Open now for the user.
        open: usize,
        /// `max_sessions_per_user`.
        max: usize,
    },
    /// The session uploads chunks faster than `max_chunks_per_s`.
    #[error("more than {per_s} chunk uploads per second on this session; slow down")]
    RateLimited {
        /// `max_chunks_per_s`.
        per_s: u32,
    },
    /// Sessions are created faster than `max_creates_per_s`.
    #[error("more than {per_s} sessions created per second on this instance; retry shortly")]
    CreatesRateLimited {
        /// `max_creates_per_s`.
        per_s: u32,
    },
    /// A creation option is invalid.
    #[error(transparent)]
    InvalidOption(#[from] InvalidOption),
    /// The audio format or its parameters are not supported.
    #[error("{0}")]
    UnsupportedAudio(String),
    /// The provider cannot open a stream (unknown name, unavailable, busy, …).
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Storage failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
}
