//! One-shot recognition (`POST /v1/recognize` and the seeds' `/api/realtime-voice/recognize`):
//! decode the whole upload, hand it to the chosen provider's one-shot path, record the result
//! in history. Transport-free: the HTTP layer parses the request, shapes the answer and maps
//! [`OneShotError`] through `crate::error`.

use crate::audio::file::{decode, sniff, FileError};
use crate::clock::now_ms;
use crate::provider::registry::Providers;
use crate::provider::{OneShotAudio, Original, ProviderError, Recognition};
use crate::session::{sentence_joiner, CreateOptions, InvalidOption};
use crate::store::{HistoryStore, RecognitionRecord, StoreError};
use serde::Serialize;
use std::sync::Arc;

/// An upload to recognise.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The file bytes.
    pub bytes: bytes::Bytes,
    /// Declared format (`wav`, `mp3`, `aac`, `m4a`, `ogg`, `flac`, `pcm`); `None` to detect.
    pub format: Option<String>,
    /// Recognition options (the session options; `sample_rate`/`channels` for raw PCM).
    pub options: CreateOptions,
}

/// One sentence of a one-shot answer.
#[derive(Debug, Clone, Serialize)]
pub struct SentenceOut {
    /// Sentence index from 0.
    pub sentence: u32,
    /// Text.
    pub text: String,
    /// Audio time, ms.
    pub start_ms: u64,
    /// Audio time, ms.
    pub end_ms: u64,
    /// Word timings when `word_info` > 0 and the provider gives them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<crate::provider::Word>>,
}

/// The answer of a one-shot recognition.
#[derive(Debug, Clone, Serialize)]
pub struct Recognized {
    /// History id.
    pub id: String,
    /// Sentences joined.
    pub text: String,
    /// Final sentences in order.
    pub sentences: Vec<SentenceOut>,
    /// Audio duration, ms.
    pub duration_ms: u64,
    /// Provider that recognised it.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
}

/// What a streamed one-shot recognition reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The audio decoded and the provider stream is open: results follow.
    Started,
    /// A final sentence's text (non-empty), in order.
    Final(String),
}

/// Why a one-shot recognition failed; `crate::error` maps each to its HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum OneShotError {
    /// A recognition option is invalid (400 `invalid_option`).
    #[error(transparent)]
    InvalidOption(#[from] InvalidOption),
    /// The upload does not decode (415 `unsupported_audio`).
    #[error("{0}")]
    UnsupportedAudio(String),
    /// The audio is longer than `max_recognize_audio_ms` (413 `audio_too_long`).
    #[error("the audio lasts {duration_ms} ms or more; one-shot recognition takes at most {max_ms} ms (max_recognize_audio_ms)")]
    TooLong {
        /// Decoded duration, ms.
        duration_ms: u64,
        /// The limit, ms.
        max_ms: u64,
    },
    /// The provider refused or failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// Recording the result in history failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
    /// `max_recognize_concurrent` recognitions are running (429 `too_many_recognitions`).
    #[error("{0} one-shot recognitions are running, the limit of max_recognize_concurrent; retry shortly")]
    Busy(usize),
    /// The decode task died.
    #[error("the decoder task failed")]
    Decoder(#[from] tokio::task::JoinError),
}

/// What one-shot recognition needs: the providers, the history it records into, and its
/// limits.
#[derive(Clone)]
pub struct Recognizer {
    /// Shared, not copied: the state is cloned for every request.
    providers: Arc<Providers>,
    history: Arc<dyn HistoryStore>,
    max_audio_ms: u64,
    max_concurrent: usize,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Recognizer {
    /// Recognition with `providers`, recorded in `history`; audio up to `max_audio_ms` ms
    /// (`max_recognize_audio_ms`), at most `max_concurrent` at once (`max_recognize_concurrent`).
    pub fn new(
        providers: Providers,
        history: Arc<dyn HistoryStore>,
        max_audio_ms: u64,
        max_concurrent: usize,
    ) -> Self {
        Self {
            providers: Arc::new(providers),
            history,
            max_audio_ms,
            max_concurrent,
            slots: Arc::new(tokio::sync::Semaphore::new(max_concurrent)),
        }
    }

    /// Recognises `upload` for `user` and records it in history.
    ///
    /// # Errors
    /// See [`OneShotError`].
    pub async fn recognize(
        &self,
        upload: Upload,
        user: Option<String>,
    ) -> Result<Recognized, OneShotError> {
        self.recognize_with(upload, user, None).await
    }

    /// [`Recognizer::recognize`], telling `progress` (when given) once the audio decoded and the
    /// provider stream opened ([`Progress::Started`]), then each final's text as the provider
    /// delivers it ([`Progress::Final`]): the audio then goes through the provider's stream
    /// rather than its one-shot API. Used by the OpenAI route's `stream=true`.
    ///
    /// # Errors
    /// See [`OneShotError`].
    pub async fn recognize_with(
        &self,
        upload: Upload,
        user: Option<String>,
        progress: Option<tokio::sync::mpsc::UnboundedSender<Progress>>,
    ) -> Result<Recognized, OneShotError> {
        // Taken before any decoding: a flood of uploads cannot queue unbounded work.
        let _slot = self
            .slots
            .try_acquire()
            .map_err(|_| OneShotError::Busy(self.max_concurrent))?;
        let opts = upload.options.clone();
        let mut stream_opts = opts.stream_options()?;
        stream_opts.partials = false;
        let (provider_name, provider) = self.providers.get(opts.provider.as_deref())?;
        let format = match upload.format.as_deref() {
            Some(f) => Some(crate::audio::file::format_from_name(f).ok_or_else(|| {
                OneShotError::UnsupportedAudio(format!("unknown audio format {f:?}"))
            })?),
            None => sniff(&upload.bytes),
        };
        let (rate, channels) = (
            opts.sample_rate.unwrap_or(16_000),
            opts.channels.unwrap_or(1),
        );
        let bytes = upload.bytes.clone();
        let max_ms = self.max_audio_ms;
        let decoded =
            tokio::task::spawn_blocking(move || decode(&bytes, format, rate, channels, max_ms))
                .await?
                .map_err(|e| match e {
                    FileError::Audio(e) => OneShotError::UnsupportedAudio(e.0),
                    FileError::TooLong { at_least_ms } => OneShotError::TooLong {
                        duration_ms: at_least_ms,
                        max_ms,
                    },
                })?;
        let audio = OneShotAudio {
            original: (decoded.format != "pcm").then(|| Original {
                bytes: upload.bytes.clone(),
                format: decoded.format.clone(),
                rate: decoded.rate,
                channels: decoded.channels,
            }),
            pcm: decoded.pcm,
        };
        let duration_ms = audio.duration_ms();
        if duration_ms > self.max_audio_ms {
            return Err(OneShotError::TooLong {
                duration_ms,
                max_ms: self.max_audio_ms,
            });
        }
        let started = std::time::Instant::now();
        let sentences: Vec<Recognition> = match progress {
            None => provider.recognize(audio, &stream_opts).await?,
            Some(tx) => {
                let stream =
                    provider.open(&stream_opts, tokio_util::sync::CancellationToken::new())?;
                let _ = tx.send(Progress::Started);
                crate::provider::recognize_via_stream_with(stream, audio.pcm, |r| {
                    let _ = tx.send(Progress::Final(r.text.clone()));
                })
                .await?
            }
        };
        tracing::info!(
            provider = %provider_name,
            duration_ms,
            elapsed_ms = started.elapsed().as_millis() as u64,
            sentences = sentences.len(),
            "one-shot recognition"
        );
        let want_words = stream_opts.word_info.unwrap_or(0) > 0;
        let sentences: Vec<SentenceOut> = sentences
            .into_iter()
            .filter(|r| !r.text.is_empty())
            .enumerate()
            .map(|(i, r)| SentenceOut {
                sentence: i as u32,
                text: r.text,
                start_ms: r.start_ms,
                end_ms: r.end_ms,
                words: if want_words { r.words } else { None },
            })
            .collect();
        let text = sentences
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(sentence_joiner(&stream_opts.engine));
        let id = uuid::Uuid::new_v4().to_string();
        let rec = RecognitionRecord {
            id: id.clone(),
            user_id: user,
            provider: provider_name.clone(),
            engine: stream_opts.engine.clone(),
            text: text.clone(),
            sentences_json: serde_json::to_string(&sentences).unwrap_or_else(|_| "[]".into()),
            duration_ms,
            created_at_ms: now_ms(),
        };
        self.history.insert_recognition(&rec).await?;
        Ok(Recognized {
            id,
            text,
            sentences,
            duration_ms,
            provider: provider_name,
            engine: stream_opts.engine,
        })
    }
}
