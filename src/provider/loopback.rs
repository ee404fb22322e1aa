//! A benchmark tool, not an ASR: the `loopback` provider (`"kind": "loopback"` in the providers
//! file, absent unless configured) answers every audio push at once with one partial result
//! whose text is the push's index from 0 — the chunk's `seq` when every chunk carries audio, as
//! raw PCM chunks do — and, on finish, one final with the last index. It lets
//! `scripts/bench-gateway` measure chunk POST → event at a waiting long-poll without any
//! recognition cost in the way.

use super::{
    Provider, ProviderError, ProviderEvent, ProviderInput, ProviderStream, Readiness, Recognition,
    StreamOptions,
};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Settings of a loopback provider: none.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopbackSettings {}

/// The loopback provider; see the module documentation.
pub struct LoopbackProvider {
    name: String,
}

impl LoopbackProvider {
    /// A loopback provider selectable as `name`.
    pub fn new(name: &str, _settings: LoopbackSettings) -> Self {
        Self { name: name.into() }
    }
}

#[async_trait::async_trait]
impl Provider for LoopbackProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: "loopback: a benchmark tool that answers each chunk with its index".into(),
            stats: None,
        }
    }

    fn open(
        &self,
        _opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let (in_tx, mut in_rx) = mpsc::channel(8);
        let (ev_tx, ev_rx) = mpsc::channel(16);
        // A task, not a thread: an idle loopback stream costs only its channels.
        tokio::spawn(
            async move {
                let mut pushes = 0u64;
                let mut pos_ms = 0u64;
                let result = |pushes: u64, pos_ms: u64| Recognition {
                    sentence: 0,
                    text: pushes
                        .checked_sub(1)
                        .map(|i| i.to_string())
                        .unwrap_or_default(),
                    start_ms: 0,
                    end_ms: pos_ms,
                    words: None,
                };
                loop {
                    let msg = tokio::select! {
                        () = cancel.cancelled() => return,
                        m = in_rx.recv() => m,
                    };
                    match msg {
                        Some(ProviderInput::Audio(pcm) | ProviderInput::Encoded { pcm, .. }) => {
                            pushes += 1;
                            pos_ms += pcm.len() as u64 / 16;
                            let ev = ProviderEvent::Partial(result(pushes, pos_ms));
                            if ev_tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        // Never sent: `can_finalize` is false.
                        Some(ProviderInput::Finalize) => {}
                        Some(ProviderInput::Finish) => {
                            if pushes > 0 {
                                let _ = ev_tx
                                    .send(ProviderEvent::Final(result(pushes, pos_ms)))
                                    .await;
                            }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_push_is_answered_with_its_index_and_the_end_with_a_final() {
        let p = LoopbackProvider::new("lb", LoopbackSettings::default());
        let mut s = p
            .open(&StreamOptions::default(), CancellationToken::new())
            .unwrap();
        for _ in 0..3 {
            s.input
                .send(ProviderInput::Audio(vec![0; 320]))
                .await
                .unwrap();
        }
        s.input.send(ProviderInput::Finish).await.unwrap();
        let mut got = Vec::new();
        while let Some(ev) = s.events.recv().await {
            got.push(ev);
        }
        let texts: Vec<(bool, String, u64)> = got
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Partial(r) => Some((false, r.text.clone(), r.end_ms)),
                ProviderEvent::Final(r) => Some((true, r.text.clone(), r.end_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(
            texts,
            vec![
                (false, "0".into(), 20),
                (false, "1".into(), 40),
                (false, "2".into(), 60),
                (true, "2".into(), 60)
            ]
        );
        assert_eq!(got.last(), Some(&ProviderEvent::Done));
    }
}
