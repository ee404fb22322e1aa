//! What the engine answers, shaped as the API serves it (shared/api.md, "Sessions"): every
//! transport serialises these as they are.

use super::event::Event;
use crate::store::SessionRecord;
use serde::{Deserialize, Serialize};

/// Answer to session creation.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// Session id.
    pub session_id: String,
    /// Secret for calls on this session (≥128 random bits, hex).
    pub session_token: String,
    /// `open`.
    pub status: String,
    /// Server epoch.
    pub epoch: u64,
    /// Unix ms after which an idle session expires, as of now.
    pub expires_at_ms: u64,
    /// Long-poll limits.
    pub poll: PollLimits,
    /// Upload limits.
    pub upload: UploadLimits,
}

/// Advertised long-poll limits.
#[derive(Debug, Clone, Serialize)]
pub struct PollLimits {
    /// Default hold, ms.
    pub hold_ms: u64,
    /// Longest hold honoured, ms.
    pub max_hold_ms: u64,
}

/// Advertised upload limits.
#[derive(Debug, Clone, Serialize)]
pub struct UploadLimits {
    /// Largest chunk body, bytes.
    pub max_chunk_bytes: usize,
    /// Chunk size clients should record and send, bytes (RecorderManager `frameSize` is this
    /// in KB).
    pub chunk_bytes: usize,
    /// Chunks to keep in flight.
    pub max_inflight: u32,
    /// Reorder window, chunks.
    pub window: u64,
}

/// Answer to a chunk upload.
#[derive(Debug, Clone, Serialize)]
pub struct UploadAck {
    /// Highest seq with every chunk ≤ it received (absent before chunk 0 arrives).
    pub acked_seq: Option<u64>,
    /// True when this exact chunk had already been received.
    pub duplicate: bool,
}

/// Answer to `POST …/audio`: the ack, plus with `after=K` the poll fields of
/// [`PollResult`] at the same level (results ride on uploads).
#[derive(Debug, Clone, Serialize)]
pub struct UploadReply {
    /// The ack.
    #[serde(flatten)]
    pub ack: UploadAck,
    /// The piggy-backed poll, when asked for.
    #[serde(flatten)]
    pub poll: Option<PollResult>,
}

/// Answer to a poll.
#[derive(Debug, Clone, Serialize)]
pub struct PollResult {
    /// Events with seq > `after`, ascending.
    pub events: Vec<Event>,
    /// Pass as `after` next time.
    pub next_cursor: u64,
    /// Session status.
    pub status: String,
    /// Epoch.
    pub epoch: u64,
    /// True once the `end` event is in this or an earlier response.
    pub done: bool,
}

/// One final sentence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sentence {
    /// Sentence index.
    pub sentence: u32,
    /// Final text.
    pub text: String,
    /// Stream time, ms.
    pub start_ms: u64,
    /// Stream time, ms.
    pub end_ms: u64,
}

impl Sentence {
    /// The sentence a final event states.
    pub fn of(ev: &Event) -> Self {
        Self {
            sentence: ev.sentence,
            text: ev.text.clone(),
            start_ms: ev.start_ms,
            end_ms: ev.end_ms,
        }
    }
}

/// Answer to `GET /v1/sessions/{id}` (also of finish and cancel).
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: String,
    /// Status.
    pub status: String,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Highest contiguous seq received.
    pub acked_seq: Option<u64>,
    /// Audio received, ms.
    pub audio_ms: u64,
    /// Finals so far, joined.
    pub transcript: String,
    /// Finals so far.
    pub sentences: Vec<Sentence>,
    /// Newest event seq.
    pub last_event_seq: u64,
    /// Epoch.
    pub epoch: u64,
    /// Provider name.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub updated_at_ms: u64,
    /// Unix ms.
    pub ended_at_ms: Option<u64>,
}

impl SessionInfo {
    /// The view of a session record (live or stored) with its finals and newest event seq.
    pub fn new(rec: SessionRecord, sentences: Vec<Sentence>, last_event_seq: u64) -> Self {
        Self {
            session_id: rec.id,
            status: rec.status,
            end_reason: rec.end_reason,
            acked_seq: rec.acked_seq,
            audio_ms: rec.audio_ms,
            transcript: rec.transcript,
            sentences,
            last_event_seq,
            epoch: rec.epoch,
            provider: rec.provider,
            engine: rec.engine,
            created_at_ms: rec.created_at_ms,
            updated_at_ms: rec.updated_at_ms,
            ended_at_ms: rec.ended_at_ms,
        }
    }
}
