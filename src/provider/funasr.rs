//! FunASR runtime over WebSocket (modelscope/FunASR `runtime/docs/websocket_protocol.md`,
//! C++ `websocket-server-2pass`; shared/providers.md §4). No handshake reply: the first client
//! frame is a JSON config, then binary PCM, then `{"is_speaking": false}`.
//!
//! Mapping in `2pass` mode: `2pass-online` texts are *deltas* appended to the open sentence's
//! partial; a `2pass-offline` text replaces the sentence with its corrected final; the message
//! with `is_final: true` closes the stream (the client closes the socket). In `online` mode the
//! deltas of the whole stream form one sentence, finalised at the end.

use super::{
    Provider, ProviderError, ProviderEvent, ProviderInput, ProviderStream, Readiness, Recognition,
    StreamOptions,
};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Settings of a FunASR provider (`"kind": "funasr"` in the providers file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FunAsrSettings {
    /// Server URL, e.g. `ws://127.0.0.1:10095/` (`wss://` for the default TLS server).
    pub url: String,
    /// `2pass` (streaming partials + corrected finals) or `online` (streaming only).
    pub mode: String,
    /// Streaming chunk config `[look-back, chunk, look-ahead]` in 60 ms units.
    pub chunk_size: [u32; 3],
    /// Inverse text normalisation (digits); a session's `convert_num_mode: 0` turns it off.
    pub itn: bool,
    /// Longest wait for the connection and for the last result after the audio ended, ms.
    pub timeout_ms: u64,
    /// Streams open at once (bounded by the server's decoder threads); 429 beyond.
    pub max_concurrency: usize,
}

impl Default for FunAsrSettings {
    fn default() -> Self {
        Self {
            url: "ws://127.0.0.1:10095/".into(),
            mode: "2pass".into(),
            chunk_size: [5, 10, 5],
            itn: true,
            timeout_ms: 15_000,
            max_concurrency: 16,
        }
    }
}

/// A FunASR runtime provider.
pub struct FunAsrProvider {
    name: String,
    settings: Arc<FunAsrSettings>,
    slots: Arc<Semaphore>,
}

impl FunAsrProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// An unknown mode, a zero chunk, zero concurrency.
    pub fn new(name: &str, settings: FunAsrSettings) -> anyhow::Result<Self> {
        anyhow::ensure!(
            matches!(settings.mode.as_str(), "2pass" | "online"),
            "provider {name}: mode must be 2pass or online"
        );
        anyhow::ensure!(
            settings.chunk_size[1] > 0,
            "provider {name}: chunk_size[1] must be > 0"
        );
        anyhow::ensure!(
            settings.max_concurrency > 0,
            "provider {name}: max_concurrency must be > 0"
        );
        Ok(Self {
            name: name.to_string(),
            slots: Arc::new(Semaphore::new(settings.max_concurrency)),
            settings: Arc::new(settings),
        })
    }
}

/// The first (config) frame for a stream (protocol §"client → server: first message").
pub fn config_frame(settings: &FunAsrSettings, opts: &StreamOptions, wav_name: &str) -> String {
    let mut v = serde_json::json!({
        "mode": settings.mode,
        "chunk_size": settings.chunk_size,
        "chunk_interval": 10,
        "audio_fs": 16000,
        "wav_name": wav_name,
        "wav_format": "pcm",
        "is_speaking": true,
        "itn": settings.itn && opts.convert_num_mode != Some(0),
    });
    if let Some(h) = &opts.hotword_list {
        // Tencent "word|weight,…" → FunASR's JSON-encoded {"word": weight} string.
        let map: serde_json::Map<String, serde_json::Value> = h
            .split(',')
            .filter_map(|item| {
                let (w, weight) = item.split_once('|').unwrap_or((item, "10"));
                let w = w.trim();
                (!w.is_empty()).then(|| {
                    (
                        w.to_string(),
                        weight.trim().parse::<u32>().unwrap_or(10).into(),
                    )
                })
            })
            .collect();
        v["hotwords"] = serde_json::Value::String(serde_json::Value::Object(map).to_string());
    }
    v.to_string()
}

#[async_trait::async_trait]
impl Provider for FunAsrProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: format!(
                "FunASR runtime at {} ({})",
                self.settings.url, self.settings.mode
            ),
            stats: Some(serde_json::json!({
                "streams_open": self.settings.max_concurrency - self.slots.available_permits(),
                "max_concurrency": self.settings.max_concurrency,
            })),
        }
    }

    fn open(
        &self,
        opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        if !opts.engine.starts_with("16k_") {
            return Err(ProviderError::Unsupported(format!(
                "engine {:?}: the FunASR provider serves 16k_ engines",
                opts.engine
            )));
        }
        let permit = Arc::clone(&self.slots).try_acquire_owned().map_err(|_| {
            ProviderError::Busy(format!(
                "provider {}: all {} FunASR streams are in use",
                self.name, self.settings.max_concurrency
            ))
        })?;
        let (in_tx, in_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let task = Stream {
            settings: Arc::clone(&self.settings),
            opts: opts.clone(),
            events: ev_tx,
            sentence: 0,
            online_text: String::new(),
            sentence_start_ms: None,
            sent_samples: 0,
        };
        tokio::spawn(
            async move {
                let _permit = permit;
                task.run(in_rx, cancel).await;
            }
            .in_current_span(),
        );
        Ok(ProviderStream {
            input: in_tx,
            events: ev_rx,
        })
    }
}

#[derive(Debug, Deserialize)]
struct ResultMsg {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    text: String,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    start_time: Option<u64>,
    #[serde(default)]
    end_time: Option<u64>,
    #[serde(default)]
    stamp_sents: Option<serde_json::Value>,
}

struct Stream {
    settings: Arc<FunAsrSettings>,
    opts: StreamOptions,
    events: mpsc::Sender<ProviderEvent>,
    sentence: u32,
    /// Online deltas of the open sentence, appended.
    online_text: String,
    sentence_start_ms: Option<u64>,
    sent_samples: u64,
}

impl Stream {
    async fn emit(&self, ev: ProviderEvent) {
        let _ = self.events.send(ev).await;
    }

    async fn fail(&self, code: &str, message: String) {
        tracing::warn!(code, %message, "FunASR stream failed");
        self.emit(ProviderEvent::Error {
            code: code.into(),
            provider_code: None,
            message,
        })
        .await;
        self.emit(ProviderEvent::Done).await;
    }

    fn pos_ms(&self) -> u64 {
        self.sent_samples / 16
    }

    async fn run(mut self, mut input: mpsc::Receiver<ProviderInput>, cancel: CancellationToken) {
        let timeout = Duration::from_millis(self.settings.timeout_ms);
        let ws = match tokio::time::timeout(
            timeout,
            super::connect_upstream(self.settings.url.as_str()),
        )
        .await
        {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                return self
                    .fail(
                        "provider_unavailable",
                        format!("cannot connect to FunASR: {e}"),
                    )
                    .await
            }
            Err(_) => {
                return self
                    .fail("provider_unavailable", "FunASR connection timed out".into())
                    .await
            }
        };
        let (mut sink, mut stream) = ws.split();
        let wav_name = uuid::Uuid::new_v4().to_string();
        let config = config_frame(&self.settings, &self.opts, &wav_name);
        if let Err(e) = sink.send(Message::text(config)).await {
            return self
                .fail(
                    "provider_unavailable",
                    format!("sending to FunASR failed: {e}"),
                )
                .await;
        }
        let mut finishing_deadline: Option<Instant> = None;
        let mut input_open = true;
        loop {
            let deadline = finishing_deadline.map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    let _ = sink.close().await;
                    return;
                }
                () = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    let _ = sink.close().await;
                    return self.fail("provider_timeout", "FunASR did not send its final result in time".into()).await;
                }
                m = input.recv(), if input_open => match m {
                    Some(ProviderInput::Audio(pcm) | ProviderInput::Encoded { pcm, .. }) => {
                        for piece in pcm.chunks(9600) {
                            let bytes = crate::audio::le_bytes(piece.iter().copied());
                            if let Err(e) = sink.send(Message::binary(bytes)).await {
                                return self.fail("provider_unavailable", format!("sending to FunASR failed: {e}")).await;
                            }
                            self.sent_samples += piece.len() as u64;
                        }
                    }
                    // Never sent: FunASR's protocol ends a sentence only at its own VAD's
                    // endpoint (`is_speaking: false` ends the whole stream).
                    Some(ProviderInput::Finalize) => {}
                    Some(ProviderInput::Finish) => {
                        input_open = false;
                        if let Err(e) = sink.send(Message::text(r#"{"is_speaking": false}"#)).await {
                            return self.fail("provider_unavailable", format!("sending to FunASR failed: {e}")).await;
                        }
                        finishing_deadline = Some(Instant::now() + timeout);
                    }
                    None => {
                        let _ = sink.close().await;
                        return;
                    }
                },
                msg = stream.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        match serde_json::from_str::<ResultMsg>(&t) {
                            Ok(r) => {
                                if self.on_result(r, finishing_deadline.is_some()).await {
                                    let _ = sink.close().await;
                                    return;
                                }
                            }
                            Err(e) => return self.fail("provider_error", format!("unparseable FunASR message: {e}")).await,
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        return self.fail("provider_closed", "FunASR closed the stream before its final result".into()).await;
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Handles one result; true when the stream is over.
    async fn on_result(&mut self, r: ResultMsg, finishing: bool) -> bool {
        let mode = r.mode.as_deref().unwrap_or("");
        if mode.ends_with("online") {
            if !r.text.is_empty() {
                let start = *self.sentence_start_ms.get_or_insert(
                    self.pos_ms()
                        .saturating_sub(600 * u64::from(self.settings.chunk_size[1]) / 10),
                );
                self.online_text.push_str(&r.text);
                if self.opts.partials {
                    self.emit(ProviderEvent::Partial(Recognition {
                        sentence: self.sentence,
                        text: self.online_text.clone(),
                        start_ms: start,
                        end_ms: self.pos_ms(),
                        words: None,
                    }))
                    .await;
                }
            }
        } else if mode.ends_with("offline") {
            self.finalize(Some(r.text.clone()), &r).await;
        }
        if r.is_final && finishing {
            if !self.online_text.is_empty() {
                // Online mode (or a sentence the offline pass never closed): its deltas are final.
                self.finalize(None, &r).await;
            }
            self.emit(ProviderEvent::Done).await;
            return true;
        }
        false
    }

    /// Closes the open sentence with `text` (or its accumulated online deltas).
    async fn finalize(&mut self, text: Option<String>, r: &ResultMsg) {
        let text = text.unwrap_or_else(|| std::mem::take(&mut self.online_text));
        let stamps = r
            .stamp_sents
            .as_ref()
            .and_then(|v| v.as_array())
            .filter(|a| !a.is_empty());
        let start = r
            .start_time
            .or_else(|| stamps.and_then(|a| a[0]["start"].as_u64()))
            .or(self.sentence_start_ms)
            .unwrap_or(0);
        let end = r
            .end_time
            .or_else(|| stamps.and_then(|a| a[a.len() - 1]["end"].as_u64()))
            .unwrap_or_else(|| self.pos_ms());
        self.emit(ProviderEvent::Final(Recognition {
            sentence: self.sentence,
            text,
            start_ms: start,
            end_ms: end.max(start),
            words: None,
        }))
        .await;
        self.sentence += 1;
        self.online_text.clear();
        self.sentence_start_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_frame_carries_hotwords_as_a_json_string() {
        let opts = StreamOptions {
            engine: "16k_zh".into(),
            hotword_list: Some("阿里巴巴|20,通义|30".into()),
            convert_num_mode: Some(0),
            ..StreamOptions::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&config_frame(&FunAsrSettings::default(), &opts, "w")).unwrap();
        assert_eq!(v["mode"], "2pass");
        assert_eq!(v["chunk_size"], serde_json::json!([5, 10, 5]));
        assert_eq!(v["itn"], false);
        let hot: serde_json::Value = serde_json::from_str(v["hotwords"].as_str().unwrap()).unwrap();
        assert_eq!(hot, serde_json::json!({"阿里巴巴": 20, "通义": 30}));
    }
}
