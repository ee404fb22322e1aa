//! Resuming sessions a killed process left open. Every acknowledged chunk is in
//! `session_chunks` (see `durable.rs`) and every final, warning and error event in
//! `session_events`, so a new process rebuilds the session under the same id, token and seq
//! numbering: the ingest buffer from the chunks (duplicates still answered as duplicates), the
//! event log from the stored events (the client's cursor stays valid), and a fresh provider
//! stream that gets the audio from the end of the last final sentence replayed. Only partials
//! that were superseded or not yet finalised can be gone, and the new `epoch` says so.

use super::event::{EndReason, Event, EventKind, EventLog};
use super::ingest::Ingest;
use super::worker::{Upstream, Worker};
use super::{
    now_ms, parse_id, sentence_joiner, stored, CreateOptions, Sentence, Session, SessionError,
    SessionManager, State,
};
use crate::audio::{AudioFormat, Decoder};
use crate::store::SessionRecord;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, Notify};
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
            match self.resume(&rec).await {
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

    async fn fail_orphan(
        &self,
        rec: &SessionRecord,
        max_seq: u64,
        why: &str,
    ) -> Result<(), SessionError> {
        let mut err = Event::new(EventKind::Error);
        err.seq = max_seq + 1;
        err.code = Some("server_restarted".into());
        err.message = Some(format!(
            "the server restarted while this session was open and could not resume it: {why}"
        ));
        self.inner
            .store
            .append_event(&rec.id, &stored(&err))
            .await?;
        let mut end = Event::new(EventKind::End);
        end.seq = max_seq + 2;
        end.reason = Some(EndReason::Failed);
        end.transcript = Some(rec.transcript.clone());
        let progress = crate::store::SessionProgress {
            status: "failed".into(),
            acked_seq: rec.acked_seq,
            audio_ms: rec.audio_ms,
            transcript: rec.transcript.clone(),
            end_reason: Some("failed".into()),
            at_ms: now_ms(),
        };
        self.inner
            .store
            .end_session(&rec.id, &progress, &stored(&end))
            .await?;
        Ok(())
    }

    async fn resume(&self, rec: &SessionRecord) -> Result<(), String> {
        let cfg = &self.inner.config;
        let id = parse_id(&rec.id).map_err(|e| e.to_string())?;
        let opts: CreateOptions =
            serde_json::from_str(&rec.options_json).map_err(|e| format!("options: {e}"))?;
        let (provider_name, provider) = self
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
        let token_sha256: [u8; 32] = hex::decode(&rec.token_sha256)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("stored token hash is malformed")?;

        // The ingest buffer as the uploads left it; contiguous chunks are decoded for the replay.
        let mut ingest = Ingest::new(cfg.reorder_window, cfg.max_buffered_bytes);
        let mut pcm = Vec::new();
        for ch in self
            .inner
            .store
            .chunks(&rec.id)
            .await
            .map_err(|e| e.to_string())?
        {
            ingest
                .offer(ch.seq, Bytes::from(ch.data), ch.last)
                .map_err(|e| format!("stored chunk {}: {e}", ch.seq))?;
            for c in ingest.take_ready() {
                pcm.extend(decoder.push(&c).map_err(|e| e.0)?);
            }
        }
        if rec.status == "finishing" {
            ingest.request_finish();
        }

        // The event log as served so far.
        let mut events = Vec::new();
        for e in self
            .inner
            .store
            .events_after(&rec.id, 0)
            .await
            .map_err(|e| e.to_string())?
        {
            events.push(serde_json::from_str::<Event>(&e.json).map_err(|e| e.to_string())?);
        }
        // Finals rebuild the transcript and say where the replay starts and how sentences
        // continue.
        let (mut finals, mut last_end, mut next_sentence) = (BTreeMap::new(), 0, 0);
        for e in events.iter().filter(|e| e.kind == EventKind::Final) {
            last_end = last_end.max(e.end_ms);
            next_sentence = next_sentence.max(e.sentence.saturating_add(1));
            if !e.text.is_empty() {
                finals.insert(e.sentence, Sentence::of(e));
            }
        }
        let reserved = self
            .inner
            .store
            .reserved_seqs(&rec.id)
            .await
            .map_err(|e| e.to_string())?;
        let log = EventLog::restore(events, reserved);
        let last_seq = log.last_seq();

        // Replay from the end of the last final, on the VAD frame grid.
        let from_ms = last_end / FRAME_MS * FRAME_MS;
        let replay: Vec<i16> = pcm
            .get(usize::try_from(from_ms.saturating_mul(16)).unwrap_or(usize::MAX)..)
            .map(<[i16]>::to_vec)
            .unwrap_or_default();

        let cancel = CancellationToken::new();
        let stream = provider
            .open(&stream_opts, cancel.clone())
            .map_err(|e| e.to_string())?;
        let status = if rec.status == "finishing" {
            "finishing"
        } else {
            "open"
        };
        let session = Arc::new(Session {
            id,
            user: rec.user_id.clone(),
            token_sha256,
            provider: provider_name,
            format,
            joiner: sentence_joiner(&rec.engine),
            engine: rec.engine.clone(),
            created_at_ms: rec.created_at_ms,
            epoch: self.inner.epoch,
            state: Mutex::new(State::running(
                status,
                ingest,
                log,
                finals,
                decoder.audio_ms(),
                cfg,
            )),
            wake: Notify::new(),
            log_tx: watch::Sender::new(last_seq),
            cancel: CancellationToken::new(),
        });
        let worker = Worker::new(
            self.clone(),
            Arc::clone(&session),
            Upstream {
                provider,
                opts: stream_opts,
                stream,
                cancel,
            },
            decoder,
        )
        .resuming(replay, from_ms, next_sentence);
        self.start(session, worker);
        tracing::info!(session_id = %id, replay_from_ms = from_ms, "session resumed");
        Ok(())
    }
}
