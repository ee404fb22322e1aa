//! What a session is opened with: the client's [`CreateOptions`] (shared/api.md,
//! `POST /v1/sessions`) and the server's [`SessionLimits`], with the checks of both.

use super::error::SessionError;
use crate::config::Config;
use crate::provider::StreamOptions;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Options of `POST /v1/sessions` (shared/api.md). All optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateOptions {
    /// Engine model type, default `16k_zh`.
    pub engine: Option<String>,
    /// `pcm` (s16le, default), `wav`, `mp3` or `aac`.
    pub format: Option<String>,
    /// Hz, default 16000.
    pub sample_rate: Option<u32>,
    /// 1 or 2, default 1.
    pub channels: Option<u16>,
    /// A configured provider name, default the server's default.
    pub provider: Option<String>,
    /// Emit partial results, default true.
    pub partials: Option<bool>,
    /// Tencent `filter_dirty`.
    pub filter_dirty: Option<u8>,
    /// Tencent `filter_modal`.
    pub filter_modal: Option<u8>,
    /// Tencent `filter_punc`.
    pub filter_punc: Option<u8>,
    /// Tencent `convert_num_mode`.
    pub convert_num_mode: Option<u8>,
    /// Tencent `word_info`.
    pub word_info: Option<u8>,
    /// Tencent `hotword_list`.
    pub hotword_list: Option<String>,
    /// Non-speech that ends a sentence, ms (200..=5000).
    pub vad_silence_ms: Option<u64>,
}

/// A creation option out of range; the message names the field. 400 `invalid_option`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidOption(pub String);

impl CreateOptions {
    /// The engine model type, `16k_zh` when none is given.
    pub fn engine(&self) -> String {
        self.engine.clone().unwrap_or_else(|| "16k_zh".into())
    }

    /// Validates the recognition options and gives them in the providers' terms.
    ///
    /// # Errors
    /// [`InvalidOption`] naming the field.
    pub fn stream_options(&self) -> Result<StreamOptions, InvalidOption> {
        for (name, v) in [("engine", &self.engine), ("provider", &self.provider)] {
            if let Some(v) = v {
                check_name(name, v)?;
            }
        }
        if let Some(list) = &self.hotword_list {
            check_hotwords(list).map_err(InvalidOption)?;
        }
        if let Some(v) = self.vad_silence_ms {
            if !(200..=5000).contains(&v) {
                return Err(InvalidOption(format!(
                    "vad_silence_ms {v} is outside 200..=5000"
                )));
            }
        }
        if self.hotword_list.as_ref().is_some_and(|h| h.len() > 4096) {
            return Err(InvalidOption("hotword_list exceeds 4096 bytes".into()));
        }
        for (name, v, max) in [
            ("filter_dirty", self.filter_dirty, 2),
            ("filter_modal", self.filter_modal, 2),
            ("filter_punc", self.filter_punc, 2),
            ("convert_num_mode", self.convert_num_mode, 3),
            ("word_info", self.word_info, 2),
        ] {
            if v.is_some_and(|v| v > max) {
                return Err(InvalidOption(format!("{name} must be between 0 and {max}")));
            }
        }
        // Tencent's modes are 0, 1 and 3 (shared/providers.md §1.2): 2 is no mode.
        if self.convert_num_mode == Some(2) {
            return Err(InvalidOption("convert_num_mode must be 0, 1 or 3".into()));
        }
        Ok(StreamOptions {
            engine: self.engine(),
            partials: self.partials.unwrap_or(true),
            vad_silence_ms: self.vad_silence_ms,
            filter_dirty: self.filter_dirty,
            filter_modal: self.filter_modal,
            filter_punc: self.filter_punc,
            convert_num_mode: self.convert_num_mode,
            word_info: self.word_info,
            hotword_list: self.hotword_list.clone(),
            encoded: None,
        })
    }
}

/// Longest engine model type or provider name, characters.
pub const MAX_NAME_CHARS: usize = 64;

/// An engine model type or provider name: 1–64 characters of `A–Z a–z 0–9 _ - .`. A bad one is
/// named in the error by its first characters only, never echoed whole.
fn check_name(field: &str, v: &str) -> Result<(), InvalidOption> {
    let ok = (1..=MAX_NAME_CHARS).contains(&v.chars().count())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        return Ok(());
    }
    let mut short: String = v.chars().take(16).collect();
    if short.len() < v.len() {
        short.push('…');
    }
    Err(InvalidOption(format!(
        "{field} {short:?} ({} bytes) is not a name: 1 to {MAX_NAME_CHARS} characters of A-Z, a-z, 0-9, _, - and .",
        v.len()
    )))
}

/// Most hot words in a `hotword_list` (Tencent's limit, shared/providers.md §1.2).
pub const MAX_HOTWORDS: usize = 128;

/// Checks a `hotword_list` the way Tencent defines it (shared/providers.md §1.2): `word|weight`
/// items separated by `,`, at most [`MAX_HOTWORDS`], each word 1–30 characters without spaces,
/// an integer weight 1–100 (Tencent takes 1–11 and 100, FunASR any positive weight).
///
/// # Errors
/// A message naming the first offending item.
pub fn check_hotwords(list: &str) -> Result<(), String> {
    let items: Vec<&str> = list.split(',').collect();
    if items.len() > MAX_HOTWORDS {
        return Err(format!(
            "hotword_list has {} items; at most {MAX_HOTWORDS}",
            items.len()
        ));
    }
    for item in items {
        let short: String = item.chars().take(40).collect();
        let (word, weight) = item
            .split_once('|')
            .ok_or_else(|| format!("hotword_list item {short:?} is not word|weight"))?;
        let n = word.chars().count();
        if n == 0 || n > 30 || word.chars().any(char::is_whitespace) {
            return Err(format!(
                "hotword_list word {short:?}: 1 to 30 characters, no spaces"
            ));
        }
        match weight.parse::<u32>() {
            Ok(1..=100) => {}
            _ => {
                return Err(format!(
                    "hotword_list item {short:?}: weight must be an integer 1-100 (Tencent: 1-11 or 100)"
                ))
            }
        }
    }
    Ok(())
}

/// Sample rate an engine model type implies: `8k_*` → 8000 Hz, anything else 16000 Hz.
pub fn engine_rate(engine: &str) -> u32 {
    if engine.starts_with("8k_") {
        8_000
    } else {
        16_000
    }
}

/// Separator between sentences in a transcript: none for Chinese, Japanese and Cantonese
/// engines, a space otherwise.
pub fn sentence_joiner(engine: &str) -> &'static str {
    if engine.contains("zh") || engine.contains("ja") || engine.contains("yue") {
        ""
    } else {
        " "
    }
}

/// The limits the session engine enforces, taken from [`Config`] (README, "Configuration"
/// names each); nothing else of the server's configuration reaches the engine.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Default long-poll hold, ms.
    pub poll_hold_ms: u64,
    /// Longest long-poll hold honoured, ms.
    pub poll_max_hold_ms: u64,
    /// Largest chunk body, bytes.
    pub max_chunk_bytes: usize,
    /// Chunk size advertised to clients, bytes.
    pub chunk_bytes: usize,
    /// Chunk uploads per second per session (bursts of twice that).
    pub max_chunks_per_s: u32,
    /// Uploads are answered after their chunk is committed (`--durable-acks`).
    pub durable_acks: bool,
    /// Uploads a client should keep in flight (advertised).
    pub max_inflight: u32,
    /// Reorder window, chunks.
    pub reorder_window: u64,
    /// Accepted bytes a session may hold before its provider consumes them.
    pub max_buffered_bytes: usize,
    /// Sessions open at once on this instance.
    pub max_sessions: usize,
    /// Session creations per second on this instance (bursts of twice that).
    pub max_creates_per_s: u32,
    /// Sessions open at once per authenticated user.
    pub max_sessions_per_user: usize,
    /// No upload and no poll for this long expires a session, ms.
    pub session_idle_ms: u64,
    /// Longest audio per session, ms.
    pub session_max_audio_ms: u64,
    /// An ended session stays in memory this long, ms.
    pub session_linger_ms: u64,
    /// Time for sessions to finish on shutdown (and at the maximum duration), ms.
    pub shutdown_grace_ms: u64,
    /// Reopens of a failed provider stream per failure streak.
    pub provider_retries: u32,
    /// First backoff before a reopen, ms (doubles per attempt).
    pub provider_backoff_ms: u64,
}

impl From<&Config> for SessionLimits {
    fn from(c: &Config) -> Self {
        Self {
            poll_hold_ms: c.poll_hold_ms,
            poll_max_hold_ms: c.poll_max_hold_ms,
            max_chunk_bytes: c.max_chunk_bytes,
            chunk_bytes: c.chunk_bytes,
            max_chunks_per_s: c.max_chunks_per_s,
            durable_acks: c.durable_acks,
            max_inflight: c.max_inflight,
            reorder_window: c.reorder_window,
            max_buffered_bytes: c.max_buffered_bytes,
            max_sessions: c.max_sessions,
            max_creates_per_s: c.max_creates_per_s,
            max_sessions_per_user: c.max_sessions_per_user,
            session_idle_ms: c.session_idle_ms,
            session_max_audio_ms: c.session_max_audio_ms,
            session_linger_ms: c.session_linger_ms,
            shutdown_grace_ms: c.shutdown_grace_ms,
            provider_retries: c.provider_retries,
            provider_backoff_ms: c.provider_backoff_ms,
        }
    }
}

impl SessionLimits {
    /// The checks every chunk passes before its session is looked up, whatever the transport.
    ///
    /// # Errors
    /// [`SessionError::ChunkTooLarge`] over `max_chunk_bytes`; [`SessionError::EmptyChunk`]
    /// for an empty chunk that is not the last.
    pub fn check_chunk(&self, len: usize, last: bool) -> Result<(), SessionError> {
        if len > self.max_chunk_bytes {
            return Err(SessionError::ChunkTooLarge {
                len,
                max: self.max_chunk_bytes,
            });
        }
        if len == 0 && !last {
            return Err(SessionError::EmptyChunk);
        }
        Ok(())
    }

    /// The hold of a long-poll that asked for `wait` (the default hold when it asked for
    /// none), capped at `poll_max_hold_ms`.
    pub fn hold(&self, wait: Option<Duration>) -> Duration {
        wait.unwrap_or(Duration::from_millis(self.poll_hold_ms))
            .min(Duration::from_millis(self.poll_max_hold_ms))
    }

    /// Time given to a provider for its last results when a session winds down.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> SessionLimits {
        SessionLimits::from(&Config::loopback("x.db".into()))
    }

    #[test]
    fn chunk_checks_at_their_edges() {
        let l = limits();
        assert!(l.check_chunk(l.max_chunk_bytes, false).is_ok());
        assert!(matches!(
            l.check_chunk(l.max_chunk_bytes + 1, false),
            Err(SessionError::ChunkTooLarge { .. })
        ));
        assert!(matches!(
            l.check_chunk(0, false),
            Err(SessionError::EmptyChunk)
        ));
        assert!(l.check_chunk(0, true).is_ok());
    }

    #[test]
    fn holds_are_capped() {
        let l = limits();
        assert_eq!(l.hold(None), Duration::from_millis(l.poll_hold_ms));
        assert_eq!(
            l.hold(Some(Duration::from_secs(3600))),
            Duration::from_millis(l.poll_max_hold_ms)
        );
        assert_eq!(l.hold(Some(Duration::ZERO)), Duration::ZERO);
    }

    #[test]
    fn options_are_checked_by_name() {
        let cases = [
            (
                "vad_silence_ms",
                CreateOptions {
                    vad_silence_ms: Some(199),
                    ..Default::default()
                },
            ),
            (
                "convert_num_mode",
                CreateOptions {
                    convert_num_mode: Some(4),
                    ..Default::default()
                },
            ),
        ];
        for (field, bad) in cases {
            assert!(bad.stream_options().unwrap_err().0.contains(field));
        }
        let huge = CreateOptions {
            engine: Some("x".repeat(60_000)),
            ..Default::default()
        };
        let msg = huge.stream_options().unwrap_err().0;
        assert!(msg.len() < 200 && msg.contains("60000 bytes"), "{msg}");
        let ok = CreateOptions::default().stream_options().unwrap();
        assert_eq!(ok.engine, "16k_zh");
        assert!(ok.partials);
    }
}
