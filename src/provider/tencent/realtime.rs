//! One Tencent real-time ASR stream (WebSocket v2; doc 1093/48982, shared/providers.md §1).
//!
//! The task signs the handshake URL, waits for the `{"code":0}` verdict, then re-paces the
//! session's audio through a token bucket: audio goes out as soon as it arrives, in binary
//! messages of at most `frame_ms` (200 ms = 6400 bytes at 16 kHz, the 2026 doc's
//! recommendation; older docs said 40 ms, both are accepted, shared/providers.md §1.5), and
//! queued audio drains at `catchup_speed`× real time with a burst of `catchup_speed` frames
//! (Tencent answers 4000 above 3×). When the client stalls for `bridge_after_ms`, silence is
//! sent at real time so the upstream never sees 15 s without audio (4008); the inserted silence
//! is recorded in a [`TimeMap`] and every result time is mapped back to the client's audio.
//! `slice_type` 0/1 become partials, 2 finals; `{"type":"end"}` is sent after the last frame
//! and the stream is done at `final: 1`.
//!
//! Sessions recording MP3 or AAC at the engine's rate pass their frames through as recorded
//! (`voice_format` 8 or 16, shared/providers.md §1.2): whole codec frames are paced by their
//! duration the same way. Silence cannot be bridged in a compressed stream, so a pass-through
//! session that stalls longer than Tencent's 15 s gets its 4008.

use super::sign::realtime_url;
use super::{realtime_error_code, TencentCredentials, TencentSettings};
use crate::audio::{le_bytes, RateConverter};
use crate::provider::{
    ProviderError, ProviderEvent, ProviderInput, ProviderStream, Recognition, StreamOptions, Word,
};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Sample rate a Tencent engine takes: `8k_*` → 8000 Hz, `16k_*` → 16000 Hz.
///
/// # Errors
/// Engine names with neither prefix.
pub fn engine_rate(engine: &str) -> Result<u32, ProviderError> {
    if engine.starts_with("16k_") {
        Ok(16_000)
    } else if engine.starts_with("8k_") {
        Ok(8_000)
    } else {
        Err(ProviderError::Unsupported(format!(
            "engine {engine:?}: Tencent engine model types start with 16k_ or 8k_"
        )))
    }
}

/// The query parameters of a handshake (before `signature`), from the session's options.
pub fn handshake_params(
    settings: &TencentSettings,
    creds: &TencentCredentials,
    opts: &StreamOptions,
    voice_id: &str,
    now_s: u64,
) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    put("secretid", creds.secret_id.clone());
    put("timestamp", now_s.to_string());
    put("expired", (now_s + 86_400).to_string());
    put(
        "nonce",
        rand::random_range(1..=9_999_999_999u64).to_string(),
    );
    put("engine_model_type", opts.engine.clone());
    put("voice_id", voice_id.to_string());
    put(
        "voice_format",
        match opts.encoded {
            Some(crate::audio::AudioFormat::Mp3) => "8",
            Some(crate::audio::AudioFormat::Aac) => "16",
            _ => "1",
        }
        .into(),
    );
    put("needvad", settings.needvad.to_string());
    if settings.needvad == 1 {
        if let Some(ms) = opts.vad_silence_ms {
            put("vad_silence_time", ms.clamp(500, 2000).to_string());
        }
    }
    let opt = |v: Option<u8>| v.map(|x| x.to_string());
    for (k, v) in [
        ("filter_dirty", opt(opts.filter_dirty)),
        ("filter_modal", opt(opts.filter_modal)),
        ("filter_punc", opt(opts.filter_punc)),
        ("convert_num_mode", opt(opts.convert_num_mode)),
        ("word_info", opt(opts.word_info)),
        ("hotword_list", opts.hotword_list.clone()),
    ] {
        if let Some(v) = v {
            put(k, v);
        }
    }
    p
}

/// Silence inserted upstream, so upstream times can be mapped back to client audio time.
#[derive(Debug, Default, Clone)]
pub struct TimeMap {
    /// `(upstream start ms, length ms)`, ascending, merged when contiguous.
    inserted: Vec<(u64, u64)>,
}

impl TimeMap {
    /// Records `len_ms` of silence sent at upstream time `at_ms`.
    pub fn insert(&mut self, at_ms: u64, len_ms: u64) {
        if let Some(last) = self.inserted.last_mut() {
            if last.0 + last.1 == at_ms {
                last.1 += len_ms;
                return;
            }
        }
        self.inserted.push((at_ms, len_ms));
    }

    /// The client audio time of upstream time `t_ms` (a time inside inserted silence maps to
    /// the client time where the silence was inserted).
    pub fn to_client(&self, t_ms: u64) -> u64 {
        let mut shift = 0;
        for &(at, len) in &self.inserted {
            if t_ms >= at + len {
                shift += len;
            } else if t_ms > at {
                shift += t_ms - at;
            }
        }
        t_ms - shift
    }

    /// Total silence inserted, ms.
    pub fn inserted_ms(&self) -> u64 {
        self.inserted.iter().map(|&(_, l)| l).sum()
    }
}

#[derive(Debug, Deserialize)]
struct ServerMsg {
    code: i64,
    #[serde(default)]
    message: String,
    result: Option<ResultMsg>,
    #[serde(rename = "final", default)]
    final_flag: i64,
}

#[derive(Debug, Deserialize)]
struct ResultMsg {
    slice_type: i64,
    #[serde(default)]
    index: u32,
    #[serde(default)]
    start_time: u64,
    #[serde(default)]
    end_time: u64,
    #[serde(default)]
    voice_text_str: String,
    #[serde(default)]
    word_list: Option<Vec<WordMsg>>,
}

#[derive(Debug, Deserialize)]
struct WordMsg {
    word: String,
    #[serde(default)]
    start_time: u64,
    #[serde(default)]
    end_time: u64,
}

/// One server message, parsed (shared/providers.md §1.4): an error, a result, and/or the end.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// `code` ≠ 0: the error code and message.
    pub error: Option<(i64, String)>,
    /// A result: `slice_type` (0/1 partial, 2 final) and the recognition in client time.
    pub result: Option<(i64, Recognition)>,
    /// `final: 1`: the stream is over.
    pub done: bool,
}

/// Parses a text frame from the real-time server and maps its times back to client audio time.
///
/// # Errors
/// The frame is not a Tencent result message.
pub fn parse_message(text: &str, times: &TimeMap) -> Result<Incoming, String> {
    let msg: ServerMsg =
        serde_json::from_str(text).map_err(|e| format!("unparseable Tencent message: {e}"))?;
    if msg.code != 0 {
        return Ok(Incoming {
            error: Some((msg.code, msg.message)),
            result: None,
            done: false,
        });
    }
    let result = msg.result.map(|r| {
        let rec = Recognition {
            sentence: r.index,
            text: r.voice_text_str,
            start_ms: times.to_client(r.start_time),
            end_ms: times.to_client(r.end_time),
            words: r.word_list.filter(|w| !w.is_empty()).map(|ws| {
                ws.into_iter()
                    .map(|w| Word {
                        word: w.word,
                        start_ms: times.to_client(w.start_time),
                        end_ms: times.to_client(w.end_time),
                    })
                    .collect()
            }),
        };
        (r.slice_type, rec)
    });
    Ok(Incoming {
        error: None,
        result,
        done: msg.final_flag == 1,
    })
}

pub(super) fn open(
    settings: Arc<TencentSettings>,
    creds: TencentCredentials,
    opts: StreamOptions,
    cancel: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> Result<ProviderStream, ProviderError> {
    let rate = engine_rate(&opts.engine)?;
    let conv = RateConverter::new(crate::audio::TARGET_RATE, rate)
        .map_err(|e| ProviderError::Unsupported(e.0))?;
    let (in_tx, in_rx) = mpsc::channel(64);
    let (ev_tx, ev_rx) = mpsc::channel(256);
    let stream = Upstream {
        frame: (u64::from(rate) * settings.frame_ms / 1000) as usize,
        settings,
        creds,
        opts,
        rate,
        conv,
        events: ev_tx,
        buffer: BytesMut::new(),
        encoded: VecDeque::new(),
        finishing: false,
        end_sent: false,
        end_deadline: None,
        sent_samples: 0,
        times: TimeMap::default(),
        silence_due: None,
        allowance: 0.0,
        refilled: Instant::now(),
    };
    tokio::spawn(
        async move {
            let _permit = permit;
            stream.run(in_rx, cancel).await;
        }
        .in_current_span(),
    );
    Ok(ProviderStream {
        input: in_tx,
        events: ev_rx,
    })
}

struct Upstream {
    settings: Arc<TencentSettings>,
    creds: TencentCredentials,
    opts: StreamOptions,
    rate: u32,
    /// Samples per frame at `rate`.
    frame: usize,
    conv: RateConverter,
    events: mpsc::Sender<ProviderEvent>,
    /// Client audio at `rate` as s16le bytes, not yet sent.
    buffer: BytesMut,
    /// Pass-through frames not yet sent, with their duration in samples at `rate`.
    encoded: VecDeque<(Vec<u8>, u64)>,
    finishing: bool,
    end_sent: bool,
    end_deadline: Option<Instant>,
    /// Samples sent upstream, silence included.
    sent_samples: u64,
    times: TimeMap,
    /// When a silence frame is next due while nothing is queued (`None` while audio is queued,
    /// after the input ended, and for pass-through sessions).
    silence_due: Option<Instant>,
    /// Token bucket: samples at `rate` that may be sent now, as of `refilled`. It refills at
    /// `catchup_speed`× real time up to `catchup_speed` frames.
    allowance: f64,
    refilled: Instant,
}

type Sink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

impl Upstream {
    async fn emit(&self, ev: ProviderEvent) {
        let _ = self.events.send(ev).await;
    }

    async fn fail(&self, code: &str, provider_code: Option<String>, message: String) {
        tracing::warn!(code, ?provider_code, %message, "Tencent stream failed");
        self.emit(ProviderEvent::Error {
            code: code.into(),
            provider_code,
            message,
        })
        .await;
        self.emit(ProviderEvent::Done).await;
    }

    fn url(&self, voice_id: &str) -> Result<String, String> {
        let (scheme, rest) = self
            .settings
            .realtime_url
            .split_once("://")
            .ok_or_else(|| {
                format!(
                    "realtime_url {:?} has no scheme",
                    self.settings.realtime_url
                )
            })?;
        let host_path = format!("{}/{}", rest.trim_end_matches('/'), self.creds.app_id);
        let now_s = crate::clock::now_s();
        let params = handshake_params(&self.settings, &self.creds, &self.opts, voice_id, now_s);
        Ok(realtime_url(
            scheme,
            &host_path,
            &params,
            self.creds.secret_key.expose(),
        ))
    }

    async fn run(mut self, mut input: mpsc::Receiver<ProviderInput>, cancel: CancellationToken) {
        let voice_id = uuid::Uuid::new_v4().to_string();
        let url = match self.url(&voice_id) {
            Ok(u) => u,
            Err(e) => return self.fail("provider_error", None, e).await,
        };
        let mut req = match url.into_client_request() {
            Ok(r) => r,
            Err(e) => {
                return self
                    .fail("provider_error", None, format!("bad URL: {e}"))
                    .await
            }
        };
        if let Some(token) = &self.creds.token {
            if let Ok(v) = token.expose().parse() {
                req.headers_mut().insert("X-TC-Token", v);
            }
        }
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let ws = match tokio::time::timeout(timeout, super::super::connect_upstream(req)).await {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                return self
                    .fail(
                        "provider_unavailable",
                        None,
                        format!("cannot connect to Tencent: {e}"),
                    )
                    .await
            }
            Err(_) => {
                return self
                    .fail(
                        "provider_unavailable",
                        None,
                        "Tencent handshake timed out".into(),
                    )
                    .await
            }
        };
        let (mut sink, mut stream) = ws.split();
        // The upgrade succeeds even when auth fails; the first text frame is the verdict.
        match tokio::time::timeout(timeout, stream.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(m) if m.code == 0 => {}
                Ok(m) => {
                    return self
                        .fail(
                            realtime_error_code(m.code),
                            Some(m.code.to_string()),
                            m.message,
                        )
                        .await
                }
                Err(e) => {
                    return self
                        .fail("provider_error", None, format!("bad handshake reply: {e}"))
                        .await
                }
            },
            _ => {
                return self
                    .fail(
                        "provider_unavailable",
                        None,
                        "Tencent sent no handshake verdict".into(),
                    )
                    .await
            }
        }
        tracing::debug!(%voice_id, engine = %self.opts.engine, "Tencent stream open");
        self.refilled = Instant::now();
        self.allowance = self.burst();
        let wake = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(wake);
        let mut due = true;
        loop {
            if due {
                due = false;
                if let Err(e) = self.pace(&mut sink).await {
                    return self
                        .fail(
                            "provider_unavailable",
                            None,
                            format!("sending to Tencent failed: {e}"),
                        )
                        .await;
                }
            }
            let next = self.next_wake();
            if let Some(at) = next {
                let at = tokio::time::Instant::from_std(at);
                if wake.deadline() != at {
                    wake.as_mut().reset(at);
                }
            }
            if self.end_deadline.is_some_and(|d| Instant::now() >= d) {
                let _ = sink.close().await;
                return self
                    .fail(
                        "provider_timeout",
                        None,
                        "Tencent did not send its final result in time".into(),
                    )
                    .await;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    let _ = sink.close().await;
                    return;
                }
                m = input.recv(), if !self.finishing => match m {
                    Some(ProviderInput::Audio(pcm)) => {
                        let out = self.conv.process(&pcm);
                        self.buffer.extend_from_slice(&le_bytes(out.into_iter()));
                        due = true;
                    }
                    Some(ProviderInput::Encoded { frames, pcm }) => {
                        // Every frame of a stream has the same sample count; the decoded audio
                        // (16 kHz) gives it.
                        let n = frames.len().max(1) as u64;
                        let per = pcm.len() as u64 * u64::from(self.rate) / u64::from(crate::audio::TARGET_RATE) / n;
                        self.encoded.extend(frames.into_iter().map(|f| (f, per)));
                        due = true;
                    }
                    // Never sent: Tencent's real-time protocol has no "end the sentence now"
                    // (its `{"type": "end"}` ends the stream).
                    Some(ProviderInput::Finalize) => {}
                    Some(ProviderInput::Finish) => {
                        let out = self.conv.flush();
                        self.buffer.extend_from_slice(&le_bytes(out.into_iter()));
                        self.finishing = true;
                        due = true;
                    }
                    None => {
                        // Dropped without Finish: a cancel.
                        let _ = sink.close().await;
                        return;
                    }
                },
                () = &mut wake, if next.is_some() => due = true,
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if self.on_text(&t).await {
                            let _ = sink.close().await;
                            return;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        return self.fail("provider_closed", None, "Tencent closed the stream before its final result".into()).await;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Largest burst the bucket holds: `catchup_speed` frames, in samples.
    fn burst(&self) -> f64 {
        self.settings.catchup_speed * self.frame as f64
    }

    /// Samples the bucket gains per second: `catchup_speed`× real time.
    fn refill_per_s(&self) -> f64 {
        self.settings.catchup_speed * f64::from(self.rate)
    }

    /// Samples the next queued message costs: a pass-through frame its duration (at most a
    /// burst, so that a long codec frame still goes out), PCM up to one frame.
    fn next_cost(&self) -> Option<f64> {
        if let Some((_, samples)) = self.encoded.front() {
            return Some((*samples as f64).min(self.burst()));
        }
        (!self.buffer.is_empty()).then(|| (self.buffer.len() / 2).min(self.frame) as f64)
    }

    /// When the task must run [`Self::pace`] again without new input: queued audio waiting
    /// for the bucket, a silence frame due, or the deadline for `final: 1`.
    fn next_wake(&self) -> Option<Instant> {
        let refill = self.next_cost().map(|cost| {
            let wait_s = (cost - self.allowance).max(0.0) / self.refill_per_s();
            self.refilled + Duration::from_secs_f64(wait_s) + Duration::from_millis(1)
        });
        [refill, self.silence_due, self.end_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends what the bucket allows now, as soon as it arrives: queued messages, then
    /// `{"type":"end"}` once everything is out after the input ended, or a silence frame when
    /// the client has stalled for `bridge_after_ms` (then one per `frame_ms`). One flush per call.
    async fn pace(&mut self, sink: &mut Sink) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let now = Instant::now();
        let gained = now.duration_since(self.refilled).as_secs_f64() * self.refill_per_s();
        self.allowance = (self.allowance + gained).min(self.burst());
        self.refilled = now;
        let mut sent = false;
        while let Some(cost) = self.next_cost().filter(|c| *c <= self.allowance) {
            let (bytes, samples) = match self.encoded.pop_front() {
                Some((bytes, samples)) => (Bytes::from(bytes), samples),
                None => {
                    let n = cost as usize;
                    (self.buffer.split_to(2 * n).freeze(), n as u64)
                }
            };
            sink.feed(Message::binary(bytes)).await?;
            self.sent_samples += samples;
            self.allowance -= cost;
            sent = true;
        }
        let queued = !self.buffer.is_empty() || !self.encoded.is_empty();
        if self.finishing && !queued && !self.end_sent {
            sink.feed(Message::text(r#"{"type":"end"}"#)).await?;
            self.end_sent = true;
            self.end_deadline = Some(now + Duration::from_millis(self.settings.timeout_ms));
            sent = true;
        }
        if queued || self.finishing || self.opts.encoded.is_some() {
            self.silence_due = None;
        } else if sent || self.silence_due.is_none() {
            self.silence_due = Some(now + Duration::from_millis(self.settings.bridge_after_ms));
        } else if let Some(due) = self.silence_due.filter(|d| now >= *d) {
            let at_ms = self.upstream_ms();
            sink.feed(Message::binary(vec![0u8; self.frame * 2]))
                .await?;
            self.sent_samples += self.frame as u64;
            self.allowance -= self.frame as f64;
            self.times.insert(at_ms, self.settings.frame_ms);
            self.silence_due = Some(due + Duration::from_millis(self.settings.frame_ms));
            sent = true;
        }
        if sent {
            sink.flush().await?;
        }
        Ok(())
    }

    fn upstream_ms(&self) -> u64 {
        self.sent_samples * 1000 / u64::from(self.rate)
    }

    /// Handles one result frame; true when the stream is over.
    async fn on_text(&mut self, text: &str) -> bool {
        let msg = match parse_message(text, &self.times) {
            Ok(m) => m,
            Err(e) => {
                self.fail("provider_error", None, e).await;
                return true;
            }
        };
        if let Some((code, message)) = msg.error {
            self.fail(realtime_error_code(code), Some(code.to_string()), message)
                .await;
            return true;
        }
        if let Some((slice_type, rec)) = msg.result {
            if slice_type == 0 {
                self.emit(ProviderEvent::SpeechStart {
                    sentence: rec.sentence,
                    start_ms: rec.start_ms,
                })
                .await;
            }
            match slice_type {
                2 => self.emit(ProviderEvent::Final(rec)).await,
                _ if self.opts.partials && !rec.text.is_empty() => {
                    self.emit(ProviderEvent::Partial(rec)).await;
                }
                _ => {}
            }
        }
        if msg.done {
            if self.times.inserted_ms() > 0 {
                tracing::debug!(
                    inserted_ms = self.times.inserted_ms(),
                    "silence bridged client stalls"
                );
            }
            self.emit(ProviderEvent::Done).await;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_map_removes_inserted_silence() {
        let mut m = TimeMap::default();
        m.insert(1000, 40);
        m.insert(1040, 40);
        m.insert(3000, 500);
        assert_eq!(m.inserted_ms(), 580);
        assert_eq!(m.to_client(500), 500);
        assert_eq!(m.to_client(1000), 1000);
        assert_eq!(m.to_client(1050), 1000);
        assert_eq!(m.to_client(1080), 1000);
        assert_eq!(m.to_client(2080), 2000);
        assert_eq!(m.to_client(3200), 2920);
        assert_eq!(m.to_client(4000), 3420);
    }

    #[test]
    fn engine_rates() {
        assert_eq!(engine_rate("16k_zh").ok(), Some(16_000));
        assert_eq!(engine_rate("8k_zh").ok(), Some(8_000));
        assert!(engine_rate("zh").is_err());
    }
}
