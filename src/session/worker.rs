//! The per-session task: takes contiguous chunks from the session's ingest buffer, decodes them
//! to 16 kHz PCM, feeds the provider in order, and appends the provider's results to the log.
//! It alone records how the session ended (store row + `end` event), then lingers so late polls
//! are answered from memory, and calls its exit callback.
//!
//! One loop, no re-entry: [`Worker::next_input`] waits for whichever comes first (cancel,
//! shutdown, a provider event, room in the provider's input channel, new chunks, the next
//! deadline) and
//! [`Worker::step`] handles it. Audio for the provider waits in an outbox that is sent from only
//! as the provider takes it, so provider events are always drained while sending. New chunks are
//! taken from the ingest buffer only once the outbox is empty, so its byte limit stays the
//! session's backpressure.

use super::event::{EndReason, Event, EventKind};
use super::ingest::Ready;
use super::options::SessionLimits;
use super::replay::Replay;
use super::stability::Agreement;
use super::state::{Session, Status};
use super::stored::stored;
use super::timeline::Timeline;
use crate::audio::Decoder;
use crate::provider::{
    Provider, ProviderEvent, ProviderInput, ProviderStream, Recognition, StreamOptions,
};
use crate::store::{SessionProgress, SessionStore, StoreError};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::OwnedPermit;
use tokio_util::sync::CancellationToken;

/// Event seqs reserved in the store at a time.
const SEQ_BLOCK: u64 = 64;

/// Longest wait for the provider's last results after the audio ended.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a shared (Redis) session looks for chunks in the shared log itself, in case an
/// announcement was missed. One-instance sessions have no periodic timer: an idle session
/// sleeps until its next deadline.
const SHARED_POLL: Duration = Duration::from_millis(250);

/// Grace for the provider's last results after an idle timeout.
const IDLE_GRACE: Duration = Duration::from_secs(10);

/// What a worker needs from the engine, and nothing more.
pub(super) struct WorkerCtx {
    /// Where events, progress and the end are recorded.
    pub store: Arc<dyn SessionStore>,
    /// Idle, duration, grace, retry and linger limits.
    pub limits: Arc<SessionLimits>,
    /// Server shutdown: the session flushes what it can and ends.
    pub shutdown: CancellationToken,
    /// Called once when the worker is done (after the linger): drops the session from the
    /// registry.
    pub on_exit: Box<dyn FnOnce() + Send + Sync>,
    /// Set when replicas share sessions through Redis: this worker then takes its chunks from
    /// the shared chunk log and stores partials too, so any replica can serve its polls.
    pub shared: Option<Shared>,
}

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

/// One thing for the worker to handle.
pub(super) enum Input {
    /// The client cancelled the session.
    Cancelled,
    /// Another replica runs the session now (lease lost, a write fenced, or handed off).
    Fenced,
    /// The server began shutting down.
    Shutdown,
    /// The provider reported something; `None` when its stream closed.
    Provider(Option<ProviderEvent>),
    /// The provider's input channel has room (`None`: it closed).
    Sendable(Option<OwnedPermit<ProviderInput>>),
    /// Chunks became ready or the end of the audio was requested.
    Wake,
    /// A deadline came (idle limit, wind-down, finish) or a shared session's look at its log.
    Tick,
}

pub(super) struct Worker {
    ctx: WorkerCtx,
    s: Arc<Session>,
    up: Upstream,
    /// Inputs for the provider, sent in order as its channel takes them.
    outbox: VecDeque<ProviderInput>,
    /// The provider dropped its input channel (its events say why).
    input_closed: bool,
    replay: Replay,
    /// The stable prefix of the open sentence's partials.
    agreement: Agreement,
    /// When the current stream was given its audio, to time its results.
    timeline: Timeline,
    /// Event seqs reserved in the store so far.
    seq_reserved: u64,
    decoder: Decoder,
    /// `Finish` is queued for the provider.
    input_done: bool,
    /// Set when the worker decided to end early (idle, max duration, shutdown, bad audio):
    /// the reason to record and the deadline for the provider's last results.
    wind_down: Option<(EndReason, Instant)>,
    /// Deadline for the provider's `Done` after a normal finish.
    finish_deadline: Option<Instant>,
    shutdown_seen: bool,
    provider_failed: bool,
    /// `finalize_unsupported` was said.
    finalize_warned: bool,
    outcome: Option<EndReason>,
}

impl Worker {
    pub(super) fn new(ctx: WorkerCtx, s: Arc<Session>, up: Upstream, decoder: Decoder) -> Self {
        Self {
            ctx,
            s,
            replay: Replay::new(up.opts.encoded.is_some()),
            agreement: Agreement::default(),
            up,
            timeline: Timeline::default(),
            outbox: VecDeque::new(),
            input_closed: false,
            seq_reserved: 0,
            decoder,
            input_done: false,
            wind_down: None,
            finish_deadline: None,
            shutdown_seen: false,
            provider_failed: false,
            finalize_warned: false,
            outcome: None,
        }
    }

    /// For a session resumed after a restart: `pcm` (16 kHz, from `from_ms` of session time, the
    /// end of the last final) is replayed into the new stream first; its results are numbered
    /// from `next_sentence`.
    pub(super) fn resuming(mut self, pcm: &[i16], from_ms: u64, next_sentence: u32) -> Self {
        self.replay = Replay::resumed(pcm, from_ms, next_sentence);
        self
    }

    pub(super) async fn run(mut self) {
        let reason = self.drive().await;
        self.up.cancel.cancel();
        if self.s.fenced.is_cancelled() {
            // Not ours to end: the replica that took it over resumes it from the store.
            tracing::info!("session left to another replica");
            let exit = std::mem::replace(&mut self.ctx.on_exit, Box::new(|| {}));
            exit();
            return;
        }
        self.record_end(reason).await;
        if let Some(sh) = &self.ctx.shared {
            let id = self.s.id.to_string();
            if let Err(e) = sh.redis.release(&id, &sh.replica, self.s.epoch()).await {
                tracing::warn!(error = %e, "releasing the lease of an ended session failed");
            }
        }
        let linger = Duration::from_millis(self.ctx.limits.session_linger_ms);
        let _ = self
            .ctx
            .shutdown
            .run_until_cancelled(tokio::time::sleep(linger))
            .await;
        let exit = std::mem::replace(&mut self.ctx.on_exit, Box::new(|| {}));
        exit();
    }

    /// Runs the session until it ends; returns why.
    async fn drive(&mut self) -> EndReason {
        self.start().await;
        loop {
            if let Some(reason) = self.due().await {
                return reason;
            }
            let input = self.next_input().await;
            if let Some(reason) = self.step(input).await {
                return reason;
            }
        }
    }

    /// What a session does before its first input: a resumed one says so and queues its
    /// replay and the chunks already stored.
    async fn start(&mut self) {
        if !self.replay.resumed {
            return;
        }
        let note = format!(
            "the server restarted (or another replica took the session over); the session continues and the audio from {} ms on is recognised again",
            self.replay.start_ms
        );
        self.push(Event::warning("session_resumed", &note)).await;
        self.outbox.extend(self.replay.parts());
        self.feed(false).await;
    }

    /// The end the session reached without a new input, if any: its outcome, or a deadline
    /// that passed.
    async fn due(&mut self) -> Option<EndReason> {
        if let Some(r) = self.outcome {
            return Some(r);
        }
        let now = Instant::now();
        if let Some((reason, deadline)) = self.wind_down {
            if now >= deadline {
                return Some(reason);
            }
        }
        if self.finish_deadline.is_some_and(|d| now >= d) {
            let message = "the provider did not deliver its last results in time";
            self.push(Event::error("provider_timeout", message)).await;
            return Some(EndReason::Failed);
        }
        None
    }

    /// Waits for the next thing to handle. Provider events come before sending, so results
    /// are drained while the provider is fed.
    pub(super) async fn next_input(&mut self) -> Input {
        let cancel = self.s.cancel.clone();
        let fenced = self.s.fenced.clone();
        let shutdown = self.ctx.shutdown.clone();
        let tx = self.up.stream.input.clone();
        let can_send = !self.outbox.is_empty() && !self.input_closed;
        let can_feed = self.outbox.is_empty() && !self.input_done && self.wind_down.is_none();
        let deadline = self.next_deadline();
        tokio::select! {
            biased;
            () = cancel.cancelled() => Input::Cancelled,
            () = fenced.cancelled() => Input::Fenced,
            () = shutdown.cancelled(), if !self.shutdown_seen => Input::Shutdown,
            ev = self.up.stream.events.recv() => Input::Provider(ev),
            p = tx.reserve_owned(), if can_send => Input::Sendable(p.ok()),
            () = self.s.wake.notified(), if can_feed => Input::Wake,
            () = tokio::time::sleep_until(deadline) => Input::Tick,
        }
    }

    /// The earliest time something must be checked without a new input: the idle limit
    /// (while audio may still come), the wind-down and finish deadlines, and for a shared
    /// session its look at the shared log.
    fn next_deadline(&self) -> tokio::time::Instant {
        let mut at = Instant::now() + FINISH_TIMEOUT;
        if self.wind_down.is_none() && !self.input_done {
            let idle = Duration::from_millis(self.ctx.limits.session_idle_ms);
            // A little past the limit, so the check finds it exceeded.
            at = at.min(self.s.lock().last_activity + idle + Duration::from_millis(1));
        }
        if let Some((_, d)) = self.wind_down {
            at = at.min(d);
        }
        if let Some(d) = self.finish_deadline {
            at = at.min(d);
        }
        if self.ctx.shared.is_some() {
            at = at.min(Instant::now() + SHARED_POLL);
        }
        at.into()
    }

    /// Handles one input; returns the reason when the session must end now.
    pub(super) async fn step(&mut self, input: Input) -> Option<EndReason> {
        match input {
            Input::Cancelled => return Some(EndReason::Cancelled),
            Input::Fenced => return Some(EndReason::Failed),
            Input::Shutdown if self.ctx.shared.is_some() => {
                // A draining replica hands its sessions over: it drops the lease and another
                // replica resumes the session from the store at once.
                self.shutdown_seen = true;
                self.hand_off().await;
                return Some(EndReason::Failed);
            }
            Input::Shutdown => {
                self.shutdown_seen = true;
                let reason = if self.s.lock().ingest.finish_requested() {
                    EndReason::Finished
                } else {
                    EndReason::Failed
                };
                let note = (reason == EndReason::Failed).then(|| {
                    Event::error(
                        "server_shutdown",
                        "the server is shutting down; results so far are kept",
                    )
                });
                self.wind_down(reason, note, self.ctx.limits.grace()).await;
            }
            Input::Provider(Some(ev)) => self.on_event(ev).await,
            Input::Provider(None) => {
                let message = "the provider stream closed unexpectedly";
                if !self.reopen("provider_closed", message).await {
                    self.push(Event::error("provider_closed", message)).await;
                    return Some(EndReason::Failed);
                }
            }
            Input::Sendable(Some(permit)) => {
                if let Some(input) = self.outbox.pop_front() {
                    if let ProviderInput::Audio(pcm) | ProviderInput::Encoded { pcm, .. } = &input {
                        self.timeline.sent(pcm.len());
                    }
                    permit.send(input);
                }
            }
            Input::Sendable(None) => self.input_closed = true,
            Input::Wake => self.feed(false).await,
            Input::Tick => {
                // A chunk announced while the wake-up channel was reconnecting is not lost.
                if self.ctx.shared.is_some() && self.outbox.is_empty() && !self.input_done {
                    self.feed(false).await;
                }
                self.check_idle().await;
            }
        }
        self.outcome
    }

    /// Decodes every ready chunk into the outbox; queues `Finish` once the audio is complete
    /// (or at once when `force` is set, as when winding down).
    async fn feed(&mut self, force: bool) {
        if self.ctx.shared.is_some() {
            self.pull().await;
        }
        let (chunks, mut complete) = {
            let mut st = self.s.lock();
            let chunks = st.ingest.take_ready();
            (chunks, force || st.ingest.input_complete())
        };
        for piece in chunks {
            let chunk = match piece {
                Ready::Chunk(chunk) => chunk,
                Ready::SentenceEnd => {
                    self.end_sentence().await;
                    continue;
                }
            };
            let pass_through = self.replay.pass_through;
            let decoded = self.decoder.push(&chunk).map(|pcm| {
                let frames = self.decoder.take_frames().filter(|_| pass_through);
                (pcm, frames)
            });
            match decoded {
                Ok((pcm, None)) if pcm.is_empty() => {}
                Ok((_, Some(frames))) if frames.is_empty() => {}
                Ok((pcm, frames)) => {
                    self.replay.sent(&pcm);
                    self.outbox.push_back(match frames {
                        Some(frames) => ProviderInput::Encoded { frames, pcm },
                        None => ProviderInput::Audio(pcm),
                    });
                }
                Err(e) => {
                    self.push(Event::error("unsupported_audio", &e.0)).await;
                    self.outcome = Some(EndReason::Failed);
                    return;
                }
            }
        }
        let audio_ms = self.decoder.audio_ms();
        self.s.lock().audio_ms = audio_ms;
        let max = self.ctx.limits.session_max_audio_ms;
        if audio_ms > max && self.wind_down.is_none() {
            let note = Event::warning(
                "max_duration",
                &format!("the session reached its maximum audio duration of {max} ms"),
            );
            self.begin_wind_down(EndReason::Expired, Some(note), self.ctx.limits.grace())
                .await;
            complete = true;
        }
        if complete && !self.input_done {
            if let Some(why) = self.decoder.incomplete() {
                self.push(Event::error("unsupported_audio", &why)).await;
                self.outcome = Some(EndReason::Failed);
                return;
            }
            let tail = self.decoder.finish();
            self.replay.sent(&tail);
            if !tail.is_empty() {
                self.outbox.push_back(ProviderInput::Audio(tail));
            }
            self.input_done = true;
            self.finish_deadline = Some(Instant::now() + FINISH_TIMEOUT);
            self.outbox.push_back(ProviderInput::Finish);
        }
    }

    /// A client's finalize reached its place in the audio: the provider ends the sentence
    /// there, or, if its upstream cannot, the client hears so once (`finalize_unsupported`).
    async fn end_sentence(&mut self) {
        if self.up.provider.can_finalize() {
            self.outbox.push_back(ProviderInput::Finalize);
        } else if !std::mem::replace(&mut self.finalize_warned, true) {
            let message = format!(
                "provider {:?} cannot end a sentence on request; sentences end at its own endpoint",
                self.up.provider.name()
            );
            self.push(Event::warning("finalize_unsupported", &message))
                .await;
        }
    }

    /// Stops taking audio, flushes what was accepted, and gives the provider until `grace`
    /// to deliver its last results; the session then ends with `reason`.
    async fn wind_down(&mut self, reason: EndReason, note: Option<Event>, grace: Duration) {
        if self.begin_wind_down(reason, note, grace).await && !self.input_done {
            self.feed(true).await;
        }
    }

    /// The bookkeeping of [`Worker::wind_down`] without the flush; false when already winding
    /// down.
    async fn begin_wind_down(
        &mut self,
        reason: EndReason,
        note: Option<Event>,
        grace: Duration,
    ) -> bool {
        if self.wind_down.is_some() {
            return false;
        }
        self.wind_down = Some((reason, Instant::now() + grace));
        {
            let mut st = self.s.lock();
            st.ingest.request_finish();
            st.status = Status::Finishing;
        }
        if let Some(sh) = &self.ctx.shared {
            // Later uploads on any replica then meet the end of the audio.
            if let Err(e) = sh.redis.request_finish(&self.s.id.to_string()).await {
                tracing::warn!(error = %e, "recording the end of the audio failed");
            }
        }
        if let Some(ev) = note {
            self.push(ev).await;
        }
        true
    }

    async fn check_idle(&mut self) {
        if self.wind_down.is_some() || self.input_done {
            return;
        }
        let idle_ms = self.ctx.limits.session_idle_ms;
        let idle = self.s.lock().last_activity.elapsed();
        if idle > Duration::from_millis(idle_ms) {
            let note = Event::warning(
                "idle_timeout",
                &format!("no upload or poll for {idle_ms} ms"),
            );
            self.wind_down(EndReason::Expired, Some(note), IDLE_GRACE)
                .await;
        }
    }

    /// After a provider fault: reopens the stream with backoff and queues the audio since the
    /// last final for it, so the unfinished utterance is recognised again and nothing
    /// finalised is repeated. Returns false when retries are exhausted or the fault is not
    /// transient.
    async fn reopen(&mut self, code: &str, message: &str) -> bool {
        let transient = matches!(
            code,
            "provider_closed" | "provider_unavailable" | "provider_timeout" | "provider_error"
        );
        if !transient {
            return false;
        }
        let max = self.ctx.limits.provider_retries;
        let (mut code, mut message) = (code.to_string(), message.to_string());
        // The reopened stream takes PCM: the replay is decoded audio.
        let mut opts = self.up.opts.clone();
        opts.encoded = None;
        let (stream, cancel) = loop {
            if self.replay.failures >= max
                || self.s.cancel.is_cancelled()
                || self.wind_down.is_some()
            {
                return false;
            }
            self.replay.failures += 1;
            let attempt = self.replay.failures;
            let backoff =
                Duration::from_millis(self.ctx.limits.provider_backoff_ms << (attempt - 1).min(5));
            tracing::warn!(
                code,
                message,
                attempt,
                ?backoff,
                "provider stream failed; reopening"
            );
            self.up.cancel.cancel();
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.s.cancel.cancelled() => return false,
            }
            let cancel = CancellationToken::new();
            match self.up.provider.open(&opts, cancel.clone()) {
                Ok(s) => {
                    let provider = self.up.provider.name().to_string();
                    metrics::counter!(crate::metrics::PROVIDER_REOPENS, "provider" => provider)
                        .increment(1);
                    break (s, cancel);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reopening the provider stream failed");
                    code = "provider_unavailable".into();
                    message = e.to_string();
                }
            }
        };
        self.up.stream = stream;
        self.up.cancel = cancel;
        self.timeline.reset();
        self.input_closed = false;
        self.provider_failed = false;
        self.replay.reopened();
        let attempt = self.replay.failures;
        self.push(Event::warning(
            "provider_reconnected",
            &format!("the provider stream failed ({code}: {message}); reopened it (attempt {attempt} of {max}) and replayed the unfinished utterance"),
        ))
        .await;
        // What the old stream had not taken yet is in the replay too.
        self.outbox.clear();
        self.outbox.extend(self.replay.parts());
        if self.input_done {
            self.outbox.push_back(ProviderInput::Finish);
            self.finish_deadline = Some(Instant::now() + FINISH_TIMEOUT);
        }
        true
    }

    async fn on_event(&mut self, ev: ProviderEvent) {
        self.observe(&ev);
        match ev {
            ProviderEvent::SpeechStart { sentence, start_ms } => {
                let r = self.replay.map(Recognition {
                    sentence,
                    text: String::new(),
                    start_ms,
                    end_ms: start_ms,
                    words: None,
                });
                self.push(Event::recognition(EventKind::SpeechStart, r))
                    .await;
            }
            ProviderEvent::Partial(r) => {
                let r = self.replay.map(r);
                let stable = self.agreement.partial(r.sentence, &r.text);
                let mut ev = Event::recognition(EventKind::Partial, r);
                ev.stable = Some(stable);
                self.push(ev).await;
            }
            ProviderEvent::Final(r) => {
                let r = self.replay.map(r);
                self.replay.finalised(&r);
                self.agreement.finalised(r.sentence);
                if self
                    .push(Event::recognition(EventKind::Final, r))
                    .await
                    .is_some()
                {
                    let progress = self.progress(None);
                    let id = self.s.id.to_string();
                    if let Err(e) = self.ctx.store.update_progress(&id, &progress).await {
                        tracing::error!(error = %e, cause = ?e, "persisting progress failed");
                    }
                }
            }
            ProviderEvent::Warning { code, message } => {
                self.push(Event::warning(&code, &message)).await;
            }
            ProviderEvent::Error {
                code,
                provider_code,
                message,
            } => {
                if self.wind_down.is_none() && self.reopen(&code, &message).await {
                    return;
                }
                self.provider_failed = true;
                let mut ev = Event::error(&code, &message);
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

    /// Records a provider event in the metrics: result latency, errors by code.
    fn observe(&mut self, ev: &ProviderEvent) {
        let provider = self.up.provider.name().to_string();
        match ev {
            ProviderEvent::Partial(r) | ProviderEvent::Final(r) => {
                let is_final = matches!(ev, ProviderEvent::Final(_));
                if let Some(d) = self.timeline.latency(r.end_ms, is_final) {
                    let kind = if is_final { "final" } else { "partial" };
                    metrics::histogram!(crate::metrics::PROVIDER_RESULT_LATENCY, "provider" => provider, "kind" => kind)
                        .record(d.as_secs_f64());
                }
            }
            ProviderEvent::Error { code, .. } => {
                metrics::counter!(crate::metrics::PROVIDER_ERRORS, "provider" => provider, "code" => code.clone())
                    .increment(1);
            }
            ProviderEvent::SpeechStart { .. }
            | ProviderEvent::Warning { .. }
            | ProviderEvent::Done => {}
        }
    }

    /// Appends to the log; every event but partials is also persisted, so the log served after
    /// a restart has no gaps except superseded partials.
    ///
    /// Before a seq is handed out, seqs are reserved in the store in blocks of [`SEQ_BLOCK`], so
    /// a resumed session continues above any seq a client may hold as its cursor. A failed
    /// store write is retried (the worker waits, and uploads meet backpressure) until it
    /// succeeds or the session is cancelled or the server stops: no event is handed a seq that
    /// is not reserved, and none is visible before it is stored.
    async fn push(&mut self, ev: Event) -> Option<Event> {
        let id = self.s.id.to_string();
        let store = Arc::clone(&self.ctx.store);
        let next = self.s.lock().log.last_seq() + 1;
        if next > self.seq_reserved {
            let upto = next + SEQ_BLOCK - 1;
            if !self
                .retry_store("reserving event seqs", || store.reserve_seqs(&id, upto))
                .await
            {
                return None;
            }
            self.seq_reserved = upto;
        }
        // Shared sessions store partials too: other replicas serve polls from the store.
        let durable = match ev.kind {
            EventKind::End => false,
            EventKind::Partial | EventKind::SpeechStart => self.ctx.shared.is_some(),
            _ => true,
        };
        let appended = self.s.push_event(ev, !durable)?;
        if durable {
            let row = stored(&appended);
            if !self
                .retry_store("persisting an event", || store.append_event(&id, &row))
                .await
            {
                return None;
            }
            self.s.publish(appended.seq);
        }
        Some(appended)
    }

    /// Runs `op` until it succeeds, with backoff (50 ms doubling to 2 s); false when the
    /// session was cancelled or the server began stopping first.
    async fn retry_store<F, Fut>(&self, what: &str, mut op: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut backoff = Duration::from_millis(50);
        loop {
            match op().await {
                Ok(()) => return true,
                Err(StoreError::Fenced) => {
                    tracing::warn!(what, "another replica took the session over; stopping here");
                    self.s.fenced.cancel();
                    return false;
                }
                Err(e) => {
                    tracing::error!(error = %e, cause = ?e, what, ?backoff, "store write failed; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.s.cancel.cancelled() => return false,
                        () = self.ctx.shutdown.cancelled() => return false,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    fn progress(&self, end: Option<EndReason>) -> SessionProgress {
        self.s.progress(end)
    }

    async fn record_end(&mut self, reason: EndReason) {
        let progress = self.progress(Some(reason));
        {
            let mut st = self.s.lock();
            st.status = Status::Ended(reason);
            st.ended_at_ms = Some(progress.at_ms);
        }
        let mut end = Event::new(EventKind::End);
        end.reason = Some(reason);
        end.transcript = Some(progress.transcript.clone());
        end.end_ms = progress.audio_ms;
        end.usage = Some(self.s.usage());
        let Some(end) = self.s.push_event(end, false) else {
            return;
        };
        let id = self.s.id.to_string();
        if let Err(e) = self
            .ctx
            .store
            .end_session(&id, &progress, &stored(&end))
            .await
        {
            tracing::error!(error = %e, cause = ?e, "recording the end of a session failed");
        }
        self.s.publish(end.seq);
        metrics::counter!(crate::metrics::SESSIONS_ENDED, "reason" => reason.status()).increment(1);
        tracing::info!(
            reason = reason.status(),
            audio_ms = progress.audio_ms,
            "session ended"
        );
    }
}

#[path = "worker_shared.rs"]
mod shared;
pub(super) use shared::Shared;

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
