//! The default provider: offline recognition with the embedded whisper.cpp engine.
//!
//! Whisper is not a streaming model, so each stream is pseudo-streamed (shared/embedded-asr.md,
//! "Streaming behaviour"): a VAD cuts utterances; every `partial_interval_ms` of audio the open
//! utterance is re-decoded (greedy) for a partial; at its end it is decoded once more for the
//! final. Each stream is one task on the async runtime that orders its results; its segmenter
//! (VAD) runs on the shared VAD thread ([`crate::audio::vad_pool`]) and its decodes on the
//! engine's shared pool of decode threads, whose answers come back to the task over a channel.
//!
//! Backpressure: a stream holds at most [`MAX_PENDING_FINALS`] finals not yet emitted; past it,
//! its audio waits in the bounded input channel, then in the session (whose buffer answers
//! uploads 429 `backpressure` when full), so one fast uploader cannot fill the shared decode
//! queue ahead of everybody else. A session whose event channel is full holds its stream's
//! task (and so its input) until the session reads again; no thread waits for it.

use super::text::TextOptions;
use super::whisper::{
    hotword_prompt, in_text, DecodeJob, DecodeKind, DecodeReply, Decoded, WhisperEngine,
};
use super::{
    Provider, ProviderError, ProviderEvent, ProviderInput, ProviderStream, Readiness, Recognition,
    StreamOptions,
};
use crate::audio::vad::{Segment, SegmenterConfig};
use crate::audio::vad_pool::StreamSegmenter;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Finals one stream may have submitted and not yet emitted (an early final decode counts as
/// one); audio past them waits.
pub const MAX_PENDING_FINALS: usize = 2;

/// Maps an engine model type to a Whisper language code (`16k_zh` → `zh`, `16k_en` → `en`).
///
/// # Errors
/// Engine types Whisper-base cannot serve.
pub fn language_for_engine(engine: &str) -> Result<&'static str, String> {
    let lang = engine.split_once('_').map_or("", |(_, l)| l);
    let rate_ok = engine.starts_with("16k_") || engine.starts_with("8k_");
    match (rate_ok, lang) {
        (true, "zh" | "zh_en" | "zh-PY" | "zh_medical" | "zh_dialect") => Ok("zh"),
        (true, "en") => Ok("en"),
        (true, "ja") => Ok("ja"),
        (true, "ko") => Ok("ko"),
        (true, "yue") => Ok("zh"),
        _ => Err(format!(
            "engine {engine:?} is not served by the embedded provider; use 16k_zh, 16k_en, 16k_zh_en, 16k_ja, 16k_ko or an 8k_ variant"
        )),
    }
}

/// Settings of the embedded provider.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedSettings {
    /// Audio between partial re-decodes, ms.
    pub partial_interval_ms: u64,
    /// Audio from an utterance's onset to its first partial re-decode, ms.
    pub first_partial_ms: u64,
    /// Default non-speech that ends an utterance, ms.
    pub vad_silence_ms: u64,
    /// Non-speech after which an utterance's final is decoded ahead, to be published when
    /// `vad_silence_ms` confirms the end (or dropped if speech resumes), ms; 0: off.
    pub early_final_ms: u64,
    /// Finals waiting for a decode worker past which `open` answers
    /// [`ProviderError::Busy`].
    pub max_queued_finals: usize,
}

/// The embedded provider: the engine plus its settings.
pub struct EmbeddedProvider {
    engine: Option<Arc<WhisperEngine>>,
    load_error: Option<String>,
    settings: EmbeddedSettings,
}

impl EmbeddedProvider {
    /// Wraps a loaded engine, or records why it could not be loaded (then `/ready` says so and
    /// sessions get 503).
    pub fn new(engine: Result<Arc<WhisperEngine>, String>, settings: EmbeddedSettings) -> Self {
        match engine {
            Ok(e) => Self {
                engine: Some(e),
                load_error: None,
                settings,
            },
            Err(e) => Self {
                engine: None,
                load_error: Some(e),
                settings,
            },
        }
    }

    /// The engine, when loaded.
    pub fn engine(&self) -> Option<&Arc<WhisperEngine>> {
        self.engine.as_ref()
    }
}

impl Provider for EmbeddedProvider {
    fn name(&self) -> &str {
        "embedded"
    }

    fn can_finalize(&self) -> bool {
        true
    }

    fn readiness(&self) -> Readiness {
        match (&self.engine, &self.load_error) {
            (Some(e), _) => Readiness {
                ready: true,
                detail: format!("whisper model {}", e.model_path()),
                stats: Some(e.stats_json()),
            },
            (None, err) => Readiness {
                ready: false,
                detail: err.clone().unwrap_or_default(),
                stats: None,
            },
        }
    }

    fn open(
        &self,
        opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let engine = self.engine.clone().ok_or_else(|| {
            ProviderError::Unavailable(self.load_error.clone().unwrap_or_default())
        })?;
        let lang = language_for_engine(&opts.engine).map_err(ProviderError::Unsupported)?;
        let (queued, _) = engine.queued();
        if queued >= self.settings.max_queued_finals {
            return Err(ProviderError::Busy(format!(
                "the embedded engine is saturated: {queued} finals wait for a decode worker (max_queued_finals {})",
                self.settings.max_queued_finals
            )));
        }
        let cfg = SegmenterConfig {
            silence_ms: opts
                .vad_silence_ms
                .unwrap_or(self.settings.vad_silence_ms)
                .clamp(200, 5000),
            min_voiced_ms: 300,
            partial_interval_ms: if opts.partials {
                self.settings.partial_interval_ms
            } else {
                0
            },
            first_partial_ms: self.settings.first_partial_ms,
            early_final_ms: self.settings.early_final_ms,
        };
        let (input_tx, mut input_rx) = mpsc::channel::<ProviderInput>(64);
        let (events_tx, events_rx) = mpsc::channel::<ProviderEvent>(256);
        let hotwords = opts
            .hotword_list
            .as_deref()
            .and_then(|list| hotword_prompt(list, lang));
        let text = TextOptions::of(opts);
        let word_info = opts.word_info.unwrap_or(0);
        tokio::spawn(
            async move {
                // Until its first input a stream holds only what this future captured: no
                // reply channel, no VAD state (10,000 idle sessions add up).
                let Some(first) = super::next_input(&mut input_rx, &cancel).await else {
                    return;
                };
                let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
                let stream = StreamTask {
                    engine,
                    lang,
                    hotwords,
                    text,
                    word_info,
                    events: events_tx,
                    out: Vec::new(),
                    self_tx: reply_tx,
                    alive: Arc::new(AtomicBool::new(true)),
                    pending_finals: BTreeMap::new(),
                    partial_in_flight: false,
                    partial_stale: Arc::new(AtomicBool::new(false)),
                    open_utterance: 0,
                    finishing: false,
                    credits: MAX_PENDING_FINALS,
                    overdrawn: 0,
                    tentative: None,
                    awaited: BTreeMap::new(),
                    demoted: None,
                    next_tentative: 0,
                };
                let seg = StreamSegmenter::new(cfg);
                stream.run(seg, first, input_rx, reply_rx, cancel).await;
            }
            .in_current_span(),
        );
        Ok(ProviderStream {
            input: input_tx,
            events: events_rx,
        })
    }
}

/// A decode's answer, sent back to its stream's task by a decode thread.
enum Reply {
    Decoded {
        utterance: u32,
        kind: DecodeKind,
        start_ms: u64,
        end_ms: u64,
        result: Result<Decoded, String>,
    },
    /// The decode of a [`Segment::Tentative`], by its id.
    TentativeDecoded {
        id: u64,
        result: Result<Decoded, String>,
    },
}

/// A final decoded ahead of its confirmation ([`Segment::Tentative`]).
struct Tentative {
    id: u64,
    utterance: u32,
    /// The snapshot's stream times, ms.
    start_ms: u64,
    end_ms: u64,
    /// Set when speech resumes: the queued decode is then skipped.
    stale: Arc<AtomicBool>,
    /// The decode's answer, once in.
    result: Option<Result<Decoded, String>>,
}

/// One stream's result ordering: one task on the runtime.
struct StreamTask {
    engine: Arc<WhisperEngine>,
    lang: &'static str,
    /// The session's `hotword_list` as Whisper's prompt.
    hotwords: Option<Arc<str>>,
    /// The session's text options, applied to every result.
    text: TextOptions,
    /// Tencent `word_info`: 0 no words, 1 words without punctuation, 2 with it.
    word_info: u8,
    events: mpsc::Sender<ProviderEvent>,
    /// Events to send, in order, once the current input or reply is handled.
    out: Vec<ProviderEvent>,
    self_tx: mpsc::UnboundedSender<Reply>,
    /// Cleared when the stream ends: its queued decodes are skipped.
    alive: Arc<AtomicBool>,
    /// Finals submitted and not yet emitted, by utterance; `Some` once decoded. Emitted in order.
    pending_finals: BTreeMap<u32, Option<Recognition>>,
    partial_in_flight: bool,
    /// Marks the in-flight partial stale when its utterance ends.
    partial_stale: Arc<AtomicBool>,
    /// Index of the utterance currently open (or next to open).
    open_utterance: u32,
    finishing: bool,
    /// Finals this stream may still submit (see [`MAX_PENDING_FINALS`]): input is read only
    /// while one is free.
    credits: usize,
    /// Finals submitted while no credit was free: repaid before credits are given back.
    overdrawn: usize,
    /// The open utterance's final, decoded ahead during its closing silence.
    tentative: Option<Tentative>,
    /// Confirmed finals whose tentative decode is still running: id → (utterance, start, end).
    awaited: BTreeMap<u64, (u32, u64, u64)>,
    /// A withdrawn tentative whose decode still runs, standing as the partial in flight: its
    /// answer is the sentence's text up to the pause (id, utterance, start, end).
    demoted: Option<(u64, u32, u64, u64)>,
    next_tentative: u64,
}

impl StreamTask {
    /// Handles `first`, then inputs and decode replies until the stream is done.
    async fn run(
        mut self,
        mut seg: StreamSegmenter,
        first: ProviderInput,
        mut input: mpsc::Receiver<ProviderInput>,
        mut replies: mpsc::UnboundedReceiver<Reply>,
        cancel: CancellationToken,
    ) {
        let mut first = Some(first);
        loop {
            let keep_going = if let Some(m) = first.take() {
                self.on_input(&mut seg, m).await
            } else {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => false,
                    // Never `None`: the task holds a sender itself.
                    Some(reply) = replies.recv() => self.on_reply(reply),
                    // Only while the stream has a final to spare: the segmenter may cut a
                    // final from any audio message.
                    m = input.recv(), if self.credits > 0 => match m {
                        Some(m) => self.on_input(&mut seg, m).await,
                        None => false,
                    },
                }
            };
            if !self.flush(&cancel).await || !keep_going {
                break;
            }
        }
        self.alive.store(false, Ordering::Release);
    }

    /// Segments one input and acts on the segments; false once the stream is done.
    async fn on_input(&mut self, seg: &mut StreamSegmenter, m: ProviderInput) -> bool {
        let (op, finish) = m.segmenter_op();
        match seg.run(op).await {
            Ok(segs) => self.handle(segs),
            Err(message) => {
                self.emit(ProviderEvent::Error {
                    code: "provider_unavailable".into(),
                    provider_code: None,
                    message,
                });
                self.emit(ProviderEvent::Done);
                return false;
            }
        }
        if finish {
            self.finishing = true;
            return self.maybe_done();
        }
        true
    }

    fn on_reply(&mut self, reply: Reply) -> bool {
        match reply {
            Reply::Decoded {
                utterance,
                kind,
                start_ms,
                end_ms,
                result,
            } => self.on_decoded(utterance, kind, start_ms, end_ms, result),
            Reply::TentativeDecoded { id, result } => self.on_tentative_decoded(id, result),
        }
        self.maybe_done()
    }

    /// Sends the events the last input or reply produced, in order. A full channel (a session
    /// not reading) holds this task, not a thread. False once the session is gone.
    async fn flush(&mut self, cancel: &CancellationToken) -> bool {
        for ev in std::mem::take(&mut self.out) {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return false,
                sent = self.events.send(ev) => if sent.is_err() { return false },
            }
        }
        true
    }

    fn emit(&mut self, ev: ProviderEvent) {
        self.out.push(ev);
    }

    fn handle(&mut self, segs: Vec<Segment>) {
        for s in segs {
            match s {
                Segment::Start {
                    utterance,
                    start_ms,
                } => {
                    self.emit(ProviderEvent::SpeechStart {
                        sentence: utterance,
                        start_ms,
                    });
                }
                Segment::Tentative {
                    utterance,
                    pcm,
                    start_ms,
                    end_ms,
                } => {
                    // A partial of this sentence is worth less than its final now.
                    self.supersede_partial();
                    self.drop_tentative();
                    // A decode in the queue like a final: it takes a credit too, so a stream
                    // uploading faster than real time does not get more than its share.
                    self.take_credit();
                    let id = self.next_tentative;
                    self.next_tentative += 1;
                    let stale = Arc::new(AtomicBool::new(false));
                    let tx = self.self_tx.clone();
                    self.submit_job(
                        &pcm,
                        DecodeKind::Final,
                        Some(Arc::clone(&stale)),
                        Box::new(move |result| {
                            let _ = tx.send(Reply::TentativeDecoded { id, result });
                        }),
                    );
                    self.tentative = Some(Tentative {
                        id,
                        utterance,
                        start_ms,
                        end_ms,
                        stale,
                        result: None,
                    });
                }
                Segment::Resumed { .. } => self.demote_tentative(),
                Segment::Partial {
                    utterance,
                    pcm,
                    start_ms,
                    end_ms,
                } => {
                    self.open_utterance = utterance;
                    if !self.partial_in_flight {
                        self.partial_in_flight = true;
                        self.submit(utterance, DecodeKind::Partial, pcm, start_ms, end_ms);
                    }
                }
                Segment::Final {
                    utterance,
                    pcm,
                    start_ms,
                    end_ms,
                    tentative_holds,
                } => {
                    self.supersede_partial();
                    self.open_utterance = utterance + 1;
                    self.pending_finals.insert(utterance, None);
                    match self.tentative.take() {
                        // Its credit, taken by the tentative decode, stays with the final.
                        Some(t) if tentative_holds && t.utterance == utterance => {
                            self.engine
                                .stats
                                .finals_early
                                .fetch_add(1, Ordering::Relaxed);
                            match t.result {
                                Some(result) => self.on_decoded(
                                    utterance,
                                    DecodeKind::Final,
                                    start_ms,
                                    end_ms,
                                    result,
                                ),
                                None => {
                                    self.awaited.insert(t.id, (utterance, start_ms, end_ms));
                                }
                            }
                        }
                        other => {
                            self.tentative = other;
                            self.drop_tentative();
                            self.take_credit();
                            self.submit(utterance, DecodeKind::Final, pcm, start_ms, end_ms);
                        }
                    }
                }
            }
        }
    }

    /// Takes a credit for a decode this stream submits. The task reads audio only while
    /// a credit is free, but one message may cut several finals: past the cap the debt is
    /// remembered instead.
    fn take_credit(&mut self) {
        if self.credits == 0 {
            self.overdrawn += 1;
        } else {
            self.credits -= 1;
        }
    }

    /// Gives a credit back (a final emitted, a tentative withdrawn), repaying debt first.
    fn give_credit(&mut self) {
        if self.overdrawn > 0 {
            self.overdrawn -= 1;
        } else {
            self.credits += 1;
        }
    }

    /// Takes the open utterance's tentative final out, as withdrawn: its credit comes back.
    fn withdraw_tentative(&mut self) -> Option<Tentative> {
        let t = self.tentative.take()?;
        self.give_credit();
        self.engine
            .stats
            .early_discarded
            .fetch_add(1, Ordering::Relaxed);
        Some(t)
    }

    /// Withdraws the open utterance's tentative final: its decode is skipped if still queued,
    /// aborted if running, its answer ignored; its credit comes back.
    fn drop_tentative(&mut self) {
        if let Some(t) = self.withdraw_tentative() {
            t.stale.store(true, Ordering::Release);
        }
    }

    /// Speech resumed after a pause: the tentative final will not be the final, but its decode
    /// is the sentence so far, i.e. a partial. Decoded already: it was published as one; still
    /// running: it stands as the partial in flight (superseded like one). Its credit comes back.
    /// A tentative's decode supersedes the partial in flight, so without this a client would
    /// see no text at all for a sentence with pauses until its final.
    fn demote_tentative(&mut self) {
        // Decoded already: it was published as a partial then.
        if let Some(t) = self.withdraw_tentative().filter(|t| t.result.is_none()) {
            self.partial_in_flight = true;
            self.partial_stale = t.stale;
            self.demoted = Some((t.id, t.utterance, t.start_ms, t.end_ms));
        }
    }

    /// A tentative decode answered: it is the final if that was confirmed meanwhile, a partial
    /// now and kept as the final-to-be if the utterance is still in its closing silence, a
    /// partial if it was demoted, ignored if withdrawn.
    fn on_tentative_decoded(&mut self, id: u64, result: Result<Decoded, String>) {
        if let Some((utterance, start_ms, end_ms)) = self.awaited.remove(&id) {
            return self.on_decoded(utterance, DecodeKind::Final, start_ms, end_ms, result);
        }
        if let Some((_, utterance, start_ms, end_ms)) =
            self.demoted.take_if(|(demoted, ..)| *demoted == id)
        {
            return self.on_decoded(utterance, DecodeKind::Partial, start_ms, end_ms, result);
        }
        let Some(t) = self.tentative.as_mut().filter(|t| t.id == id) else {
            return;
        };
        // The sentence up to its pause, decoded: the client sees it now as a partial (the
        // final repeats it once the silence is confirmed). It supersedes the partial in
        // flight, so without this a sentence cut by pauses shows nothing until its final, and
        // an upload that stops inside a pause shows nothing at all.
        let decoded = result.as_ref().ok().cloned();
        t.result = Some(result);
        let (utterance, start_ms, end_ms) = (t.utterance, t.start_ms, t.end_ms);
        if let Some(rec) = decoded.map(|d| self.recognition(utterance, start_ms, end_ms, d)) {
            if !rec.text.is_empty() {
                self.emit(ProviderEvent::Partial(rec));
            }
        }
    }

    /// Marks the in-flight partial stale (skipped if queued, aborted if running); the next
    /// partial gets a fresh flag.
    fn supersede_partial(&mut self) {
        self.partial_stale.store(true, Ordering::Release);
        self.partial_stale = Arc::new(AtomicBool::new(false));
    }

    fn submit(&self, utterance: u32, kind: DecodeKind, pcm: Vec<i16>, start_ms: u64, end_ms: u64) {
        let tx = self.self_tx.clone();
        let stale = (kind == DecodeKind::Partial).then(|| Arc::clone(&self.partial_stale));
        self.submit_job(
            &pcm,
            kind,
            stale,
            Box::new(move |result| {
                let _ = tx.send(Reply::Decoded {
                    utterance,
                    kind,
                    start_ms,
                    end_ms,
                    result,
                });
            }),
        );
    }

    /// Queues a decode of `pcm` for this stream.
    fn submit_job(
        &self,
        pcm: &[i16],
        kind: DecodeKind,
        stale: Option<Arc<AtomicBool>>,
        reply: DecodeReply,
    ) {
        self.engine.submit(DecodeJob {
            pcm: pcm.iter().map(|&s| f32::from(s) / 32768.0).collect(),
            lang: self.lang,
            kind,
            words: self.word_info > 0,
            hotwords: self.hotwords.clone(),
            alive: Arc::clone(&self.alive),
            stale,
            reply,
        });
    }

    fn on_decoded(
        &mut self,
        utterance: u32,
        kind: DecodeKind,
        start_ms: u64,
        end_ms: u64,
        result: Result<Decoded, String>,
    ) {
        let result = result.map(|d| self.recognition(utterance, start_ms, end_ms, d));
        match kind {
            DecodeKind::Partial => {
                self.partial_in_flight = false;
                let current = utterance == self.open_utterance
                    && !self.pending_finals.contains_key(&utterance);
                if let Some(rec) = result.ok().filter(|rec| current && !rec.text.is_empty()) {
                    self.emit(ProviderEvent::Partial(rec));
                }
            }
            DecodeKind::Final => {
                let rec = match result {
                    Ok(rec) => rec,
                    Err(e) => {
                        self.emit(ProviderEvent::Warning {
                            code: "decode_failed".into(),
                            message: e,
                        });
                        Recognition {
                            sentence: utterance,
                            text: String::new(),
                            start_ms,
                            end_ms,
                            words: None,
                        }
                    }
                };
                self.pending_finals.insert(utterance, Some(rec));
                // Emit decoded finals in utterance order.
                while let Some(entry) = self.pending_finals.first_entry() {
                    if entry.get().is_none() {
                        break;
                    }
                    let Some(rec) = entry.remove() else { break };
                    self.emit(ProviderEvent::Final(rec));
                    self.give_credit();
                }
            }
        }
    }

    /// A decode of `utterance` (stream times `start_ms..end_ms`) as a result: the session's
    /// text options applied, and with `word_info` its words (those still in the text; without
    /// punctuation at 1) in stream time.
    fn recognition(&self, utterance: u32, start_ms: u64, end_ms: u64, d: Decoded) -> Recognition {
        let text = self.text.apply(&d.text, self.lang);
        let words = d.words.filter(|_| self.word_info > 0).map(|words| {
            let words = words
                .into_iter()
                .filter(|w| self.word_info >= 2 || w.word.chars().any(char::is_alphanumeric));
            let mut words = in_text(words.collect(), &text);
            for w in &mut words {
                if self.word_info < 2 {
                    w.word = w
                        .word
                        .trim_matches(|c: char| !c.is_alphanumeric())
                        .to_string();
                }
                w.start_ms += start_ms;
                w.end_ms += start_ms;
            }
            words
        });
        Recognition {
            sentence: utterance,
            text,
            start_ms,
            end_ms,
            words,
        }
    }

    /// After Finish, once every final is out: Done, and false (the task ends).
    fn maybe_done(&mut self) -> bool {
        if self.finishing && self.pending_finals.is_empty() {
            self.emit(ProviderEvent::Done);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_types_map_to_languages() {
        assert_eq!(language_for_engine("16k_zh"), Ok("zh"));
        assert_eq!(language_for_engine("16k_en"), Ok("en"));
        assert_eq!(language_for_engine("8k_zh"), Ok("zh"));
        assert_eq!(language_for_engine("16k_zh_en"), Ok("zh"));
        assert!(language_for_engine("16k_xx").is_err());
        assert!(language_for_engine("zh").is_err());
    }
}
