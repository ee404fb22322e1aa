//! OpenAI-compatible transcription servers: `POST {base}/v1/audio/transcriptions` (OpenAI,
//! speaches/faster-whisper-server, vLLM) and whisper.cpp's server (`POST /inference`).
//! Request and answer shapes follow openai-python's `types/audio/*` and the servers' sources as
//! summarised in shared/providers.md §3: multipart `file` + `model` + `language` +
//! `response_format`; `verbose_json` segments become sentences; with `stream=true` the
//! `transcript.text.delta` events of the SSE answer become partials.
//!
//! Sessions are cut into utterances by VAD ([`super::segmented`]); one-shot requests send the
//! whole file.

use super::segmented::{self, UtteranceRecognizer};
use super::text::TextOptions;
use super::{
    OneShotAudio, Provider, ProviderError, ProviderStream, Readiness, Recognition, StreamOptions,
};
use crate::secret::Secret;
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Which server family: they differ in path defaults, streaming and error shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Flavor {
    /// OpenAI and servers copying its API (speaches, vLLM).
    #[default]
    Openai,
    /// whisper.cpp `examples/server` (WAV input, no `stream`, `{"error": "…"}`).
    WhisperCpp,
}

/// Settings of an OpenAI-compatible provider (`"kind": "openai"` in the providers file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiSettings {
    /// Server root, e.g. `https://api.openai.com` or `http://127.0.0.1:8000`.
    pub base_url: String,
    /// Request path; empty means `/v1/audio/transcriptions` (`/inference` for whisper.cpp).
    pub path: String,
    /// Server family.
    pub flavor: Flavor,
    /// `model` form field (`whisper-1`, `gpt-4o-transcribe`, a speaches model id).
    pub model: String,
    /// Environment variable holding the API key (sent as `Authorization: Bearer`); unset or
    /// empty variable means no header.
    pub api_key_env: String,
    /// Ask for `stream=true` (SSE deltas become partials). OpenAI flavor only.
    pub stream: bool,
    /// `json` or `verbose_json` (segments → sentences with times).
    pub response_format: String,
    /// Per-request timeout, ms.
    pub timeout_ms: u64,
    /// Requests in flight at once from this instance (whisper.cpp serves one at a time).
    pub max_concurrency: usize,
    /// Non-speech that ends an utterance in sessions, ms.
    pub vad_silence_ms: u64,
    /// Retries of a request answered 429/5xx or failing in transport.
    pub retries: u32,
    /// The API key; `None` reads `api_key_env` when the provider is built.
    #[serde(skip)]
    pub api_key: Option<Secret>,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com".into(),
            path: String::new(),
            flavor: Flavor::Openai,
            model: "whisper-1".into(),
            api_key_env: "OPENAI_API_KEY".into(),
            stream: false,
            response_format: "verbose_json".into(),
            timeout_ms: 60_000,
            max_concurrency: 4,
            vad_silence_ms: 600,
            retries: 2,
            api_key: None,
        }
    }
}

/// ISO-639-1 `language` hint for an engine model type; `None` for mixed/multi-language engines.
pub fn language_hint(engine: &str) -> Option<&'static str> {
    let lang = engine.split_once('_').map_or(engine, |(_, l)| l);
    match lang {
        "zh_en" | "multi_lang" => None,
        l if l.starts_with("zh") || l == "yue" => Some("zh"),
        l if l.starts_with("en") => Some("en"),
        "ja" => Some("ja"),
        "ko" => Some("ko"),
        "th" => Some("th"),
        "id" => Some("id"),
        "vi" => Some("vi"),
        "ms" => Some("ms"),
        "pt" => Some("pt"),
        "tr" => Some("tr"),
        "ar" => Some("ar"),
        "es" => Some("es"),
        "hi" => Some("hi"),
        "fr" => Some("fr"),
        "de" => Some("de"),
        _ => None,
    }
}

/// An OpenAI-compatible provider.
pub struct OpenAiProvider {
    name: String,
    inner: Arc<Client>,
}

struct Client {
    settings: OpenAiSettings,
    url: String,
    http: reqwest::Client,
    slots: Semaphore,
}

impl OpenAiProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// A malformed `base_url`, an unknown `response_format`, zero concurrency.
    pub fn new(name: &str, mut settings: OpenAiSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            matches!(settings.response_format.as_str(), "json" | "verbose_json"),
            "provider {name}: response_format must be json or verbose_json"
        );
        anyhow::ensure!(
            settings.max_concurrency > 0,
            "provider {name}: max_concurrency must be > 0"
        );
        let path = match (settings.path.as_str(), settings.flavor) {
            ("", Flavor::Openai) => "/v1/audio/transcriptions",
            ("", Flavor::WhisperCpp) => "/inference",
            (p, _) => p,
        };
        let url = format!("{}{path}", settings.base_url.trim_end_matches('/'));
        reqwest::Url::parse(&url).map_err(|e| anyhow::anyhow!("provider {name}: {url}: {e}"))?;
        if settings.api_key.is_none() && !settings.api_key_env.is_empty() {
            settings.api_key = std::env::var(&settings.api_key_env)
                .ok()
                .filter(|k| !k.is_empty())
                .map(Secret::new);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()?;
        Ok(Self {
            name: name.to_string(),
            inner: Arc::new(Client {
                slots: Semaphore::new(settings.max_concurrency),
                settings,
                url,
                http,
            }),
        })
    }
}

#[async_trait::async_trait]
impl Provider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: format!("OpenAI-compatible transcription at {}", self.inner.url),
            stats: Some(serde_json::json!({
                "requests_in_flight": self.inner.settings.max_concurrency - self.inner.slots.available_permits(),
            })),
        }
    }

    /// Its VAD (`segmented`) cuts the utterance where the client asks.
    fn can_finalize(&self) -> bool {
        true
    }

    fn open(
        &self,
        opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let rec = Arc::new(Utterances {
            client: Arc::clone(&self.inner),
            opts: opts.clone(),
        });
        segmented::open(
            rec,
            opts.vad_silence_ms
                .unwrap_or(self.inner.settings.vad_silence_ms),
            opts.partials,
            cancel,
        )
    }

    async fn recognize(
        &self,
        audio: OneShotAudio,
        opts: &StreamOptions,
    ) -> Result<Vec<Recognition>, ProviderError> {
        let file = match &audio.original {
            Some(o)
                if self.inner.settings.flavor == Flavor::Openai
                    && matches!(o.format.as_str(), "wav" | "mp3" | "m4a" | "ogg" | "flac") =>
            {
                (o.bytes.to_vec(), format!("audio.{}", o.format))
            }
            _ => (wav_bytes(&audio.pcm)?, "audio.wav".to_string()),
        };
        let answer = self.inner.transcribe(file, opts, false, &|_| {}).await?;
        let mut sentences = answer.sentences(audio.duration_ms());
        let (text, lang) = text_options(opts);
        for s in &mut sentences {
            s.text = text.apply(&s.text, lang);
        }
        Ok(sentences)
    }
}

struct Utterances {
    client: Arc<Client>,
    opts: StreamOptions,
}

#[async_trait::async_trait]
impl UtteranceRecognizer for Utterances {
    async fn recognize_utterance(
        &self,
        pcm: Vec<i16>,
        on_delta: &(dyn Fn(String) + Send + Sync),
    ) -> Result<String, ProviderError> {
        let stream = self.client.settings.stream
            && self.client.settings.flavor == Flavor::Openai
            && self.opts.partials;
        let file = (wav_bytes(&pcm)?, "utterance.wav".to_string());
        let (text, lang) = text_options(&self.opts);
        let on_delta = |delta: String| on_delta(text.apply(&delta, lang));
        let answer = self
            .client
            .transcribe(file, &self.opts, stream, &on_delta)
            .await?;
        Ok(text.apply(answer.text.trim(), lang))
    }
}

/// The session's text options and the language they read the text in: OpenAI-compatible
/// servers have none of Tencent's (shared/providers.md §7), so voxpoll applies them.
fn text_options(opts: &StreamOptions) -> (TextOptions, &'static str) {
    let lang = super::embedded::language_for_engine(&opts.engine).unwrap_or("");
    (TextOptions::of(opts), lang)
}

/// 16 kHz mono 16-bit WAV of `pcm` (hound).
fn wav_bytes(pcm: &[i16]) -> Result<Vec<u8>, ProviderError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: crate::audio::TARGET_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut cur = std::io::Cursor::new(Vec::with_capacity(44 + pcm.len() * 2));
    let mut w = hound::WavWriter::new(&mut cur, spec)
        .map_err(|e| ProviderError::AudioRejected(e.to_string()))?;
    for &s in pcm {
        w.write_sample(s)
            .map_err(|e| ProviderError::AudioRejected(e.to_string()))?;
    }
    w.finalize()
        .map_err(|e| ProviderError::AudioRejected(e.to_string()))?;
    Ok(cur.into_inner())
}

/// A transcription answer: the text and, for `verbose_json`, its segments.
#[derive(Debug, Default, Deserialize)]
struct Answer {
    #[serde(default)]
    text: String,
    #[serde(default)]
    segments: Option<Vec<SegmentBody>>,
}

#[derive(Debug, Deserialize)]
struct SegmentBody {
    #[serde(default)]
    start: f64,
    #[serde(default)]
    end: f64,
    #[serde(default)]
    text: String,
}

impl Answer {
    /// Segments as sentences (times s → ms), else the whole text as one sentence.
    fn sentences(self, duration_ms: u64) -> Vec<Recognition> {
        let secs = |s: f64| (s.max(0.0) * 1000.0).round() as u64;
        match self.segments.filter(|s| !s.is_empty()) {
            Some(segs) => segs
                .into_iter()
                .filter(|s| !s.text.trim().is_empty())
                .enumerate()
                .map(|(i, s)| Recognition {
                    sentence: i as u32,
                    text: s.text.trim().to_string(),
                    start_ms: secs(s.start),
                    end_ms: secs(s.end),
                    words: None,
                })
                .collect(),
            None if self.text.trim().is_empty() => Vec::new(),
            None => vec![Recognition {
                sentence: 0,
                text: self.text.trim().to_string(),
                start_ms: 0,
                end_ms: duration_ms,
                words: None,
            }],
        }
    }
}

/// Maps an HTTP status of a failed transcription to voxpoll's code.
pub fn status_code(status: u16) -> &'static str {
    match status {
        401 | 403 => "provider_auth_failed",
        429 => "provider_busy",
        400 | 404 | 413 | 415 | 422 => "provider_invalid_parameter",
        s if s >= 500 => "provider_unavailable",
        _ => "provider_error",
    }
}

impl Client {
    async fn transcribe(
        &self,
        file: (Vec<u8>, String),
        opts: &StreamOptions,
        stream: bool,
        on_delta: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Answer, ProviderError> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| ProviderError::Unavailable("closed".into()))?;
        let mut attempt = 0;
        loop {
            match self.attempt(&file, opts, stream, on_delta).await {
                Err((retryable, e)) if retryable && attempt < self.settings.retries => {
                    attempt += 1;
                    tracing::warn!(attempt, error = %e, "transcription request failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
                Err((_, e)) => return Err(e),
                Ok(a) => return Ok(a),
            }
        }
    }

    /// One request. The error says whether a retry may help (429, 5xx, transport).
    async fn attempt(
        &self,
        file: &(Vec<u8>, String),
        opts: &StreamOptions,
        stream: bool,
        on_delta: &(dyn Fn(String) + Send + Sync),
    ) -> Result<Answer, (bool, ProviderError)> {
        let s = &self.settings;
        let mime = if file.1.ends_with(".wav") {
            "audio/wav"
        } else {
            "application/octet-stream"
        };
        let part = reqwest::multipart::Part::bytes(file.0.clone())
            .file_name(file.1.clone())
            .mime_str(mime)
            .map_err(|e| (false, transport(e)))?;
        let mut form = reqwest::multipart::Form::new()
            .part("file", part)
            .text("model", s.model.clone())
            .text("response_format", s.response_format.clone())
            .text("temperature", "0");
        if let Some(lang) = language_hint(&opts.engine) {
            form = form.text("language", lang);
        }
        if let Some(h) = &opts.hotword_list {
            let words: Vec<&str> = h.split(',').filter_map(|w| w.split('|').next()).collect();
            form = form.text("prompt", words.join(", "));
        }
        if stream {
            form = form.text("stream", "true");
        }
        let mut req = self.http.post(&self.url).multipart(form);
        if let Some(key) = &s.api_key {
            req = req.bearer_auth(key.expose());
        }
        let resp = req.send().await.map_err(|e| (true, transport(e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let message = error_message(&body).unwrap_or_else(|| format!("HTTP {status}"));
            let retry = status.as_u16() == 429 || status.is_server_error();
            return Err((
                retry,
                ProviderError::Upstream {
                    code: status_code(status.as_u16()).into(),
                    provider_code: Some(status.as_u16().to_string()),
                    message,
                },
            ));
        }
        let is_sse = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if is_sse {
            return read_sse(resp, on_delta).await.map_err(|e| (false, e));
        }
        let body = resp.bytes().await.map_err(|e| (true, transport(e)))?;
        serde_json::from_slice::<Answer>(&body).map_err(|e| {
            (
                false,
                ProviderError::Upstream {
                    code: "provider_error".into(),
                    provider_code: None,
                    message: format!("unparseable transcription answer: {e}"),
                },
            )
        })
    }
}

fn transport(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Upstream {
        code: "provider_unavailable".into(),
        provider_code: None,
        message: e.to_string(),
    }
}

/// The message of `{"error":{"message":…}}` (OpenAI) or `{"error":"…"}` (whisper.cpp).
fn error_message(body: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    match &v["error"] {
        serde_json::Value::String(s) => Some(s.clone()),
        e => e["message"].as_str().map(str::to_string),
    }
}

/// Reads a `text/event-stream` answer (shared/providers.md §3.3): `data:` lines carrying
/// `transcript.text.delta` / `transcript.text.done`, an optional `[DONE]`, `event:` and comment
/// lines ignored, `{"error":…}` failing the request.
async fn read_sse(
    resp: reqwest::Response,
    on_delta: &(dyn Fn(String) + Send + Sync),
) -> Result<Answer, ProviderError> {
    let mut body = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut text = String::new();
    let mut done_text: Option<String> = None;
    'read: while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.map_err(transport)?);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" {
                break 'read;
            }
            let v: serde_json::Value =
                serde_json::from_str(data).map_err(|e| ProviderError::Upstream {
                    code: "provider_error".into(),
                    provider_code: None,
                    message: format!("unparseable stream event: {e}"),
                })?;
            if let Some(err) = v.get("error") {
                return Err(ProviderError::Upstream {
                    code: "provider_error".into(),
                    provider_code: err["code"].as_str().map(str::to_string),
                    message: err["message"]
                        .as_str()
                        .unwrap_or("stream error")
                        .to_string(),
                });
            }
            match v["type"].as_str() {
                Some("transcript.text.delta") => {
                    text.push_str(v["delta"].as_str().unwrap_or_default());
                    on_delta(text.trim().to_string());
                }
                Some("transcript.text.done") => {
                    done_text = Some(v["text"].as_str().unwrap_or_default().to_string());
                    break 'read;
                }
                _ => {}
            }
        }
    }
    Ok(Answer {
        text: done_text.unwrap_or(text),
        segments: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn language_hints() {
        assert_eq!(language_hint("16k_zh"), Some("zh"));
        assert_eq!(language_hint("16k_zh_medical"), Some("zh"));
        assert_eq!(language_hint("16k_en"), Some("en"));
        assert_eq!(language_hint("16k_zh_en"), None);
        assert_eq!(language_hint("8k_zh"), Some("zh"));
    }

    #[test]
    fn error_shapes() {
        assert_eq!(
            error_message(r#"{"error":{"message":"bad key","type":"invalid_request_error"}}"#)
                .as_deref(),
            Some("bad key")
        );
        assert_eq!(
            error_message(r#"{"error":"failed to read audio data"}"#).as_deref(),
            Some("failed to read audio data")
        );
    }

    #[test]
    fn verbose_segments_become_sentences() {
        let a: Answer = serde_json::from_str(
            r#"{"text":"a b","segments":[{"start":0.0,"end":1.5,"text":" a"},{"start":1.5,"end":3.25,"text":" b"}]}"#,
        )
        .unwrap();
        let s = a.sentences(4000);
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].text.as_str(), s[1].start_ms, s[1].end_ms),
            ("b", 1500, 3250)
        );
    }
}
