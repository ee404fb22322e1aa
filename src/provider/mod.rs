//! Streaming ASR providers behind one trait.
//!
//! A provider speaks only its upstream protocol and holds none of voxpoll's session state. A
//! session opens a [`ProviderStream`] with its options, pushes 16 kHz mono s16 audio in order,
//! sends [`ProviderInput::Finish`] at the end (or cancels its token), and reads
//! [`ProviderEvent`]s until [`ProviderEvent::Done`]. Channels rather than `async fn`s keep the
//! shape identical for an in-process engine (the embedded one), a WebSocket upstream (Tencent
//! real-time ASR, FunASR) and request-per-utterance HTTP servers (OpenAI-compatible).

pub mod embedded;
pub mod funasr;
pub mod loopback;
pub mod openai;
pub mod registry;
pub mod segmented;
pub mod tencent;
pub mod text;
pub mod whisper;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Opens a WebSocket to an upstream ASR server (Tencent real-time, FunASR) with settings for
/// many small-message streams: Nagle off (a 200 ms audio frame goes out at once), an 8 KiB read
/// buffer (tungstenite's default, 128 KiB, is allocated per stream and zeroed on every read:
/// a profile of 200 Tencent streams put 10 % of voxpoll's CPU in that `memset`), and answers
/// bounded at 1 MiB per message and frame (results are a few KB of JSON).
///
/// # Errors
/// The handshake's error, as `connect_async` gives it.
pub async fn connect_upstream<R>(
    request: R,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
>
where
    R: tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
{
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
    Ok(ws)
}

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
    /// Set when the session's compressed audio (MP3/AAC) is passed through: the stream then
    /// gets [`ProviderInput::Encoded`] frames. Only for providers whose
    /// [`Provider::accepts_encoded`] said yes.
    #[serde(skip)]
    pub encoded: Option<crate::audio::AudioFormat>,
}

/// Audio and control sent to a provider stream, in order.
#[derive(Debug)]
pub enum ProviderInput {
    /// 16 kHz mono signed 16-bit samples.
    Audio(Vec<i16>),
    /// Compressed frames passed through as the client recorded them (whole MP3 frames or whole
    /// ADTS frames, header included), with the same audio decoded to 16 kHz mono for providers
    /// that need samples (pacing, VAD). Sent only when [`StreamOptions::encoded`] is set.
    Encoded {
        /// The original frames, one per element, in order.
        frames: Vec<Vec<u8>>,
        /// The frames decoded, 16 kHz mono.
        pcm: Vec<i16>,
    },
    /// End the current sentence here without ending the stream (a client's
    /// `POST …/finalize`): its final follows as if its closing silence had been heard. A
    /// provider whose upstream cannot do that answers [`ProviderEvent::Warning`]
    /// `finalize_unsupported` once and goes on.
    Finalize,
    /// No more audio: flush the last sentence, then send [`ProviderEvent::Done`].
    Finish,
}

impl ProviderInput {
    /// What a VAD-segmented stream asks its segmenter for this input, and whether it is the
    /// last ([`ProviderInput::Finish`]).
    pub(crate) fn segmenter_op(self) -> (crate::audio::vad_pool::Op, bool) {
        use crate::audio::vad_pool::Op;
        match self {
            Self::Audio(pcm) | Self::Encoded { pcm, .. } => (Op::Push(pcm), false),
            Self::Finalize => (Op::Cut, false),
            Self::Finish => (Op::Finish, true),
        }
    }
}

/// The next input of a stream, or `None` once it is cancelled or its sender is gone.
pub(crate) async fn next_input(
    input: &mut mpsc::Receiver<ProviderInput>,
    cancel: &CancellationToken,
) -> Option<ProviderInput> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        m = input.recv() => m,
    }
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
    /// Speech began: sentence `sentence` opened at `start_ms` (stream time, ms); its partials
    /// and final follow. The embedded and VAD-segmented providers send it when their VAD has
    /// heard `min_voiced_ms` of speech; Tencent when it answers `slice_type` 0.
    SpeechStart {
        /// Sentence index.
        sentence: u32,
        /// Stream time where the sentence starts, ms.
        start_ms: u64,
    },
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
        /// voxpoll's machine code (`provider_auth_failed`, `provider_error`, …).
        code: String,
        /// The upstream's own code verbatim (Tencent `4008`, TC3 `AuthFailure.SignatureFailure`).
        provider_code: Option<String>,
        /// Human text (the upstream's message where it gave one).
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
    /// A configured concurrency limit is reached (429 with `Retry-After` to the client).
    #[error("{0}")]
    Busy(String),
    /// The audio is outside what the provider takes (too long, too large, wrong codec).
    #[error("{0}")]
    AudioRejected(String),
    /// The upstream answered with an error (502 to the client, its code kept).
    #[error("{message}")]
    Upstream {
        /// voxpoll's machine code.
        code: String,
        /// The upstream's own code verbatim.
        provider_code: Option<String>,
        /// Human text.
        message: String,
    },
}

/// Audio of a one-shot recognition.
#[derive(Debug, Clone)]
pub struct OneShotAudio {
    /// The whole recording as 16 kHz mono s16 samples.
    pub pcm: Vec<i16>,
    /// The upload as sent, for providers that take its codec as is (Tencent `VoiceFormat`,
    /// OpenAI's file formats); `None` for raw PCM.
    pub original: Option<Original>,
}

/// An uploaded file as received.
#[derive(Debug, Clone)]
pub struct Original {
    /// The bytes.
    pub bytes: bytes::Bytes,
    /// Container/codec: `wav`, `mp3`, `m4a`, `aac`, `ogg`, `flac`.
    pub format: String,
    /// Its sample rate, Hz.
    pub rate: u32,
    /// Its channel count.
    pub channels: u16,
}

impl OneShotAudio {
    /// Duration of [`OneShotAudio::pcm`], ms.
    pub fn duration_ms(&self) -> u64 {
        self.pcm.len() as u64 / 16
    }
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
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// The configured name sessions select it by.
    fn name(&self) -> &str;

    /// Whether it can open streams now.
    fn readiness(&self) -> Readiness;

    /// Whether a stream takes `format` (MP3 or AAC) as the client sent it, for sessions that
    /// declared the engine's sample rate and mono. Default: no (the session decodes to PCM).
    fn accepts_encoded(&self, _format: crate::audio::AudioFormat) -> bool {
        false
    }

    /// Whether a stream ends a sentence on [`ProviderInput::Finalize`]. Default: no (the
    /// session then warns `finalize_unsupported` and never sends it).
    fn can_finalize(&self) -> bool {
        false
    }

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

    /// Recognises a whole recording at once (`POST /v1/recognize`). Returns the final sentences
    /// in order. The default streams the audio through [`Provider::open`] as fast as the stream
    /// takes it; providers with a one-shot API of their own override it.
    ///
    /// # Errors
    /// As [`Provider::open`], plus [`ProviderError::Upstream`] when the stream fails.
    async fn recognize(
        &self,
        audio: OneShotAudio,
        opts: &StreamOptions,
    ) -> Result<Vec<Recognition>, ProviderError> {
        recognize_via_stream(self.open(opts, CancellationToken::new())?, audio.pcm).await
    }
}

/// Feeds `pcm` into an open stream in 200 ms pieces, finishes it, and collects its finals.
///
/// # Errors
/// [`ProviderError::Upstream`] when the stream reports an error or closes early.
pub async fn recognize_via_stream(
    stream: ProviderStream,
    pcm: Vec<i16>,
) -> Result<Vec<Recognition>, ProviderError> {
    recognize_via_stream_with(stream, pcm, |_| {}).await
}

/// [`recognize_via_stream`], calling `on_final` with each non-empty final as it arrives.
///
/// # Errors
/// As [`recognize_via_stream`].
pub async fn recognize_via_stream_with(
    stream: ProviderStream,
    pcm: Vec<i16>,
    mut on_final: impl FnMut(&Recognition) + Send,
) -> Result<Vec<Recognition>, ProviderError> {
    let ProviderStream { input, mut events } = stream;
    let feeder = tokio::spawn(async move {
        for piece in pcm.chunks(3200) {
            if input
                .send(ProviderInput::Audio(piece.to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = input.send(ProviderInput::Finish).await;
        // Keep the sender alive until the stream is done: dropping it would cancel.
        input.closed().await;
    });
    let mut finals = Vec::new();
    let mut failure = None;
    let mut done = false;
    while let Some(ev) = events.recv().await {
        match ev {
            ProviderEvent::Final(r) if !r.text.is_empty() => {
                on_final(&r);
                finals.push(r);
            }
            ProviderEvent::Error {
                code,
                provider_code,
                message,
            } => {
                failure.get_or_insert(ProviderError::Upstream {
                    code,
                    provider_code,
                    message,
                });
            }
            ProviderEvent::Done => {
                done = true;
                break;
            }
            _ => {}
        }
    }
    feeder.abort();
    match failure {
        Some(e) => Err(e),
        None if !done => Err(ProviderError::Upstream {
            code: "provider_closed".into(),
            provider_code: None,
            message: "the provider stream closed before its last result".into(),
        }),
        None => Ok(finals),
    }
}
