//! Persistence of sessions and their final results, behind [`SessionStore`]: on SQLite
//! (`sqlite`, the default) or on Redis (`redis`, the shared engine of issue 12). The store knows nothing of providers or HTTP.

mod chunk_files;
pub use chunk_files::OPEN_FILES as OPEN_CHUNK_FILES;
mod history_redis;
mod history_sqlite;
pub mod redis;
pub mod redis_coord;
pub mod sqlite;
pub mod timed;

use serde::{Deserialize, Serialize};

/// A session row: what survives a restart.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SessionRecord {
    /// UUID v4, hyphenated.
    pub id: String,
    /// Owner, when auth is on.
    pub user_id: Option<String>,
    /// Hex SHA-256 of the session token.
    pub token_sha256: String,
    /// Provider name.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
    /// Creation options as JSON.
    pub options_json: String,
    /// `open` | `finishing` | `finished` | `cancelled` | `expired` | `failed`.
    pub status: String,
    /// Changes when in-memory state may have been lost.
    pub epoch: u64,
    /// Highest contiguous chunk seq received.
    pub acked_seq: Option<u64>,
    /// Audio received, ms.
    pub audio_ms: u64,
    /// Finals so far, joined.
    pub transcript: String,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub updated_at_ms: u64,
    /// Unix ms.
    pub ended_at_ms: Option<u64>,
}

/// Progress written while a session runs and when it ends.
#[derive(Debug, Clone)]
pub struct SessionProgress {
    /// New status.
    pub status: String,
    /// Highest contiguous chunk seq received.
    pub acked_seq: Option<u64>,
    /// Audio received, ms.
    pub audio_ms: u64,
    /// Finals so far, joined.
    pub transcript: String,
    /// Set when the session ends.
    pub end_reason: Option<String>,
    /// Unix ms.
    pub at_ms: u64,
}

/// A stored event: its seq in the session log and its JSON exactly as served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Event seq.
    pub seq: u64,
    /// Event JSON.
    pub json: String,
}

/// Storage errors keep their source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// The pool could not hand out a connection.
    #[error("database pool error: {0}")]
    Pool(String),
    /// Redis failed or could not be reached.
    #[error("redis error")]
    Redis(#[from] ::redis::RedisError),
    /// A write under an epoch that is no longer the session's: another replica took the
    /// session over (Redis engine only); the writer must stop running the session.
    #[error("the session was taken over by another replica")]
    Fenced,
    /// A stored value could not be read back.
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
    /// A chunk file could not be written, read or removed (disk full, permissions).
    #[error("chunk file error: {0}")]
    Io(String),
}

/// Where sessions live between requests and across restarts.
#[async_trait::async_trait]
pub trait SessionStore: Send + Sync {
    /// Inserts a new session row.
    async fn insert_session(&self, rec: &SessionRecord) -> Result<(), StoreError>;
    /// Updates a running session's progress.
    async fn update_progress(&self, id: &str, p: &SessionProgress) -> Result<(), StoreError>;
    /// Appends a final (or terminal) event; idempotent on (session, seq).
    async fn append_event(&self, id: &str, ev: &StoredEvent) -> Result<(), StoreError>;
    /// Records the end of a session and its `end` event atomically.
    async fn end_session(
        &self,
        id: &str,
        p: &SessionProgress,
        end: &StoredEvent,
    ) -> Result<(), StoreError>;
    /// Reads a session row.
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError>;
    /// Stored events with seq > `after`, ascending.
    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, StoreError>;
    /// Sessions not yet ended (left open by a previous process), each with its highest stored
    /// event seq (0 when none).
    async fn unfinished(&self) -> Result<Vec<(SessionRecord, u64)>, StoreError>;
    /// A handle whose writes for a session (progress, events, end, seq reservations) are
    /// refused with [`StoreError::Fenced`] once the session's epoch moves past `epoch`, i.e.
    /// once another replica took it over. Stores without replicas return themselves.
    fn fenced(&self, epoch: u64) -> std::sync::Arc<dyn SessionStore>;
    /// Checks the database is writable (for `/ready`).
    async fn check_writable(&self) -> Result<(), StoreError>;
    /// Writes accepted chunks at once (the group commit of uploads: SQLite appends them to the
    /// sessions' chunk files, Redis in one transaction); idempotent on (session, seq): the
    /// first write of a seq wins.
    async fn put_chunks(&self, chunks: Vec<ChunkRecord>) -> Result<(), StoreError>;
    /// A running session's stored chunks, ascending by seq.
    async fn chunks(&self, id: &str) -> Result<Vec<ChunkRecord>, StoreError>;
    /// Records that event seqs up to `upto` may have been handed out.
    async fn reserve_seqs(&self, id: &str, upto: u64) -> Result<(), StoreError>;
    /// The highest event seq reserved for a session (0 when none).
    async fn reserved_seqs(&self, id: &str) -> Result<u64, StoreError>;
}

/// One accepted audio chunk as stored for resumption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Session id.
    pub session_id: String,
    /// Chunk seq.
    pub seq: u64,
    /// Uploaded with `last=1`.
    pub last: bool,
    /// The bytes as uploaded (shared with the upload's body, not copied).
    pub data: bytes::Bytes,
}

/// A one-shot recognition as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RecognitionRecord {
    /// UUID v4, hyphenated.
    pub id: String,
    /// Owner, when auth is on.
    pub user_id: Option<String>,
    /// Provider name.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
    /// Sentences joined.
    pub text: String,
    /// Sentences as JSON (`[{sentence, text, start_ms, end_ms, words?}]`).
    pub sentences_json: String,
    /// Audio duration, ms.
    pub duration_ms: u64,
    /// Unix ms.
    pub created_at_ms: u64,
}

/// One history entry: a session or a one-shot recognition.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HistoryItem {
    /// Session or recognition id.
    pub id: String,
    /// `session` | `recognition`.
    pub kind: String,
    /// Provider name.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
    /// Transcript.
    pub text: String,
    /// Session status (`finished` for recognitions).
    pub status: String,
    /// Audio duration, ms.
    pub duration_ms: u64,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms (recognitions end when created).
    pub ended_at_ms: Option<u64>,
    /// Final sentences; filled by [`HistoryStore::history_item`] only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentences: Option<Vec<serde_json::Value>>,
}

/// Outcome of a history deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// Removed.
    Yes,
    /// No such entry for this user.
    NotFound,
    /// A session still open: cancel it first.
    StillOpen,
}

/// Per-user recognition history over sessions and one-shot recognitions.
#[async_trait::async_trait]
pub trait HistoryStore: Send + Sync {
    /// Records a one-shot recognition.
    async fn insert_recognition(&self, rec: &RecognitionRecord) -> Result<(), StoreError>;
    /// The user's entries, newest first, strictly before the cursor `(created_at_ms, id)`.
    async fn history(
        &self,
        user: Option<String>,
        before: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError>;
    /// One entry of the user's with its sentences.
    async fn history_item(
        &self,
        user: Option<String>,
        id: &str,
    ) -> Result<Option<HistoryItem>, StoreError>;
    /// Deletes one entry of the user's (a session with its events).
    async fn delete_history(&self, user: Option<String>, id: &str) -> Result<Deleted, StoreError>;
    /// Deletes ended sessions and recognitions older than `before_ms`; returns how many.
    async fn purge(&self, before_ms: u64) -> Result<usize, StoreError>;
}

/// The history form of a stored event: `{sentence, text, start_ms, end_ms, words?}` for a
/// non-empty final, `None` for anything else. Shared by both history stores.
pub(crate) fn history_sentence(event_json: &str) -> Option<serde_json::Value> {
    let e: serde_json::Value = serde_json::from_str(event_json).ok()?;
    if e["type"] != "final" || e["text"] == "" {
        return None;
    }
    let mut s = serde_json::json!({
        "sentence": e["sentence"], "text": e["text"],
        "start_ms": e["start_ms"], "end_ms": e["end_ms"],
    });
    if e.get("words").is_some() {
        s["words"] = e["words"].clone();
    }
    Some(s)
}
