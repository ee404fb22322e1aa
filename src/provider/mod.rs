//! Streaming ASR providers behind one trait.
//!
//! A provider speaks only its upstream protocol and holds none of voxpoll's session state. A
//! session opens a [`ProviderStream`] with its options, pushes 16 kHz mono s16 audio in order,
//! sends [`ProviderInput::Finish`] at the end (or cancels its token), and reads
//! [`ProviderEvent`]s until [`ProviderEvent::Done`]. Channels rather than `async fn`s keep the
//! shape identical for an in-process engine (the embedded one), a WebSocket upstream (Tencent
//! real-time ASR, FunASR) and request-per-utterance HTTP servers (OpenAI-compatible).

pub mod embedded;
pub mod whisper;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Options a session passes to its provider. Names follow Tencent real-time ASR's parameters
/// (cloud.tencent.com/document/product/1093/48982) so they pass through unchanged there.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct StreamOptions {
    /// Engine model type, e.g. `16k_zh`, `16k_en`.
    pub engine: String,
    /// Emit partial results (`slice_type` 0/1 on Tencent).
    pub partials: bool,
    /// Non-speech that ends a sentence, in ms (Tencent `vad_silence_time`).
    pub vad_silence_ms: Option<u64>,
    /// Tencent `filter_dirty` (0/1/2).
    pub filter_dirty: Option<u8>,
    /// Tencent `filter_modal` (0/1/2).
    pub filter_modal: Option<u8>,
    /// Tencent `filter_punc` (0/1).
    pub filter_punc: Option<u8>,
    /// Tencent `convert_num_mode` (0/1/3).
    pub convert_num_mode: Option<u8>,
    /// Tencent `word_info` (0/1/2).
    pub word_info: Option<u8>,
    /// Tencent `hotword_list` ("word|weight,word|weight").
    pub hotword_list: Option<String>,
}

/// Audio and control sent to a provider stream, in order.
#[derive(Debug)]
pub enum ProviderInput {
    /// 16 kHz mono signed 16-bit samples.
    Audio(Vec<i16>),
    /// No more audio: flush the last sentence, then send [`ProviderEvent::Done`].
    Finish,
}

/// One word with its times (Tencent `word_list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Word {
    /// The word or character.
    pub word: String,
    /// Stream time, ms.
    pub start_ms: u64,
    /// Stream time, ms.
    pub end_ms: u64,
}

/// A recognition result for one sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recognition {
    /// Sentence index in the stream, from 0 (Tencent `index`).
    pub sentence: u32,
    /// Recognised text (Simplified Chinese for `*_zh` engines).
    pub text: String,
    /// Stream time of the sentence start, ms.
    pub start_ms: u64,
    /// Stream time of the sentence end (or of the audio seen so far for a partial), ms.
    pub end_ms: u64,
    /// Word timings when the provider gives them.
    pub words: Option<Vec<Word>>,
}

/// What a provider stream reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderEvent {
    /// The current guess for a sentence; replaced by later partials and its final.
    Partial(Recognition),
    /// The stable text of a sentence.
    Final(Recognition),
    /// Something degraded but the stream goes on.
    Warning {
        /// Machine code.
        code: String,
        /// Human text.
        message: String,
    },
    /// The stream failed; a [`ProviderEvent::Done`] follows.
    Error {
        /// Machine code (the provider's own code where it has one).
        code: String,
        /// Human text.
        message: String,
    },
    /// The stream is over: every result has been sent.
    Done,
}

/// Why a provider cannot open a stream.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The session asked for something this provider does not do (415/400 to the client).
    #[error("{0}")]
    Unsupported(String),
    /// The provider is not usable now (model missing, credentials absent, upstream down).
    #[error("{0}")]
    Unavailable(String),
}

/// Readiness as reported by `GET /ready`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Whether new streams can be opened.
    pub ready: bool,
    /// Human detail (model path, why not ready).
    pub detail: String,
    /// Provider-specific counters (the embedded engine reports decode work and queue depth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<serde_json::Value>,
}

/// The two ends of an open stream. Dropping `input` without [`ProviderInput::Finish`] is a cancel.
pub struct ProviderStream {
    /// Bounded: a full channel is backpressure towards the session.
    pub input: mpsc::Sender<ProviderInput>,
    /// Results in order; closes after [`ProviderEvent::Done`].
    pub events: mpsc::Receiver<ProviderEvent>,
}

/// A streaming ASR provider. Implementations are shared by all sessions (`Arc<dyn Provider>`).
pub trait Provider: Send + Sync {
    /// The configured name sessions select it by.
    fn name(&self) -> &str;

    /// Whether it can open streams now.
    fn readiness(&self) -> Readiness;

    /// Opens a stream. The provider stops its work when `cancel` fires or `input` is dropped.
    ///
    /// # Errors
    /// [`ProviderError::Unsupported`] for options it cannot honour (e.g. an unknown engine);
    /// [`ProviderError::Unavailable`] when not ready.
    fn open(
        &self,
        opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError>;
}
