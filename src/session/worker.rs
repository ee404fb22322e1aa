//! The per-session task: takes contiguous chunks from the session's ingest buffer, decodes them
//! to 16 kHz PCM, feeds the provider in order, and appends the provider's results to the log.
//! It alone records how the session ended (store row + `end` event), then lingers so late polls
//! are answered from memory, and removes the session from the registry.

use super::event::{EndReason, Event, EventKind};
use super::{stored, Session, SessionManager};
use crate::audio::Decoder;
use crate::provider::{
    Provider, ProviderEvent, ProviderInput, ProviderStream, Recognition, StreamOptions,
};
use crate::store::SessionProgress;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Event seqs reserved in the store at a time.
const SEQ_BLOCK: u64 = 64;

/// Longest wait for the provider's last results after the audio ended.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The provider side of a session: what is needed to reopen its stream after a fault.
pub(super) struct Upstream {
    /// The session's provider.
    pub provider: Arc<dyn Provider>,
    /// The options the stream was opened with.
    pub opts: StreamOptions,
    /// The current stream.
    pub stream: ProviderStream,
    /// Cancels the current stream.
    pub cancel: CancellationToken,
}

/// Audio already sent to the current provider stream since the last final result, kept to
/// replay it into a reopened stream, and the offsets that map the new stream's results back.
#[derive(Default)]
struct Replay {
    /// 16 kHz mono samples from `start_ms` (session time) to what was sent.
    pcm: Vec<i16>,
    /// Session time where `pcm` starts: the end of the last final, ms.
    start_ms: u64,
    /// Session time where the current stream's time 0 is, ms.
    offset_ms: u64,
    /// Added to the current stream's sentence indices.
    sentence_base: u32,
    /// One past the highest sentence index finalised so far.
    next_sentence: u32,
    /// Provider failures since the last final result.
    failures: u32,
    /// Compressed frames go through as recorded (until a reopen switches the stream to PCM).
    pass_through: bool,
    /// Incremented by every reopen.
    generation: u32,
    /// Set for a session resumed after a restart: its replay is sent before anything else.
    resumed: bool,
}

/// Most audio kept for a replay, in samples (60 s at 16 kHz): a provider that finalises
/// nothing for longer gets only the last minute again.
const MAX_REPLAY_SAMPLES: usize = 60 * 16_000;

impl Replay {
    /// Records audio sent to the stream.
    fn sent(&mut self, pcm: &[i16]) {
        self.pcm.extend_from_slice(pcm);
        if self.pcm.len() > MAX_REPLAY_SAMPLES {
            let drop = self.pcm.len() - MAX_REPLAY_SAMPLES;
            self.pcm.drain(..drop);
            self.start_ms += drop as u64 / 16;
        }
    }
}

pub(super) struct Worker {
    mgr: SessionManager,
    s: Arc<Session>,
    stream: ProviderStream,
    provider_cancel: CancellationToken,
    provider: Arc<dyn Provider>,
    opts: StreamOptions,
    replay: Replay,
    /// Event seqs reserved in the store so far.
    seq_reserved: u64,
    decoder: Decoder,
    /// `Finish` has been sent to the provider.
    input_done: bool,
    /// Set when the worker decided to end early (idle, max duration, shutdown, bad audio):
    /// the reason to record and the deadline for the provider's last results.
    wind_down: Option<(EndReason, Instant)>,
    /// Deadline for the provider's `Done` after a normal finish.
    finish_deadline: Option<Instant>,
    shutdown_seen: bool,
    provider_failed: bool,
    outcome: Option<EndReason>,
}

impl Worker {
    pub(super) fn new(
        mgr: SessionManager,
        s: Arc<Session>,
        up: Upstream,
        decoder: Decoder,
    ) -> Self {
        Self {
            mgr,
            s,
            stream: up.stream,
            provider_cancel: up.cancel,
            provider: up.provider,
            replay: Replay {
                pass_through: up.opts.encoded.is_some(),
                ..Replay::default()
            },
            opts: up.opts,
            seq_reserved: 0,
            decoder,
            input_done: false,
            wind_down: None,
            finish_deadline: None,
            shutdown_seen: false,
            provider_failed: false,
            outcome: None,
        }
    }

    /// For a session resumed after a restart: `pcm` (16 kHz, from `from_ms` of session time, the
    /// end of the last final) is replayed into the new stream first; its results are numbered
    /// from `next_sentence`.
    pub(super) fn resuming(mut self, pcm: Vec<i16>, from_ms: u64, next_sentence: u32) -> Self {
        self.replay.start_ms = from_ms;
        self.replay.sent(&pcm); // keeps at most the last minute, moving start_ms
        self.replay.offset_ms = self.replay.start_ms;
        self.replay.next_sentence = next_sentence;
        self.replay.sentence_base = next_sentence;
        self.replay.pass_through = false;
        self.replay.resumed = true;
        self
    }

    pub(super) async fn run(mut self) {
        if self.replay.resumed {
            self.push(warning_event(
                "session_resumed",
                &format!(
                    "the server restarted; the session continues and the audio from {} ms on is recognised again",
                    self.replay.start_ms
                ),
            ))
            .await;
            self.send_replay().await;
            self.feed(false).await;
        }
        let reason = self.main_loop().await;
        self.provider_cancel.cancel();
        self.record_end(reason).await;
        let linger = Duration::from_millis(self.mgr.config().session_linger_ms);
        let shutdown = self.mgr.shutdown_token().clone();
        let _ = shutdown
            .run_until_cancelled(tokio::time::sleep(linger))
            .await;
        self.mgr.remove(&self.s.id);
    }

    async fn main_loop(&mut self) -> EndReason {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let shutdown = self.mgr.shutdown_token().clone();
        let cancel = self.s.cancel.clone();
        loop {
            if let Some(r) = self.outcome {
                return r;
            }
            let now = Instant::now();
            if let Some((reason, deadline)) = self.wind_down {
                if now >= deadline {
                    return reason;
                }
            }
            if self.finish_deadline.is_some_and(|d| now >= d) {
                self.push(error_event(
                    "provider_timeout",
                    "the provider did not deliver its last results in time",
                ))
                .await;
                return EndReason::Failed;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return EndReason::Cancelled,
                () = shutdown.cancelled(), if !self.shutdown_seen => {
                    self.shutdown_seen = true;
                    let grace = Duration::from_millis(self.mgr.config().shutdown_grace_ms);
                    let reason = if self.s.lock().ingest.finish_requested() { EndReason::Finished } else { EndReason::Failed };
                    let note = (reason == EndReason::Failed)
                        .then(|| error_event("server_shutdown", "the server is shutting down; results so far are kept"));
                    self.wind_down(reason, note, grace).await;
                }
                ev = self.stream.events.recv() => match ev {
                    Some(ev) => self.on_event(ev).await,
                    None => {
                        if !self.reopen("provider_closed", "the provider stream closed unexpectedly").await {
                            self.push(error_event("provider_closed", "the provider stream closed unexpectedly")).await;
                            return EndReason::Failed;
                        }
                    }
                },
                () = self.s.wake.notified(), if !self.input_done && self.wind_down.is_none() => self.feed(false).await,
                _ = tick.tick() => self.check_limits().await,
            }
        }
    }

    /// Decodes and forwards every ready chunk; sends `Finish` once the audio is complete (or
    /// at once when `force` is set, as when winding down).
    async fn feed(&mut self, force: bool) {
        let (chunks, complete) = {
            let mut st = self.s.lock();
            let chunks = st.ingest.take_ready();
            (chunks, force || st.ingest.input_complete())
        };
        for chunk in chunks {
            let decoded = self
                .decoder
                .push(&chunk)
                .map(|pcm| (pcm, self.decoder.take_frames()));
            let pass_through = self.replay.pass_through;
            let decoded = decoded.map(|(pcm, frames)| (pcm, frames.filter(|_| pass_through)));
            match decoded {
                Ok((pcm, None)) if pcm.is_empty() => {}
                Ok((_, Some(frames))) if frames.is_empty() => {}
                Ok((pcm, frames)) => {
                    self.replay.sent(&pcm);
                    let input = match frames {
                        Some(frames) => ProviderInput::Encoded { frames, pcm },
                        None => ProviderInput::Audio(pcm),
                    };
                    if !self.send(input).await {
                        return;
                    }
                }
                Err(e) => {
                    self.push(error_event("unsupported_audio", &e.0)).await;
                    self.outcome = Some(EndReason::Failed);
                    return;
                }
            }
        }
        let audio_ms = self.decoder.audio_ms();
        self.s.lock().audio_ms = audio_ms;
        let max = self.mgr.config().session_max_audio_ms;
        if audio_ms > max && self.wind_down.is_none() {
            let note = warning_event(
                "max_duration",
                &format!("the session reached its maximum audio duration of {max} ms"),
            );
            let grace = Duration::from_millis(self.mgr.config().shutdown_grace_ms);
            Box::pin(self.wind_down(EndReason::Expired, Some(note), grace)).await;
            return;
        }
        if complete && !self.input_done {
            if let Some(why) = self.decoder.incomplete() {
                self.push(error_event("unsupported_audio", &why)).await;
                self.outcome = Some(EndReason::Failed);
                return;
            }
            let tail = self.decoder.finish();
            self.replay.sent(&tail);
            if !tail.is_empty() && !self.send(ProviderInput::Audio(tail)).await {
                return;
            }
            // Marked first: a stream reopened while this is sent gets its own Finish.
            self.input_done = true;
            self.finish_deadline = Some(Instant::now() + FINISH_TIMEOUT);
            self.send(ProviderInput::Finish).await;
        }
    }

    /// Sends to the provider while still draining its results (so neither side can block the
    /// other). Returns false when the provider is gone or the session was cancelled.
    async fn send(&mut self, input: ProviderInput) -> bool {
        let tx = self.stream.input.clone();
        let cancel = self.s.cancel.clone();
        let generation = self.replay.generation;
        loop {
            // Reopened meanwhile: the input was replayed into the new stream with the rest.
            if self.replay.generation != generation {
                return true;
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => return false,
                permit = tx.reserve() => {
                    return match permit {
                        Ok(p) => { p.send(input); true }
                        Err(_) => false,
                    };
                }
                ev = self.stream.events.recv() => match ev {
                    Some(ev) => Box::pin(self.on_event(ev)).await,
                    None => return false,
                },
            }
        }
    }

    /// Stops taking audio, flushes what was accepted, and gives the provider until `grace`
    /// to deliver its last results; the session then ends with `reason`.
    async fn wind_down(&mut self, reason: EndReason, note: Option<Event>, grace: Duration) {
        if self.wind_down.is_some() {
            return;
        }
        self.wind_down = Some((reason, Instant::now() + grace));
        {
            let mut st = self.s.lock();
            st.ingest.request_finish();
            st.status = "finishing";
        }
        if let Some(ev) = note {
            self.push(ev).await;
        }
        if !self.input_done {
            self.feed(true).await;
        }
    }

    async fn check_limits(&mut self) {
        if self.wind_down.is_some() || self.input_done {
            return;
        }
        let idle_ms = self.mgr.config().session_idle_ms;
        let idle = self.s.lock().last_activity.elapsed();
        if idle > Duration::from_millis(idle_ms) {
            let note = warning_event(
                "idle_timeout",
                &format!("no upload or poll for {idle_ms} ms"),
            );
            self.wind_down(EndReason::Expired, Some(note), Duration::from_secs(10))
                .await;
        }
    }

    /// Maps a result of the current stream into session time and sentence numbering.
    fn map(&self, mut r: Recognition) -> Recognition {
        let off = self.replay.offset_ms;
        // Saturating: the numbers come from an upstream.
        r.sentence = r.sentence.saturating_add(self.replay.sentence_base);
        r.start_ms = r.start_ms.saturating_add(off);
        r.end_ms = r.end_ms.saturating_add(off);
        if let Some(words) = r.words.as_mut() {
            for w in words {
                w.start_ms = w.start_ms.saturating_add(off);
                w.end_ms = w.end_ms.saturating_add(off);
            }
        }
        r
    }

    /// A final result: the audio before its end will never be replayed.
    fn finalised(&mut self, r: &Recognition) {
        let rp = &mut self.replay;
        rp.next_sentence = rp.next_sentence.max(r.sentence.saturating_add(1));
        rp.failures = 0;
        if r.end_ms > rp.start_ms {
            let drop =
                usize::try_from((r.end_ms - rp.start_ms).saturating_mul(16)).unwrap_or(usize::MAX);
            rp.pcm.drain(..drop.min(rp.pcm.len()));
            rp.start_ms = r.end_ms;
        }
    }

    /// After a provider fault: reopens the stream with backoff and replays the audio since the
    /// last final, so the unfinished utterance is recognised again and nothing finalised is
    /// repeated. Returns false when retries are exhausted or the fault is not transient.
    async fn reopen(&mut self, code: &str, message: &str) -> bool {
        let transient = matches!(
            code,
            "provider_closed" | "provider_unavailable" | "provider_timeout" | "provider_error"
        );
        let max = self.mgr.config().provider_retries;
        if !transient
            || self.replay.failures >= max
            || self.s.cancel.is_cancelled()
            || self.wind_down.is_some()
        {
            return false;
        }
        self.replay.failures += 1;
        let attempt = self.replay.failures;
        let backoff =
            Duration::from_millis(self.mgr.config().provider_backoff_ms << (attempt - 1).min(5));
        tracing::warn!(
            code,
            message,
            attempt,
            ?backoff,
            "provider stream failed; reopening"
        );
        self.provider_cancel.cancel();
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = self.s.cancel.cancelled() => return false,
        }
        // The reopened stream takes PCM: the replay is decoded audio.
        let mut opts = self.opts.clone();
        opts.encoded = None;
        self.replay.pass_through = false;
        let cancel = CancellationToken::new();
        let stream = match self.provider.open(&opts, cancel.clone()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reopening the provider stream failed");
                return Box::pin(self.reopen("provider_unavailable", &e.to_string())).await;
            }
        };
        self.stream = stream;
        self.provider_cancel = cancel;
        self.replay.generation += 1;
        self.provider_failed = false;
        self.replay.offset_ms = self.replay.start_ms;
        self.replay.sentence_base = self.replay.next_sentence;
        self.push(warning_event(
            "provider_reconnected",
            &format!("the provider stream failed ({code}: {message}); reopened it (attempt {attempt} of {max}) and replayed the unfinished utterance"),
        ))
        .await;
        if !self.send_replay().await {
            return true;
        }
        if self.input_done {
            self.send(ProviderInput::Finish).await;
            self.finish_deadline = Some(Instant::now() + FINISH_TIMEOUT);
        }
        true
    }

    /// Sends the kept audio into the current stream in 1 s parts. False when the stream failed
    /// at once (its events say so) or was reopened meanwhile (that reopen replayed it all).
    async fn send_replay(&mut self) -> bool {
        let generation = self.replay.generation;
        let replay = self.replay.pcm.clone();
        for part in replay.chunks(16_000) {
            let sent = self.send(ProviderInput::Audio(part.to_vec())).await;
            if !sent || self.replay.generation != generation {
                return false;
            }
        }
        true
    }

    async fn on_event(&mut self, ev: ProviderEvent) {
        match ev {
            ProviderEvent::Partial(r) => {
                let r = self.map(r);
                self.push(recognition_event(EventKind::Partial, r)).await;
            }
            ProviderEvent::Final(r) => {
                let r = self.map(r);
                self.finalised(&r);
                if self
                    .push(recognition_event(EventKind::Final, r))
                    .await
                    .is_some()
                {
                    let progress = self.progress(None);
                    if let Err(e) = self
                        .mgr
                        .store()
                        .update_progress(&self.s.id.to_string(), &progress)
                        .await
                    {
                        tracing::error!(error = %e, cause = ?e, "persisting progress failed");
                    }
                }
            }
            ProviderEvent::Warning { code, message } => {
                self.push(warning_event(&code, &message)).await;
            }
            ProviderEvent::Error {
                code,
                provider_code,
                message,
            } => {
                if self.wind_down.is_none() && Box::pin(self.reopen(&code, &message)).await {
                    return;
                }
                self.provider_failed = true;
                let mut ev = error_event(&code, &message);
                ev.provider_code = provider_code;
                self.push(ev).await;
            }
            ProviderEvent::Done => {
                self.outcome = Some(if self.provider_failed {
                    EndReason::Failed
                } else if let Some((reason, _)) = self.wind_down {
                    reason
                } else {
                    EndReason::Finished
                });
            }
        }
    }

    /// Appends to the log; every event but partials is also persisted, so the log served after
    /// a restart has no gaps except superseded partials.
    ///
    /// Before a seq is handed out, seqs are reserved in the store in blocks of [`SEQ_BLOCK`], so
    /// a resumed session continues above any seq a client may hold as its cursor.
    async fn push(&mut self, ev: Event) -> Option<Event> {
        let next = self.s.lock().log.last_seq() + 1;
        if next > self.seq_reserved {
            let upto = next + SEQ_BLOCK - 1;
            match self
                .mgr
                .store()
                .reserve_seqs(&self.s.id.to_string(), upto)
                .await
            {
                Ok(()) => self.seq_reserved = upto,
                Err(e) => tracing::error!(error = %e, cause = ?e, "reserving event seqs failed"),
            }
        }
        let durable = !matches!(ev.kind, EventKind::Partial | EventKind::End);
        let stored_ev = self.s.push_event(ev, !durable)?;
        if durable {
            if let Err(e) = self
                .mgr
                .store()
                .append_event(&self.s.id.to_string(), &stored(&stored_ev))
                .await
            {
                tracing::error!(error = %e, cause = ?e, "persisting an event failed");
            }
            self.s.publish(stored_ev.seq);
        }
        Some(stored_ev)
    }

    fn progress(&self, end: Option<EndReason>) -> SessionProgress {
        let st = self.s.lock();
        SessionProgress {
            status: end.map_or(st.status, EndReason::status).to_string(),
            acked_seq: st.ingest.acked_seq(),
            audio_ms: st.audio_ms,
            transcript: self.s.transcript(&st),
            end_reason: end.map(|r| r.status().to_string()),
            at_ms: super::now_ms(),
        }
    }

    async fn record_end(&mut self, reason: EndReason) {
        let progress = self.progress(Some(reason));
        {
            let mut st = self.s.lock();
            st.status = reason.status();
            st.end_reason = Some(reason);
            st.ended_at_ms = Some(progress.at_ms);
        }
        let mut end = Event::new(EventKind::End);
        end.reason = Some(reason);
        end.transcript = Some(progress.transcript.clone());
        end.end_ms = progress.audio_ms;
        let Some(end) = self.s.push_event(end, false) else {
            return;
        };
        if let Err(e) = self
            .mgr
            .store()
            .end_session(&self.s.id.to_string(), &progress, &stored(&end))
            .await
        {
            tracing::error!(error = %e, cause = ?e, "recording the end of a session failed");
        }
        self.s.publish(end.seq);
        tracing::info!(
            reason = reason.status(),
            audio_ms = progress.audio_ms,
            "session ended"
        );
    }
}

fn recognition_event(kind: EventKind, r: Recognition) -> Event {
    Event {
        sentence: r.sentence,
        text: r.text,
        start_ms: r.start_ms,
        end_ms: r.end_ms,
        words: r.words,
        ..Event::new(kind)
    }
}

fn error_event(code: &str, message: &str) -> Event {
    Event {
        code: Some(code.into()),
        message: Some(message.into()),
        text: message.into(),
        ..Event::new(EventKind::Error)
    }
}

fn warning_event(code: &str, message: &str) -> Event {
    Event {
        code: Some(code.into()),
        message: Some(message.into()),
        text: message.into(),
        ..Event::new(EventKind::Warning)
    }
}
