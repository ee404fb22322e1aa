//! Resuming sessions a killed process left open. Every acknowledged chunk is in the chunk
//! store (see `durable.rs`; SQLite deployments keep a file per running session) and every
//! final, warning and error event in
//! `session_events`, so a new process rebuilds the session under the same id, token and seq
//! numbering: the ingest buffer from the chunks (duplicates still answered as duplicates), the
//! event log from the stored events (the client's cursor stays valid), and a fresh provider
//! stream that gets the audio from the end of the last final sentence replayed. Only partials
//! that were superseded or not yet finalised can be gone, and the new `epoch` says so.

use super::event::{EndReason, Event, EventKind, EventLog, Usage};
use super::ingest::{Ingest, Ready};
use super::state::{RateLimit, Session, State, Status};
use super::stored::{events_after, stored, Finals};
use super::worker::Upstream;
use super::{CreateOptions, SessionError, SessionManager};
use crate::audio::{AudioFormat, Decoder};
use crate::clock::now_ms;
use crate::store::{SessionProgress, SessionRecord};
use tokio_util::sync::CancellationToken;

/// The VAD frame (30 ms): replays start on this grid so voice detection sees the same frames.
const FRAME_MS: u64 = 30;

impl SessionManager {
    /// Resumes every session a previous process left open; those that cannot be resumed (their
    /// provider is gone, their audio no longer decodes) are recorded as `failed` with a
    /// `server_restarted` error. Returns (resumed, failed).
    ///
    /// # Errors
    /// Storage failures.
    pub async fn resume_orphans(&self) -> Result<(usize, usize), SessionError> {
        let orphans = self.inner.store.unfinished().await?;
        let (mut resumed, mut failed) = (0, 0);
        for (rec, max_seq) in orphans {
            match self.resume(rec.clone(), self.inner.epoch).await {
                Ok(()) => resumed += 1,
                Err(why) => {
                    tracing::warn!(session_id = %rec.id, %why, "cannot resume session");
                    self.fail_orphan(&rec, max_seq, &why).await?;
                    failed += 1;
                }
            }
        }
        Ok((resumed, failed))
    }

    pub(super) async fn fail_orphan(
        &self,
        rec: &SessionRecord,
        max_seq: u64,
        why: &str,
    ) -> Result<(), SessionError> {
        let mut err = Event::error(
            "server_restarted",
            &format!(
                "the server restarted while this session was open and could not resume it: {why}"
            ),
        );
        err.text = String::new();
        err.seq = max_seq + 1;
        self.inner
            .store
            .append_event(&rec.id, &stored(&err))
            .await?;
        let mut end = Event::new(EventKind::End);
        end.seq = max_seq + 2;
        end.reason = Some(EndReason::Failed);
        end.transcript = Some(rec.transcript.clone());
        let finals = Finals::of(&events_after(&*self.inner.store, &rec.id, 0).await?);
        let spans = finals.sentences.values().map(|s| (s.start_ms, s.end_ms));
        end.usage = Some(Usage::of(rec.audio_ms, spans, &rec.provider));
        let progress = SessionProgress {
            status: EndReason::Failed.status().into(),
            acked_seq: rec.acked_seq,
            audio_ms: rec.audio_ms,
            transcript: rec.transcript.clone(),
            end_reason: Some(EndReason::Failed.status().into()),
            at_ms: now_ms(),
        };
        self.inner
            .store
            .end_session(&rec.id, &progress, &stored(&end))
            .await?;
        Ok(())
    }

    /// Resumes one session under `epoch` (this process's, or the one a takeover claimed).
    pub(super) async fn resume(&self, rec: SessionRecord, epoch: u64) -> Result<(), String> {
        let limits = &self.inner.limits;
        let opts: CreateOptions =
            serde_json::from_str(&rec.options_json).map_err(|e| format!("options: {e}"))?;
        let (_, provider) = self
            .inner
            .providers
            .get(Some(&rec.provider))
            .map_err(|e| e.to_string())?;
        let mut stream_opts = opts.stream_options().map_err(|e| e.to_string())?;
        stream_opts.encoded = None; // the replay is decoded audio
        let format = AudioFormat::parse(opts.format.as_deref().unwrap_or("pcm"))?;
        let mut decoder = Decoder::new(
            format,
            opts.sample_rate.unwrap_or(16_000),
            opts.channels.unwrap_or(1),
        )
        .map_err(|e| e.0)?;

        // The ingest buffer as the uploads left it; contiguous chunks are decoded for the replay.
        let mut ingest = Ingest::new(limits.reorder_window, limits.max_buffered_bytes);
        let mut pcm = Vec::new();
        let chunks = self
            .inner
            .store
            .chunks(&rec.id)
            .await
            .map_err(|e| e.to_string())?;
        for ch in chunks {
            ingest
                .offer(ch.seq, ch.data, ch.last)
                .map_err(|e| format!("stored chunk {}: {e}", ch.seq))?;
            // Sentence ends are not stored: none can be pending in a fresh buffer.
            for c in ingest.take_ready() {
                if let Ready::Chunk(c) = c {
                    pcm.extend(decoder.push(&c).map_err(|e| e.0)?);
                }
            }
        }
        let status = if rec.status == Status::Finishing.as_str() {
            ingest.request_finish();
            Status::Finishing
        } else {
            Status::Open
        };

        // The event log as served so far; its finals rebuild the transcript and say where the
        // replay starts and how sentences continue.
        let events = events_after(&*self.inner.store, &rec.id, 0)
            .await
            .map_err(|e| e.to_string())?;
        let finals = Finals::of(&events);
        let reserved = self
            .inner
            .store
            .reserved_seqs(&rec.id)
            .await
            .map_err(|e| e.to_string())?;
        let log = EventLog::restore(events, reserved);

        // Replay from the end of the last final, on the VAD frame grid.
        let from_ms = finals.last_end_ms / FRAME_MS * FRAME_MS;
        let replay: Vec<i16> = pcm
            .get(usize::try_from(from_ms.saturating_mul(16)).unwrap_or(usize::MAX)..)
            .map(<[i16]>::to_vec)
            .unwrap_or_default();

        let cancel = CancellationToken::new();
        let span = super::session_span(&rec.id, provider.name(), epoch);
        let stream = {
            let _in_span = span.enter();
            provider.open(&stream_opts, cancel.clone())
        }
        .map_err(|e| e.to_string())?;
        metrics::counter!(crate::metrics::PROVIDER_OPENS, "provider" => provider.name().to_string())
            .increment(1);
        let state = State::running(
            status,
            ingest,
            log,
            finals.sentences,
            decoder.audio_ms(),
            RateLimit::new(limits.max_chunks_per_s),
        );
        let session_id = rec.id.clone();
        let session = Session::new(rec, format, epoch, state)?;
        let upstream = Upstream {
            provider,
            opts: stream_opts,
            stream,
            cancel,
        };
        let resume = (replay, from_ms, finals.next_sentence);
        self.launch(session, upstream, decoder, Some(resume), span.clone());
        span.in_scope(|| tracing::info!(%session_id, replay_from_ms = from_ms, "session resumed"));
        Ok(())
    }
}
