//! The embedded whisper.cpp engine (crate `whisper-rs`): one loaded model shared by every
//! session, and a bounded pool of decode workers so sessions queue instead of oversubscribing
//! the CPU. Finals are always served before partials; a partial whose utterance has ended
//! (or whose stream is gone) is skipped. Decode settings follow shared/embedded-asr.md
//! ("Decoding settings that worked"), with two changes measured on 2 slow cores (whisper-base,
//! release): a partial decodes over its own length of `audio_ctx` (no 10 s floor: a 1 s partial
//! costs 0.7 s instead of 4.9 s) and has its repetition loops cut ([`cut_repetition`]); and a
//! decode running while other workers idle borrows their cores.

use super::Word;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

/// Initial prompt for Mandarin: steers Whisper towards Simplified script and punctuation.
const ZH_PROMPT: &str = "以下是普通话的句子。";

/// Least audio a final's encoder window covers, s. shared/embedded-asr.md found Whisper looping
/// below a 10 s floor; with [`cut_repetition`] on finals too, 6 s gives the same transcripts on
/// the test corpora (zh CER 5.8 %, en WER 1.4 %) at 320 instead of 512 encoder frames (a 3 s
/// final: 0.8 s instead of 1.2 s on 2 cores); 4 s loses two characters in 69.
const FINAL_FLOOR_S: f32 = 6.0;

/// Kind of decode; finals have priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeKind {
    /// A snapshot of an open utterance: may be skipped under load.
    Partial,
    /// A finished utterance: never skipped while its stream lives.
    Final,
}

/// A decode's answer: its text (cleaned, loops cut) and, when the job asked for them, its
/// words with their times in the decoded audio (ms from its first sample).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The text.
    pub text: String,
    /// Words (Mandarin: characters), punctuation included, each found in `text` in order.
    pub words: Option<Vec<Word>>,
}

/// The callback a decode job answers through: `Ok(decoded)`, or `Err(reason)` if skipped or
/// failed.
pub type DecodeReply = Box<dyn FnOnce(Result<Decoded, String>) + Send>;

/// One decode request.
pub struct DecodeJob {
    /// 16 kHz mono samples in [-1, 1].
    pub pcm: Vec<f32>,
    /// Whisper language code (`zh`, `en`, ...).
    pub lang: &'static str,
    /// Priority class.
    pub kind: DecodeKind,
    /// Also give the words with their times (Tencent `word_info`).
    pub words: bool,
    /// Hot words the decode is steered towards (Whisper's initial prompt after the language's
    /// own; see [`hotword_prompt`]), or `None`.
    pub hotwords: Option<Arc<str>>,
    /// Cleared when the stream ends or is cancelled: the job is then skipped.
    pub alive: Arc<AtomicBool>,
    /// Set when a newer result supersedes this one (partials only): the job is then skipped.
    pub stale: Option<Arc<AtomicBool>>,
    /// Called exactly once.
    pub reply: DecodeReply,
}

#[derive(Default)]
struct Queues {
    finals: VecDeque<DecodeJob>,
    partials: VecDeque<DecodeJob>,
}

/// Decode statistics since start, for `/metrics` and `scripts/bench`.
#[derive(Debug, Default)]
pub struct DecodeStats {
    /// Decodes run, by kind.
    pub partials: AtomicU64,
    /// Final decodes run.
    pub finals: AtomicU64,
    /// Partial jobs skipped because they were stale or their stream was gone.
    pub partials_skipped: AtomicU64,
    /// Audio decoded, ms (sum over decodes).
    pub audio_ms: AtomicU64,
    /// Wall time spent decoding, ms (sum over workers).
    pub busy_ms: AtomicU64,
    /// Finals published from a decode started early, during their closing silence.
    pub finals_early: AtomicU64,
    /// Early final decodes withdrawn because speech resumed (wasted work).
    pub early_discarded: AtomicU64,
}

/// The loaded model plus its decode workers.
pub struct WhisperEngine {
    shared: Arc<(Mutex<Queues>, Condvar)>,
    /// Counters for metrics and the benchmark.
    pub stats: Arc<DecodeStats>,
    model_path: String,
}

impl WhisperEngine {
    /// Loads the ggml model at `path` and starts `workers` decode threads, each holding its own
    /// whisper state and decoding with at least `threads` CPU threads: with `b` workers busy, a
    /// decode takes `max(threads, cpus / b)` threads (cpus = the machine's available parallelism).
    ///
    /// # Errors
    /// Missing or unreadable model, or a state that cannot be allocated.
    pub fn load(path: &Path, workers: usize, threads: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(
            path.is_file(),
            "model file {} not found: run scripts/setup (or set VOXPOLL_MODEL)",
            path.display()
        );
        whisper_rs::install_logging_hooks();
        let started = Instant::now();
        let ctx = WhisperContext::new_with_params(path, WhisperContextParameters::default())
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        let ctx = Arc::new(ctx);
        let aligner = Arc::new(Aligner {
            path: path.to_path_buf(),
            ctx: OnceLock::new(),
        });
        let shared = Arc::new((Mutex::new(Queues::default()), Condvar::new()));
        let stats = Arc::new(DecodeStats::default());
        let pool = Arc::new(ThreadBudget {
            min: threads.max(1),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            busy: AtomicUsize::new(0),
        });
        for i in 0..workers {
            let state = ctx
                .create_state()
                .map_err(|e| anyhow::anyhow!("whisper state: {e}"))?;
            let shared = Arc::clone(&shared);
            let stats = Arc::clone(&stats);
            let ctx = Arc::clone(&ctx);
            let pool = Arc::clone(&pool);
            let aligner = Arc::clone(&aligner);
            std::thread::Builder::new()
                .name(format!("decode-{i}"))
                .spawn(move || {
                    let _model = ctx; // the context must outlive its states
                    worker_loop(state, &shared, &stats, &pool, &aligner);
                })?;
        }
        tracing::info!(model = %path.display(), workers, threads, load_ms = started.elapsed().as_millis() as u64, "whisper model loaded");
        Ok(Self {
            shared,
            stats,
            model_path: path.display().to_string(),
        })
    }

    /// Path of the loaded model.
    pub fn model_path(&self) -> &str {
        &self.model_path
    }

    /// Queues a job. Finals go before every queued partial.
    pub fn submit(&self, job: DecodeJob) {
        let (lock, cv) = &*self.shared;
        let mut q = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match job.kind {
            DecodeKind::Final => q.finals.push_back(job),
            DecodeKind::Partial => q.partials.push_back(job),
        }
        cv.notify_one();
    }

    /// Counters as JSON: decodes by kind, skipped partials, early finals used and withdrawn,
    /// audio decoded and busy time (ms), the engine RTF (busy / audio) and the queue depth.
    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        let (audio, busy) = (
            s.audio_ms.load(Ordering::Relaxed),
            s.busy_ms.load(Ordering::Relaxed),
        );
        let (qf, qp) = self.queued();
        serde_json::json!({
            "decodes_partial": s.partials.load(Ordering::Relaxed),
            "decodes_final": s.finals.load(Ordering::Relaxed),
            "partials_skipped": s.partials_skipped.load(Ordering::Relaxed),
            "finals_early": s.finals_early.load(Ordering::Relaxed),
            "early_discarded": s.early_discarded.load(Ordering::Relaxed),
            "audio_decoded_ms": audio,
            "decode_busy_ms": busy,
            "rtf": if audio > 0 { busy as f64 / audio as f64 } else { 0.0 },
            "queued_finals": qf,
            "queued_partials": qp,
        })
    }

    /// Jobs waiting for a worker: (finals, partials).
    pub fn queued(&self) -> (usize, usize) {
        let q = self
            .shared
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (q.finals.len(), q.partials.len())
    }
}

/// CPU threads for the decodes running now: cores idle workers leave are lent to busy ones.
struct ThreadBudget {
    /// Threads a decode always gets (`--decode-threads`).
    min: usize,
    /// The machine's available parallelism.
    cpus: usize,
    /// Workers decoding now.
    busy: AtomicUsize,
}

impl ThreadBudget {
    /// Marks one more worker busy and returns its thread count.
    fn start(&self) -> usize {
        let busy = self.busy.fetch_add(1, Ordering::AcqRel) + 1;
        threads_for(self.min, self.cpus, busy)
    }

    fn end(&self) {
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Threads for one decode with `busy` workers decoding (itself included): at least `min`,
/// else an even share of `cpus`.
fn threads_for(min: usize, cpus: usize, busy: usize) -> usize {
    min.max(cpus / busy.max(1))
}

/// The model loaded a second time with token alignment (DTW over Whisper-base's alignment
/// heads, whisper.cpp's `dtw_token_timestamps`), for decodes that want word times
/// (`word_info`). Loaded at the first such decode: alignment costs every decode of a context
/// about 8 % (measured: 6 Mandarin fixtures × 3, release, 2 cores), which sessions without
/// `word_info` should not pay. whisper.cpp's other token times (from timestamp tokens) were
/// measured wrong here: every character at the sentence's start or end.
struct Aligner {
    path: std::path::PathBuf,
    ctx: OnceLock<Result<Arc<WhisperContext>, String>>,
}

impl Aligner {
    /// A new decode state of the aligning context (loading it once).
    fn state(&self) -> Result<(Arc<WhisperContext>, WhisperState), String> {
        let ctx = self.ctx.get_or_init(|| {
            let mut params = WhisperContextParameters::default();
            params.dtw_parameters(whisper_rs::DtwParameters {
                mode: whisper_rs::DtwMode::ModelPreset {
                    model_preset: whisper_rs::DtwModelPreset::Base,
                },
                dtw_mem_size: 128 * 1024 * 1024,
            });
            WhisperContext::new_with_params(&self.path, params)
                .map(Arc::new)
                .map_err(|e| format!("loading the aligning model: {e}"))
        });
        let ctx = ctx.clone()?;
        let state = ctx.create_state().map_err(|e| e.to_string())?;
        Ok((ctx, state))
    }
}

fn worker_loop(
    mut state: WhisperState,
    shared: &(Mutex<Queues>, Condvar),
    stats: &DecodeStats,
    pool: &ThreadBudget,
    aligner: &Aligner,
) {
    // This worker's state of the aligning context, once a decode wanted words.
    let mut aligning: Option<(Arc<WhisperContext>, WhisperState)> = None;
    let (lock, cv) = shared;
    loop {
        let job = {
            let mut q = lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            loop {
                if let Some(j) = q.finals.pop_front() {
                    break j;
                }
                if let Some(j) = q.partials.pop_front() {
                    break j;
                }
                q = cv
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        if unwanted(&job.alive, job.stale.as_deref()) {
            if job.kind == DecodeKind::Partial {
                stats.partials_skipped.fetch_add(1, Ordering::Relaxed);
            }
            (job.reply)(Err("skipped".into()));
            continue;
        }
        let started = Instant::now();
        let threads = pool.start();
        if job.words && aligning.is_none() {
            match aligner.state() {
                Ok(pair) => aligning = Some(pair),
                Err(e) => tracing::warn!(error = %e, "word times unavailable"),
            }
        }
        let result = match aligning.as_mut().filter(|_| job.words) {
            Some((_, aligned)) => decode(aligned, &job, threads),
            // No aligning context: the text without words.
            None => decode(&mut state, &job, threads).map(|d| Decoded { words: None, ..d }),
        };
        pool.end();
        let took = started.elapsed();
        if !job.pcm.is_empty() {
            let audio_s = job.pcm.len() as f64 / 16_000.0;
            let kind = match job.kind {
                DecodeKind::Partial => "partial",
                DecodeKind::Final => "final",
            };
            metrics::histogram!(crate::metrics::ENGINE_RTF, "kind" => kind)
                .record(took.as_secs_f64() / audio_s);
        }
        stats
            .busy_ms
            .fetch_add(took.as_millis() as u64, Ordering::Relaxed);
        stats
            .audio_ms
            .fetch_add(job.pcm.len() as u64 / 16, Ordering::Relaxed);
        match job.kind {
            DecodeKind::Partial => stats.partials.fetch_add(1, Ordering::Relaxed),
            DecodeKind::Final => stats.finals.fetch_add(1, Ordering::Relaxed),
        };
        (job.reply)(result);
    }
}

/// `audio_ctx` (encoder frames of 20 ms) for `secs` of audio: (secs + 1) × 50 frames, rounded
/// up to 64, at most 1500. Finals have a [`FINAL_FLOOR_S`] floor; partials have none: their
/// encoder cost scales with their length. Both have their loops cut by [`cut_repetition`].
pub fn audio_ctx_for(secs: f32, kind: DecodeKind) -> i32 {
    let floor = match kind {
        DecodeKind::Final => FINAL_FLOOR_S,
        DecodeKind::Partial => 0.0,
    };
    let frames = ((secs + 1.0).max(floor) * 50.0).ceil() as i32;
    ((frames + 63) / 64 * 64).min(1500)
}

/// Cuts a repetition loop at the end of a text: when the text ends in copies of one unit
/// (the last copy may be cut short) — at least 3 copies, or 2 of a unit of 8 characters or
/// more — only the text up to the end of the first copy is kept. Short legitimate repeats
/// ("谢谢", "haha", "谢谢你谢谢你") are left alone. Looping decodes seen on whisper-base with a
/// short `audio_ctx`: "今天今天今天…", "He was not. He was not. He was not. He",
/// "Had he married …still? Had he married …still?".
pub fn cut_repetition(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let n = c.len();
    for p in 2..=n.div_ceil(2) {
        // Trailing chars equal to the char one unit earlier.
        let run = (p..n).rev().take_while(|&i| c[i] == c[i - p]).count();
        let span = run + p; // chars covered by the periodic tail
        let copies = span / p;
        if run + 1 >= p && (copies >= 3 || (p >= 8 && span + 1 >= 2 * p)) {
            let kept: String = c[..n - run].iter().collect();
            return kept.trim().to_string();
        }
    }
    text.to_string()
}

/// A running job's `alive` and `stale` flags.
type JobFlags = (Arc<AtomicBool>, Option<Arc<AtomicBool>>);

thread_local! {
    /// The flags of the job decoding on this thread, for [`abort_requested`].
    static ABORT_ON: std::cell::RefCell<Option<JobFlags>> = const { std::cell::RefCell::new(None) };
}

/// Whether the decode running on this thread should stop: its stream is gone or its result
/// superseded.
fn abort_requested() -> bool {
    ABORT_ON.with(|a| {
        a.borrow()
            .as_ref()
            .is_some_and(|(alive, stale)| unwanted(alive, stale.as_deref()))
    })
}

/// A job's result is no longer wanted: its stream is gone, or a newer result supersedes it.
fn unwanted(alive: &AtomicBool, stale: Option<&AtomicBool>) -> bool {
    !alive.load(Ordering::Acquire) || stale.is_some_and(|s| s.load(Ordering::Acquire))
}

/// Runs one job. A job whose stream ends, or that turns stale while it runs (a partial whose
/// sentence ended, an early final withdrawn), is aborted between two steps of the model: its
/// core goes to the decode that replaces it.
fn decode(state: &mut WhisperState, job: &DecodeJob, threads: usize) -> Result<Decoded, String> {
    let (pcm, lang, kind) = (&job.pcm[..], job.lang, job.kind);
    // whisper.cpp ignores input shorter than 1 s; pad with silence.
    let mut padded;
    let pcm = if pcm.len() < 17_000 {
        padded = pcm.to_vec();
        padded.resize(17_000, 0.0);
        &padded[..]
    } else {
        pcm
    };
    let secs = pcm.len() as f32 / 16_000.0;
    let mut p = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
    p.set_n_threads(threads as i32);
    p.set_language(Some(lang));
    p.set_no_context(true);
    p.set_single_segment(true);
    // Token times need the timestamp tokens decoded (word_info only: they cost a little).
    p.set_no_timestamps(true);
    p.set_print_special(false);
    p.set_print_progress(false);
    p.set_print_realtime(false);
    p.set_print_timestamps(false);
    p.set_max_tokens((8.0 * secs) as i32 + 8);
    p.set_audio_ctx(audio_ctx_for(secs, kind));
    if kind == DecodeKind::Partial {
        p.set_temperature_inc(0.0);
    }
    let prompt = initial_prompt(lang, job.hotwords.as_deref());
    if !prompt.is_empty() {
        p.set_initial_prompt(&prompt);
    }
    // whisper-rs 0.16's `set_abort_callback_safe` hands whisper.cpp a pointer to a boxed
    // `dyn FnMut` but calls it as the closure's own type, so only a closure without captures
    // is called correctly: it reads the job from this thread (ggml checks the callback on the
    // thread that called `full`, its compute thread 0).
    ABORT_ON.with(|a| *a.borrow_mut() = Some((Arc::clone(&job.alive), job.stale.clone())));
    p.set_abort_callback_safe(abort_requested);
    let done = state.full(p, pcm);
    ABORT_ON.with(|a| a.borrow_mut().take());
    done.map_err(|e| format!("whisper decode failed: {e}"))?;
    let mut text = String::new();
    let mut tokens = Vec::new();
    for seg in state.as_iter() {
        text.push_str(&seg.to_str_lossy().map_err(|e| e.to_string())?);
        if job.words {
            for i in 0..seg.n_tokens() {
                let Some(t) = seg.get_token(i) else { continue };
                let d = t.token_data();
                if let Ok(bytes) = t.to_bytes() {
                    tokens.push(Token {
                        bytes: bytes.to_vec(),
                        at: d.t_dtw,
                    });
                }
            }
        }
    }
    let mut text = clean_text(&text, lang);
    if let Some(words) = job.hotwords.as_deref() {
        // The prompt leaked: Whisper repeats it over silence.
        let bare = text.trim_end_matches(['。', '.']);
        if bare == words || bare == prompt.trim_end_matches(['。', '.']) {
            text.clear();
        }
    }
    let text = cut_repetition(&text);
    let words = job
        .words
        .then(|| in_text(words_of(&tokens, lang, pcm.len()), &text));
    Ok(Decoded { text, words })
}

/// One decoded token: its bytes (a token may end inside a UTF-8 character) and where the
/// decoder's attention aligned it with the audio (DTW over the alignment heads, `t_dtw`), in
/// whisper.cpp's 10 ms units (-1: none).
struct Token {
    bytes: Vec<u8>,
    at: i64,
}

/// Longest a sentence's last word is taken to last past its aligned start, ms.
const LAST_WORD_MS: u64 = 400;

/// The words of a decode from its tokens: Mandarin one per character (Simplified), other
/// languages split where a token starts with a space. Special tokens (`[_BEG_]`, `<|...|>`)
/// are skipped. A word starts where its first token is aligned (never before the word ahead
/// of it) and ends where the next word starts (the last one [`LAST_WORD_MS`] later); times are
/// clamped to the decoded audio (`samples` at 16 kHz), ms.
fn words_of(tokens: &[Token], lang: &str, samples: usize) -> Vec<Word> {
    let max_ms = (samples / 16) as u64;
    let ms = |t: i64| (u64::try_from(t).unwrap_or(0) * 10).min(max_ms);
    let mut words: Vec<Word> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_at = 0;
    for t in tokens {
        if t.bytes.starts_with(b"[_") || t.bytes.starts_with(b"<|") {
            continue;
        }
        if pending.is_empty() {
            pending_at = t.at;
        }
        pending.extend_from_slice(&t.bytes);
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        if valid == 0 {
            continue;
        }
        let piece = String::from_utf8_lossy(&pending[..valid]).into_owned();
        pending.drain(..valid);
        let start = ms(pending_at);
        if lang == "zh" {
            for c in fast2s::convert(&piece)
                .chars()
                .filter(|c| !c.is_whitespace())
            {
                words.push(Word {
                    word: c.to_string(),
                    start_ms: start,
                    end_ms: start,
                });
            }
        } else {
            let starts_word = piece.starts_with(' ') || words.is_empty();
            let piece = piece.trim();
            match words.last_mut() {
                Some(w) if !starts_word => w.word.push_str(piece),
                _ if !piece.is_empty() => words.push(Word {
                    word: piece.to_string(),
                    start_ms: start,
                    end_ms: start,
                }),
                _ => {}
            }
        }
        pending_at = t.at;
    }
    // Aligned times only grow; a word ends where the next one starts.
    for i in 1..words.len() {
        words[i].start_ms = words[i].start_ms.max(words[i - 1].start_ms);
    }
    for i in 0..words.len() {
        words[i].end_ms = match words.get(i + 1) {
            Some(next) => next.start_ms,
            None => (words[i].start_ms + LAST_WORD_MS).min(max_ms),
        };
    }
    words
}

/// The words found in `text` in order (each after the previous one); the others (tags
/// [`clean_text`] dropped, a loop [`cut_repetition`] cut, text options that rewrote them) go.
pub fn in_text(words: Vec<Word>, text: &str) -> Vec<Word> {
    let mut at = 0;
    words
        .into_iter()
        .filter(|w| match text[at..].find(&w.word) {
            Some(i) if !w.word.is_empty() => {
                at += i + w.word.len();
                true
            }
            _ => false,
        })
        .collect()
}

/// Longest hot-word prompt, characters: Whisper keeps at most half its 448-token text context
/// for the prompt, and a long prompt slows every decode.
pub const MAX_HOTWORD_PROMPT_CHARS: usize = 120;

/// Whisper's initial prompt for a Tencent `hotword_list` ("word|weight,word|weight", already
/// validated): its words, heaviest first, joined by the language's list mark, up to
/// [`MAX_HOTWORD_PROMPT_CHARS`]. Whisper has no hot-word biasing of its own; a prompt that names
/// the words makes the decoder prefer them (their spelling, their script). `None` when there
/// are no words.
pub fn hotword_prompt(list: &str, lang: &str) -> Option<Arc<str>> {
    let mut words: Vec<(u32, &str)> = list
        .split(',')
        .filter_map(|item| {
            let (word, weight) = item.split_once('|').unwrap_or((item, "10"));
            let word = word.trim();
            (!word.is_empty()).then(|| (weight.trim().parse().unwrap_or(10), word))
        })
        .collect();
    words.sort_by_key(|w| std::cmp::Reverse(w.0));
    let sep = if lang == "zh" { "、" } else { ", " };
    let mut prompt = String::new();
    for (_, word) in words {
        if prompt.chars().count() + word.chars().count() + 2 > MAX_HOTWORD_PROMPT_CHARS {
            break;
        }
        if !prompt.is_empty() {
            prompt.push_str(sep);
        }
        prompt.push_str(word);
    }
    (!prompt.is_empty()).then(|| Arc::from(prompt.as_str()))
}

/// The initial prompt of a decode: the language's own (Mandarin: [`ZH_PROMPT`]) then the hot
/// words, if any.
fn initial_prompt(lang: &str, hotwords: Option<&str>) -> String {
    let mut prompt = if lang == "zh" {
        ZH_PROMPT.to_string()
    } else {
        String::new()
    };
    if let Some(words) = hotwords {
        prompt.push_str(words);
        prompt.push(if lang == "zh" { '。' } else { '.' });
    }
    prompt
}

/// Whether a Mandarin decode is the prompt said back, exactly or nearly: over the first half
/// second of a sentence whisper-base answers "您是普通话的句子。" for [`ZH_PROMPT`] (measured
/// by `scripts/bench`: two of twelve first partials), which a client would show and then see
/// erased. Within 3 characters of the prompt (punctuation ignored) counts.
fn echoes_prompt(text: &str) -> bool {
    let bare = |s: &str| -> Vec<char> { s.chars().filter(|c| c.is_alphanumeric()).collect() };
    let (a, b) = (bare(text), bare(ZH_PROMPT));
    if a.is_empty() || a.len().abs_diff(b.len()) > 3 {
        return false;
    }
    // Levenshtein distance, one row at a time.
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push(
                (prev[j] + usize::from(ca != cb))
                    .min(prev[j + 1] + 1)
                    .min(cur[j] + 1),
            );
        }
        prev = cur;
    }
    prev[b.len()] <= 3
}

/// Post-processing of Whisper's text: trims, drops bracketed non-speech tags ("[Music]",
/// "(音乐)") and a leaked prompt, and converts Traditional to Simplified for Chinese.
pub fn clean_text(raw: &str, lang: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut depth = 0usize;
    for ch in raw.chars() {
        match ch {
            '[' | '(' | '（' | '【' => depth += 1,
            ']' | ')' | '）' | '】' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(ch),
            _ => {}
        }
    }
    let mut text = out.trim().to_string();
    if lang == "zh" {
        text = fast2s::convert(&text);
        if echoes_prompt(&text) {
            text.clear();
        }
    } else {
        text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    if text.chars().all(|c| !c.is_alphanumeric()) {
        text.clear();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audio_ctx_has_a_six_second_floor_for_finals_and_a_cap() {
        use DecodeKind::{Final, Partial};
        assert_eq!(audio_ctx_for(1.0, Final), 320); // 6 s floor: 300 frames → 320
        assert_eq!(audio_ctx_for(1.0, Partial), 128); // 2 s: 100 frames → 128
        assert_eq!(audio_ctx_for(4.0, Partial), 256);
        assert_eq!(audio_ctx_for(12.0, Final), 704); // 13 × 50 = 650 → 704
        assert_eq!(audio_ctx_for(12.0, Partial), 704);
        assert_eq!(audio_ctx_for(40.0, Final), 1500);
    }

    #[test]
    fn repetition_loops_are_cut_to_their_first_copy() {
        // Decodes seen from whisper-base over a 1 s and a 4 s partial.
        assert_eq!(cut_repetition("今天今天今天今天今天今天今天"), "今天");
        assert_eq!(cut_repetition("请帮我请帮我请帮我请帮我请"), "请帮我");
        assert_eq!(
            cut_repetition("He was not. He was not. He was not. He was not. He"),
            "He was not."
        );
        assert_eq!(
            cut_repetition("Mr. John, Mr. John, Mr. John, Mr. John, Mr"),
            "Mr. John,"
        );
        let twice =
            "Had he married a woman he might be still? Had he married a woman he might be still?";
        assert_eq!(
            cut_repetition(twice),
            "Had he married a woman he might be still?"
        );
        // Short or legitimate repeats stay.
        for keep in [
            "谢谢",
            "haha",
            "谢谢你谢谢你",
            "bye bye",
            "Unless to be rather cold-hearted.",
            "",
            "ab",
        ] {
            assert_eq!(cut_repetition(keep), keep);
        }
    }

    #[test]
    fn idle_cores_are_lent_to_busy_decodes() {
        assert_eq!(threads_for(1, 2, 1), 2);
        assert_eq!(threads_for(1, 2, 2), 1);
        assert_eq!(threads_for(1, 2, 3), 1);
        assert_eq!(threads_for(3, 2, 1), 3);
        assert_eq!(threads_for(1, 8, 3), 2);
    }

    fn tok(s: &[u8], at: i64) -> Token {
        Token {
            bytes: s.to_vec(),
            at,
        }
    }

    #[test]
    fn tokens_become_characters_or_words_with_times() {
        // "今天" where 天's three bytes come in two tokens; a special token; a comma.
        let tian = "天".as_bytes();
        let zh = [
            tok(b"[_BEG_]", 0),
            tok("今".as_bytes(), 10),
            tok(&tian[..1], 40),
            tok(&tian[1..], 50),
            tok("，".as_bytes(), 70),
        ];
        let w = words_of(&zh, "zh", 16_000);
        let got: Vec<(&str, u64, u64)> = w
            .iter()
            .map(|w| (w.word.as_str(), w.start_ms, w.end_ms))
            .collect();
        assert_eq!(got, [("今", 100, 400), ("天", 400, 700), ("，", 700, 1000)]);
        // English: a token starting with a space starts a word; an alignment that goes back
        // is held; times clamp to the audio.
        let en = [
            tok(b" go", 0),
            tok(b" for", 30),
            tok(b"ward", 50),
            tok(b" ten", 20),
            tok(b".", 500),
        ];
        let w = words_of(&en, "en", 16_000);
        let got: Vec<(&str, u64, u64)> = w
            .iter()
            .map(|w| (w.word.as_str(), w.start_ms, w.end_ms))
            .collect();
        assert_eq!(
            got,
            [("go", 0, 300), ("forward", 300, 300), ("ten.", 300, 700)]
        );
    }

    #[test]
    fn only_words_found_in_the_text_in_order_stay() {
        let w = |s: &str| Word {
            word: s.into(),
            start_ms: 0,
            end_ms: 0,
        };
        let words = vec![w("今"), w("天"), w("今"), w("天"), w("好")];
        let kept: Vec<String> = in_text(words, "今天好")
            .into_iter()
            .map(|w| w.word)
            .collect();
        assert_eq!(kept, ["今", "天", "好"]);
    }

    #[test]
    fn hot_words_become_a_prompt_heaviest_first() {
        let p = hotword_prompt("腾讯云|10,小程序|11, 语音|5", "zh").unwrap();
        assert_eq!(&*p, "小程序、腾讯云、语音");
        assert_eq!(
            initial_prompt("zh", Some(&p)),
            "以下是普通话的句子。小程序、腾讯云、语音。"
        );
        assert_eq!(initial_prompt("zh", None), ZH_PROMPT);
        assert_eq!(initial_prompt("en", None), "");
        let en = hotword_prompt("Dashwood|11,Norland", "en").unwrap();
        assert_eq!(initial_prompt("en", Some(&en)), "Dashwood, Norland.");
        assert_eq!(hotword_prompt(" , ", "en"), None);
        let long = vec!["很长的热词"; 100].join(",");
        let p = hotword_prompt(&long, "zh").unwrap();
        assert!(p.chars().count() <= MAX_HOTWORD_PROMPT_CHARS, "{p}");
    }

    #[test]
    fn clean_text_drops_tags_and_converts_script() {
        assert_eq!(clean_text(" [Music] ", "en"), "");
        assert_eq!(clean_text("(音樂)", "zh"), "");
        assert_eq!(clean_text("這是一個測試", "zh"), "这是一个测试");
        assert_eq!(clean_text("以下是普通话的句子。", "zh"), "");
        assert_eq!(clean_text("您是普通话的句子。", "zh"), "");
        assert_eq!(clean_text("以下是普通话的句子", "zh"), "");
        assert_eq!(
            clean_text("普通话的句子很难说。", "zh"),
            "普通话的句子很难说。"
        );
        assert_eq!(
            clean_text("这家餐厅的菜非常好吃。", "zh"),
            "这家餐厅的菜非常好吃。"
        );
        assert_eq!(
            clean_text("  go   forward ten meters ", "en"),
            "go forward ten meters"
        );
    }
}
