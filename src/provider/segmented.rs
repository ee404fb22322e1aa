//! Realtime sessions over request-per-utterance servers (OpenAI-compatible transcription):
//! a VAD cuts the session's audio into utterances ([`crate::audio::vad::Segmenter`]) and each
//! utterance is recognised by one request, in order. Partials come from streamed answers
//! (`stream=true`) where the server gives them.
//!
//! Two tasks per stream: a segmenting task (input → the shared VAD thread,
//! [`crate::audio::vad_pool`] → utterances) and a recogniser task that sends utterances one at
//! a time so finals stay in order while audio keeps flowing.

use super::{ProviderError, ProviderEvent, ProviderInput, ProviderStream, Recognition};
use crate::audio::vad::{Segment, SegmenterConfig};
use crate::audio::vad_pool::StreamSegmenter;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Recognises one utterance (16 kHz mono s16) with one request.
#[async_trait::async_trait]
pub trait UtteranceRecognizer: Send + Sync + 'static {
    /// Returns the utterance's text. `on_delta` receives the text so far whenever a streamed
    /// answer grows (never called by servers that do not stream).
    ///
    /// # Errors
    /// [`ProviderError::Upstream`] with the server's code.
    async fn recognize_utterance(
        &self,
        pcm: Vec<i16>,
        on_delta: &(dyn Fn(String) + Send + Sync),
    ) -> Result<String, ProviderError>;
}

enum Cut {
    Utterance {
        index: u32,
        pcm: Vec<i16>,
        start_ms: u64,
        end_ms: u64,
    },
    Flushed,
}

/// Opens a stream that segments audio with `silence_ms` of non-speech and sends each
/// utterance to `rec`.
///
/// # Errors
/// None today: a VAD thread that cannot start is reported on the stream as an `error` event
/// (`provider_unavailable`) and its end.
pub fn open(
    rec: Arc<dyn UtteranceRecognizer>,
    silence_ms: u64,
    partials: bool,
    cancel: CancellationToken,
) -> Result<ProviderStream, ProviderError> {
    let (in_tx, mut in_rx) = mpsc::channel::<ProviderInput>(64);
    let (ev_tx, ev_rx) = mpsc::channel::<ProviderEvent>(256);
    let (cut_tx, mut cut_rx) = mpsc::unbounded_channel::<Cut>();
    let mut seg = StreamSegmenter::new(SegmenterConfig {
        silence_ms: silence_ms.clamp(200, 5000),
        min_voiced_ms: 300,
        partial_interval_ms: 0,
        first_partial_ms: 0,
        early_final_ms: 0,
    });
    let start_tx = ev_tx.clone();
    let seg_cancel = cancel.clone();
    tokio::spawn(
        async move {
            loop {
                let Some(m) = super::next_input(&mut in_rx, &seg_cancel).await else {
                    return;
                };
                let (op, last) = m.segmenter_op();
                let segs = match seg.run(op).await {
                    Ok(segs) => segs,
                    Err(message) => {
                        let _ = start_tx
                            .send(ProviderEvent::Error {
                                code: "provider_unavailable".into(),
                                provider_code: None,
                                message,
                            })
                            .await;
                        let _ = start_tx.send(ProviderEvent::Done).await;
                        return;
                    }
                };
                for s in segs {
                    let cut = match s {
                        // At once, not behind the utterances still being recognised.
                        Segment::Start {
                            utterance,
                            start_ms,
                        } => {
                            let start = ProviderEvent::SpeechStart {
                                sentence: utterance,
                                start_ms,
                            };
                            if start_tx.send(start).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        Segment::Final {
                            utterance,
                            pcm,
                            start_ms,
                            end_ms,
                            ..
                        } => Cut::Utterance {
                            index: utterance,
                            pcm,
                            start_ms,
                            end_ms,
                        },
                        _ => continue,
                    };
                    if cut_tx.send(cut).is_err() {
                        return;
                    }
                }
                if last {
                    let _ = cut_tx.send(Cut::Flushed);
                    return;
                }
            }
        }
        .in_current_span(),
    );

    tokio::spawn(
        async move {
            loop {
                let cut = tokio::select! {
                    biased;
                    () = cancel.cancelled() => return,
                    c = cut_rx.recv() => c,
                };
                match cut {
                    Some(Cut::Utterance {
                        index,
                        pcm,
                        start_ms,
                        end_ms,
                    }) => {
                        let tx = ev_tx.clone();
                        let on_delta = move |text: String| {
                            if partials && !text.is_empty() {
                                let _ = tx.try_send(ProviderEvent::Partial(Recognition {
                                    sentence: index,
                                    text,
                                    start_ms,
                                    end_ms,
                                    words: None,
                                }));
                            }
                        };
                        let result = tokio::select! {
                            () = cancel.cancelled() => return,
                            r = rec.recognize_utterance(pcm, &on_delta) => r,
                        };
                        match result {
                            Ok(text) => {
                                let fin = ProviderEvent::Final(Recognition {
                                    sentence: index,
                                    text,
                                    start_ms,
                                    end_ms,
                                    words: None,
                                });
                                if ev_tx.send(fin).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                let (code, provider_code, message) = match e {
                                    ProviderError::Upstream {
                                        code,
                                        provider_code,
                                        message,
                                    } => (code, provider_code, message),
                                    other => ("provider_error".into(), None, other.to_string()),
                                };
                                let _ = ev_tx
                                    .send(ProviderEvent::Error {
                                        code,
                                        provider_code,
                                        message,
                                    })
                                    .await;
                                let _ = ev_tx.send(ProviderEvent::Done).await;
                                return;
                            }
                        }
                    }
                    Some(Cut::Flushed) => {
                        let _ = ev_tx.send(ProviderEvent::Done).await;
                        return;
                    }
                    None => return,
                }
            }
        }
        .in_current_span(),
    );
    Ok(ProviderStream {
        input: in_tx,
        events: ev_rx,
    })
}
