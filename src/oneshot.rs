//! One-shot recognition (`POST /v1/recognize` and the seeds' `/api/realtime-voice/recognize`):
//! decode the whole upload, hand it to the chosen provider's one-shot path, record the result
//! in history. Transport-free: the HTTP layer parses the request and shapes the answer.

use crate::audio::file::{decode, sniff};
use crate::error::ApiError;
use crate::http::AppState;
use crate::provider::{OneShotAudio, Original, ProviderError, Recognition};
use crate::session::{now_ms, sentence_joiner, CreateOptions};
use crate::store::RecognitionRecord;
use serde::Serialize;

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

/// Maps a provider failure of a one-shot request to its HTTP error.
pub fn provider_error(e: ProviderError) -> ApiError {
    match e {
        ProviderError::Unsupported(m) => ApiError::bad_request("invalid_option", m),
        ProviderError::Unavailable(m) => ApiError::Unavailable {
            code: "provider_unavailable",
            message: m,
        },
        ProviderError::Busy(m) => ApiError::TooBusy {
            code: "provider_busy",
            message: m,
            retry_after_s: 2,
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

/// Recognises `upload` for `user` and records it.
///
/// # Errors
/// 400 invalid options, 415 undecodable audio, 413 audio over the duration limit, provider
/// errors per [`provider_error`], 500 storage failures.
pub async fn recognize(
    state: &AppState,
    upload: Upload,
    user: Option<String>,
) -> Result<Recognized, ApiError> {
    let opts = upload.options.clone();
    let mut stream_opts = opts.stream_options().map_err(ApiError::from)?;
    stream_opts.partials = false;
    let (provider_name, provider) = state
        .sessions
        .providers()
        .get(opts.provider.as_deref())
        .map_err(ApiError::from)?;
    let format = match upload.format.as_deref() {
        Some(f) => Some(
            crate::audio::file::format_from_name(f)
                .ok_or_else(|| ApiError::UnsupportedAudio(format!("unknown audio format {f:?}")))?,
        ),
        None => sniff(&upload.bytes),
    };
    let (rate, channels) = (
        opts.sample_rate.unwrap_or(16_000),
        opts.channels.unwrap_or(1),
    );
    let bytes = upload.bytes.clone();
    let decoded = tokio::task::spawn_blocking(move || decode(&bytes, format, rate, channels))
        .await
        .map_err(|e| ApiError::Internal(e.into()))?
        .map_err(|e| ApiError::UnsupportedAudio(e.0))?;
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
    let max = state.config.max_recognize_audio_ms;
    if duration_ms > max {
        return Err(ApiError::TooLarge {
            code: "audio_too_long",
            message: format!(
                "the audio lasts {duration_ms} ms; one-shot recognition takes at most {max} ms (max_recognize_audio_ms)"
            ),
        });
    }
    let started = std::time::Instant::now();
    let sentences: Vec<Recognition> = provider
        .recognize(audio, &stream_opts)
        .await
        .map_err(provider_error)?;
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
    state
        .history
        .insert_recognition(&rec)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Recognized {
        id,
        text,
        sentences,
        duration_ms,
        provider: provider_name,
        engine: stream_opts.engine,
    })
}
