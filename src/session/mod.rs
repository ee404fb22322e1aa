//! The session engine: sessions, chunk ordering, the event log, long-poll wake-ups and lifecycle.
//! It knows no HTTP, so any transport (long-poll today, WebSocket later) can sit on top.
//!
//! Each session has one worker task ([`worker`]) that feeds its provider in `seq` order and turns
//! the provider's answers into the session's [`event::EventLog`]. Readers wait on a `watch` of
//! the log's last seq: they subscribe before they read, so no wake-up is lost.

pub mod durable;
pub mod event;
pub mod ingest;
mod resume;
mod worker;

use crate::audio::{AudioFormat, Decoder};
use crate::config::Config;
use crate::provider::{Provider, ProviderError, StreamOptions};
use crate::store::{SessionRecord, SessionStore, StoreError};
use bytes::Bytes;
use event::{EndReason, Event, EventKind, EventLog};
use ingest::{Accepted, Ingest, IngestError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// Most events one poll returns; the rest follow on the next poll.
pub const MAX_EVENTS_PER_POLL: usize = 500;

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Session-engine failures; the HTTP layer maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Unknown session id (or a malformed one).
    #[error("no session with id {0}")]
    NotFound(String),
    /// No session token given.
    #[error("this call needs the session's token (X-Session-Token header or session_token query parameter)")]
    MissingToken,
    /// Wrong session token.
    #[error("the session token does not match this session")]
    WrongToken,
    /// The session accepts no more audio.
    #[error("session {id} is {status} and accepts no more audio")]
    Closed {
        /// Session id.
        id: String,
        /// Its status.
        status: String,
    },
    /// A chunk was refused.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// Too many open sessions on this instance.
    #[error("{open} sessions are open, the limit is {max}; retry later")]
    TooMany {
        /// Open now.
        open: usize,
        /// Configured limit.
        max: usize,
    },
    /// The session uploads chunks faster than `max_chunks_per_s`.
    #[error("more than {per_s} chunk uploads per second on this session; slow down")]
    RateLimited {
        /// `max_chunks_per_s`.
        per_s: u32,
    },
    /// Too many open sessions for this user.
    #[error("this user has {open} sessions open, the limit is {max}; finish one or retry later")]
    TooManyForUser {
        /// Open now for the user.
        open: usize,
        /// `max_sessions_per_user`.
        max: usize,
    },
    /// A creation option is invalid.
    #[error("{0}")]
    InvalidOption(String),
    /// The audio format or its parameters are not supported.
    #[error("{0}")]
    UnsupportedAudio(String),
    /// The provider cannot take sessions now.
    #[error("provider unavailable: {0}")]
    ProviderUnavailable(String),
    /// The provider's concurrency limit is reached.
    #[error("{0}")]
    ProviderBusy(String),
    /// The server is shutting down.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Storage failed.
    #[error("storage failure")]
    Store(#[from] StoreError),
}

impl From<ProviderError> for SessionError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Unsupported(m) => Self::InvalidOption(m),
            ProviderError::Unavailable(m) => Self::ProviderUnavailable(m),
            ProviderError::Busy(m) => Self::ProviderBusy(m),
            ProviderError::AudioRejected(m) => Self::UnsupportedAudio(m),
            ProviderError::Upstream { message, .. } => Self::ProviderUnavailable(message),
        }
    }
}

/// Options of `POST /v1/sessions` (shared/api.md). All optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateOptions {
    /// Engine model type, default `16k_zh`.
    pub engine: Option<String>,
    /// `pcm` (s16le, default) or `wav`.
    pub format: Option<String>,
    /// Hz, default 16000.
    pub sample_rate: Option<u32>,
    /// 1 or 2, default 1.
    pub channels: Option<u16>,
    /// A configured provider name, default the server's default.
    pub provider: Option<String>,
    /// Emit partial results, default true.
    pub partials: Option<bool>,
    /// Tencent `filter_dirty`.
    pub filter_dirty: Option<u8>,
    /// Tencent `filter_modal`.
    pub filter_modal: Option<u8>,
    /// Tencent `filter_punc`.
    pub filter_punc: Option<u8>,
    /// Tencent `convert_num_mode`.
    pub convert_num_mode: Option<u8>,
    /// Tencent `word_info`.
    pub word_info: Option<u8>,
    /// Tencent `hotword_list`.
    pub hotword_list: Option<String>,
    /// Non-speech that ends a sentence, ms (200..=5000).
    pub vad_silence_ms: Option<u64>,
}

impl CreateOptions {
    /// Validates the recognition options and gives them in the providers' terms.
    ///
    /// # Errors
    /// [`SessionError::InvalidOption`] naming the field.
    pub fn stream_options(&self) -> Result<StreamOptions, SessionError> {
        if let Some(list) = &self.hotword_list {
            check_hotwords(list).map_err(SessionError::InvalidOption)?;
        }
        if let Some(v) = self.vad_silence_ms {
            if !(200..=5000).contains(&v) {
                return Err(SessionError::InvalidOption(format!(
                    "vad_silence_ms {v} is outside 200..=5000"
                )));
            }
        }
        if self.hotword_list.as_ref().is_some_and(|h| h.len() > 4096) {
            return Err(SessionError::InvalidOption(
                "hotword_list exceeds 4096 bytes".into(),
            ));
        }
        for (name, v, max) in [
            ("filter_dirty", self.filter_dirty, 2),
            ("filter_modal", self.filter_modal, 2),
            ("filter_punc", self.filter_punc, 2),
            ("convert_num_mode", self.convert_num_mode, 3),
            ("word_info", self.word_info, 2),
        ] {
            if v.is_some_and(|v| v > max) {
                return Err(SessionError::InvalidOption(format!(
                    "{name} must be between 0 and {max}"
                )));
            }
        }
        Ok(StreamOptions {
            engine: self.engine.clone().unwrap_or_else(|| "16k_zh".into()),
            partials: self.partials.unwrap_or(true),
            vad_silence_ms: self.vad_silence_ms,
            filter_dirty: self.filter_dirty,
            filter_modal: self.filter_modal,
            filter_punc: self.filter_punc,
            convert_num_mode: self.convert_num_mode,
            word_info: self.word_info,
            hotword_list: self.hotword_list.clone(),
            encoded: None,
        })
    }
}

/// Most hot words in a `hotword_list` (Tencent's limit, shared/providers.md §1.2).
pub const MAX_HOTWORDS: usize = 128;

/// Checks a `hotword_list` the way Tencent defines it (shared/providers.md §1.2): `word|weight`
/// items separated by `,`, at most [`MAX_HOTWORDS`], each word 1–30 characters without spaces,
/// an integer weight 1–100 (Tencent takes 1–11 and 100, FunASR any positive weight).
///
/// # Errors
/// A message naming the first offending item.
pub fn check_hotwords(list: &str) -> Result<(), String> {
    let items: Vec<&str> = list.split(',').collect();
    if items.len() > MAX_HOTWORDS {
        return Err(format!(
            "hotword_list has {} items; at most {MAX_HOTWORDS}",
            items.len()
        ));
    }
    for item in items {
        let short: String = item.chars().take(40).collect();
        let (word, weight) = item
            .split_once('|')
            .ok_or_else(|| format!("hotword_list item {short:?} is not word|weight"))?;
        let n = word.chars().count();
        if n == 0 || n > 30 || word.chars().any(char::is_whitespace) {
            return Err(format!(
                "hotword_list word {short:?}: 1 to 30 characters, no spaces"
            ));
        }
        match weight.parse::<u32>() {
            Ok(1..=100) => {}
            _ => {
                return Err(format!(
                    "hotword_list item {short:?}: weight must be an integer 1-100 (Tencent: 1-11 or 100)"
                ))
            }
        }
    }
    Ok(())
}

/// Sample rate an engine model type implies: `8k_*` → 8000 Hz, anything else 16000 Hz.
pub fn engine_rate(engine: &str) -> u32 {
    if engine.starts_with("8k_") {
        8_000
    } else {
        16_000
    }
}

/// Separator between sentences in a transcript: none for Chinese, Japanese and Cantonese
/// engines, a space otherwise.
pub fn sentence_joiner(engine: &str) -> &'static str {
    if engine.contains("zh") || engine.contains("ja") || engine.contains("yue") {
        ""
    } else {
        " "
    }
}

/// Answer to session creation.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    /// Session id.
    pub session_id: String,
    /// Secret for calls on this session (≥128 random bits, hex).
    pub session_token: String,
    /// `open`.
    pub status: String,
    /// Server epoch.
    pub epoch: u64,
    /// Unix ms after which an idle session expires, as of now.
    pub expires_at_ms: u64,
    /// Long-poll limits.
    pub poll: PollLimits,
    /// Upload limits.
    pub upload: UploadLimits,
}

/// Advertised long-poll limits.
#[derive(Debug, Clone, Serialize)]
pub struct PollLimits {
    /// Default hold, ms.
    pub hold_ms: u64,
    /// Longest hold honoured, ms.
    pub max_hold_ms: u64,
}

/// Advertised upload limits.
#[derive(Debug, Clone, Serialize)]
pub struct UploadLimits {
    /// Largest chunk body, bytes.
    pub max_chunk_bytes: usize,
    /// Chunk size clients should record and send, bytes (RecorderManager `frameSize` is this
    /// in KB).
    pub chunk_bytes: usize,
    /// Chunks to keep in flight.
    pub max_inflight: u32,
    /// Reorder window, chunks.
    pub window: u64,
}

/// Answer to a chunk upload.
#[derive(Debug, Clone, Serialize)]
pub struct UploadAck {
    /// Highest seq with every chunk ≤ it received (absent before chunk 0 arrives).
    pub acked_seq: Option<u64>,
    /// True when this exact chunk had already been received.
    pub duplicate: bool,
}

impl Sentence {
    /// The sentence a final event states.
    fn of(ev: &Event) -> Self {
        Self {
            sentence: ev.sentence,
            text: ev.text.clone(),
            start_ms: ev.start_ms,
            end_ms: ev.end_ms,
        }
    }
}

/// Answer to a poll.
#[derive(Debug, Clone, Serialize)]
pub struct PollResult {
    /// Events with seq > `after`, ascending.
    pub events: Vec<Event>,
    /// Pass as `after` next time.
    pub next_cursor: u64,
    /// Session status.
    pub status: String,
    /// Epoch.
    pub epoch: u64,
    /// True once the `end` event is in this or an earlier response.
    pub done: bool,
}

/// One final sentence in a session's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sentence {
    /// Sentence index.
    pub sentence: u32,
    /// Final text.
    pub text: String,
    /// Stream time, ms.
    pub start_ms: u64,
    /// Stream time, ms.
    pub end_ms: u64,
}

/// Answer to `GET /v1/sessions/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: String,
    /// Status.
    pub status: String,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Highest contiguous seq received.
    pub acked_seq: Option<u64>,
    /// Audio received, ms.
    pub audio_ms: u64,
    /// Finals so far, joined.
    pub transcript: String,
    /// Finals so far.
    pub sentences: Vec<Sentence>,
    /// Newest event seq.
    pub last_event_seq: u64,
    /// Epoch.
    pub epoch: u64,
    /// Provider name.
    pub provider: String,
    /// Engine model type.
    pub engine: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Unix ms.
    pub updated_at_ms: u64,
    /// Unix ms.
    pub ended_at_ms: Option<u64>,
}

/// Registry of provider instances by name.
#[derive(Clone)]
pub struct Providers {
    /// Name of the provider sessions get when they name none.
    pub default: String,
    /// All configured providers.
    pub by_name: HashMap<String, Arc<dyn Provider>>,
}

impl Providers {
    /// The provider named `name`, or the default one.
    ///
    /// # Errors
    /// [`SessionError::InvalidOption`] listing the configured names.
    pub fn get(&self, name: Option<&str>) -> Result<(String, Arc<dyn Provider>), SessionError> {
        let name = name.unwrap_or(&self.default).to_string();
        match self.by_name.get(&name) {
            Some(p) => Ok((name, Arc::clone(p))),
            None => {
                let mut names: Vec<_> = self.by_name.keys().cloned().collect();
                names.sort();
                Err(SessionError::InvalidOption(format!(
                    "unknown provider {name:?}; configured: {}",
                    names.join(", ")
                )))
            }
        }
    }
}

/// Mutable state of one session, behind a short-held mutex.
struct State {
    /// Highest event seq readers may see: a final, warning, error or end is visible only once
    /// it is stored, so no client ever holds an event a crash could lose.
    visible: u64,
    /// Upload token bucket: tokens left, and when it was last refilled.
    rate: (f64, Instant),
    status: &'static str,
    ingest: Ingest,
    log: EventLog,
    finals: BTreeMap<u32, Sentence>,
    /// Sentences that had a partial in the log (an empty final then retracts it).
    partial_shown: std::collections::HashSet<u32>,
    audio_ms: u64,
    last_activity: Instant,
    cancel_requested: bool,
    end_reason: Option<EndReason>,
    updated_at_ms: u64,
    ended_at_ms: Option<u64>,
}

impl State {
    /// A running session's state around its ingest buffer and event log (empty for a new
    /// session, rebuilt for a resumed one); every event in the log is visible.
    fn running(
        status: &'static str,
        ingest: Ingest,
        log: EventLog,
        finals: BTreeMap<u32, Sentence>,
        audio_ms: u64,
        cfg: &Config,
    ) -> Self {
        Self {
            visible: log.last_seq(),
            rate: (2.0 * f64::from(cfg.max_chunks_per_s), Instant::now()),
            status,
            ingest,
            log,
            finals,
            partial_shown: Default::default(),
            audio_ms,
            last_activity: Instant::now(),
            cancel_requested: false,
            end_reason: None,
            updated_at_ms: now_ms(),
            ended_at_ms: None,
        }
    }
}

/// One live session.
pub struct Session {
    id: Uuid,
    /// Owner (JWT `sub` / API key user); `None` with auth off.
    user: Option<String>,
    token_sha256: [u8; 32],
    provider: String,
    engine: String,
    /// Declared audio container (WAV headers are checked on upload).
    format: AudioFormat,
    /// Separator between finals in the transcript ("" for Chinese, " " otherwise).
    joiner: &'static str,
    created_at_ms: u64,
    epoch: u64,
    state: Mutex<State>,
    /// Wakes the worker when chunks become ready or finish is requested.
    wake: Notify,
    /// Last event seq; readers subscribe before they read.
    log_tx: watch::Sender<u64>,
    /// Cancelled by DELETE.
    cancel: CancellationToken,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_token(&self, token: Option<&str>) -> Result<(), SessionError> {
        let token = token.ok_or(SessionError::MissingToken)?;
        check_token_hash(&self.token_sha256, token)
    }

    fn transcript(&self, st: &State) -> String {
        join_finals(st.finals.values().map(|s| s.text.as_str()), self.joiner)
    }

    /// Appends an event and keeps the transcript; with `publish`, also makes it visible and
    /// wakes readers (else [`Session::publish`] does, once it is stored). Returns the stored
    /// event, or `None` when it was dropped (an empty final for a sentence never shown).
    fn push_event(&self, ev: Event, publish: bool) -> Option<Event> {
        let mut st = self.lock();
        match ev.kind {
            EventKind::Partial => {
                st.partial_shown.insert(ev.sentence);
            }
            EventKind::Final => {
                if ev.text.is_empty() && !st.partial_shown.contains(&ev.sentence) {
                    return None;
                }
                if !ev.text.is_empty() {
                    st.finals.insert(ev.sentence, Sentence::of(&ev));
                }
            }
            _ => {}
        }
        let seq = st.log.append(ev);
        st.updated_at_ms = now_ms();
        let stored = st.log.after(seq - 1, 1).pop();
        drop(st);
        if publish {
            self.publish(seq);
        }
        stored
    }

    /// Makes every event up to `seq` visible and wakes readers.
    fn publish(&self, seq: u64) {
        {
            let mut st = self.lock();
            st.visible = st.visible.max(seq);
        }
        self.log_tx.send_replace(seq);
    }

    fn touch(&self) {
        self.lock().last_activity = Instant::now();
    }
}

fn join_finals<'a>(parts: impl Iterator<Item = &'a str>, joiner: &str) -> String {
    parts
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(joiner)
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn check_token_hash(expected: &[u8; 32], token: &str) -> Result<(), SessionError> {
    if bool::from(sha256(token).ct_eq(expected)) {
        Ok(())
    } else {
        Err(SessionError::WrongToken)
    }
}

fn parse_id(id: &str) -> Result<Uuid, SessionError> {
    Uuid::try_parse(id).map_err(|_| SessionError::NotFound(id.chars().take(64).collect()))
}

struct Inner {
    config: Arc<Config>,
    store: Arc<dyn SessionStore>,
    providers: Providers,
    sessions: Mutex<HashMap<Uuid, Arc<Session>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    epoch: u64,
    /// Group commit of accepted chunks.
    writer: durable::ChunkWriter,
}

/// Owns every live session. Cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

impl SessionManager {
    /// A manager whose sessions end when `shutdown` fires.
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn SessionStore>,
        providers: Providers,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                writer: durable::ChunkWriter::spawn(Arc::clone(&store)),
                store,
                providers,
                sessions: Mutex::new(HashMap::new()),
                shutdown,
                tasks: TaskTracker::new(),
                epoch: now_ms(),
            }),
        }
    }

    /// This process's epoch (unix ms at start): it changes on restart, telling clients that
    /// in-memory partials may be gone.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch
    }

    /// Configured providers.
    pub fn providers(&self) -> &Providers {
        &self.inner.providers
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.inner.store
    }

    fn sessions(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<Session>>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn live(&self, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions().get(id).cloned()
    }

    /// Sessions still open or finishing on this instance.
    pub fn open_count(&self) -> usize {
        self.sessions()
            .values()
            .filter(|s| s.lock().end_reason.is_none())
            .count()
    }

    /// Opens a session: validates options, opens the provider stream, records the row, starts
    /// the worker.
    ///
    /// # Errors
    /// Invalid options, unsupported audio, unknown or unavailable provider, too many sessions,
    /// shutting down, storage failure.
    pub async fn create(
        &self,
        opts: CreateOptions,
        user_id: Option<String>,
    ) -> Result<Created, SessionError> {
        let cfg = &self.inner.config;
        if self.inner.shutdown.is_cancelled() {
            return Err(SessionError::ShuttingDown);
        }
        let open = self.open_count();
        if open >= cfg.max_sessions {
            return Err(SessionError::TooMany {
                open,
                max: cfg.max_sessions,
            });
        }
        if let Some(user) = &user_id {
            let mine = self
                .sessions()
                .values()
                .filter(|s| s.user.as_ref() == Some(user) && s.lock().end_reason.is_none())
                .count();
            if mine >= cfg.max_sessions_per_user {
                return Err(SessionError::TooManyForUser {
                    open: mine,
                    max: cfg.max_sessions_per_user,
                });
            }
        }
        let engine = opts.engine.clone().unwrap_or_else(|| "16k_zh".into());
        let format = AudioFormat::parse(opts.format.as_deref().unwrap_or("pcm"))
            .map_err(SessionError::UnsupportedAudio)?;
        let rate = opts.sample_rate.unwrap_or(16_000);
        let channels = opts.channels.unwrap_or(1);
        let mut decoder = Decoder::new(format, rate, channels)
            .map_err(|e| SessionError::UnsupportedAudio(e.0))?;
        let (provider_name, provider) = self.inner.providers.get(opts.provider.as_deref())?;
        let mut stream_opts = opts.stream_options()?;
        // MP3/AAC go to the provider as recorded when it takes them and the declared audio is
        // what its engine wants (engine rate, mono); the worker checks the frames agree.
        if matches!(format, AudioFormat::Mp3 | AudioFormat::Aac)
            && provider.accepts_encoded(format)
            && channels == 1
            && rate == engine_rate(&stream_opts.engine)
        {
            stream_opts.encoded = Some(format);
            decoder.pass_through();
        }
        let id = Uuid::new_v4();
        let token = hex::encode(rand::random::<[u8; 24]>());
        let token_sha256 = sha256(&token);
        // Cancelled by DELETE only; server shutdown is watched separately so the worker can
        // flush the sentence in progress first.
        let cancel = CancellationToken::new();
        // The provider gets its own token: on server shutdown the worker still asks it to
        // flush the sentence in progress before it is stopped.
        let provider_cancel = CancellationToken::new();
        let stream = provider
            .open(&stream_opts, provider_cancel.clone())
            .map_err(SessionError::from)?;
        let now = now_ms();
        let rec = SessionRecord {
            id: id.to_string(),
            user_id: user_id.clone(),
            token_sha256: hex::encode(token_sha256),
            provider: provider_name.clone(),
            engine: engine.clone(),
            options_json: serde_json::to_string(&opts).unwrap_or_default(),
            status: "open".into(),
            epoch: self.inner.epoch,
            acked_seq: None,
            audio_ms: 0,
            transcript: String::new(),
            end_reason: None,
            created_at_ms: now,
            updated_at_ms: now,
            ended_at_ms: None,
        };
        if let Err(e) = self.inner.store.insert_session(&rec).await {
            provider_cancel.cancel();
            return Err(e.into());
        }
        let session = Arc::new(Session {
            id,
            user: user_id,
            token_sha256,
            provider: provider_name,
            format,
            joiner: sentence_joiner(&engine),
            engine,
            created_at_ms: now,
            epoch: self.inner.epoch,
            state: Mutex::new(State::running(
                "open",
                Ingest::new(cfg.reorder_window, cfg.max_buffered_bytes),
                EventLog::default(),
                BTreeMap::new(),
                0,
                cfg,
            )),
            wake: Notify::new(),
            log_tx: watch::Sender::new(0),
            cancel,
        });
        let worker = worker::Worker::new(
            self.clone(),
            Arc::clone(&session),
            worker::Upstream {
                provider,
                opts: stream_opts,
                stream,
                cancel: provider_cancel,
            },
            decoder,
        );
        self.start(session, worker);
        tracing::info!(session_id = %id, "session created");
        Ok(Created {
            session_id: id.to_string(),
            session_token: token,
            status: "open".into(),
            epoch: self.inner.epoch,
            expires_at_ms: now + cfg.session_idle_ms,
            poll: PollLimits {
                hold_ms: cfg.poll_hold_ms,
                max_hold_ms: cfg.poll_max_hold_ms,
            },
            upload: UploadLimits {
                max_chunk_bytes: cfg.max_chunk_bytes,
                chunk_bytes: cfg.chunk_bytes.min(cfg.max_chunk_bytes),
                max_inflight: cfg.max_inflight,
                window: cfg.reorder_window,
            },
        })
    }

    /// Accepts chunk `seq` of a session's audio. Returns once a new chunk is committed to the
    /// database (group commit), so an acknowledged chunk survives a crash.
    ///
    /// # Errors
    /// Unknown session, bad token, closed session, refused chunk, storage failure.
    pub async fn upload(
        &self,
        id: &str,
        token: Option<&str>,
        seq: u64,
        last: bool,
        body: Bytes,
    ) -> Result<UploadAck, SessionError> {
        let uuid = parse_id(id)?;
        let s = self
            .live(&uuid)
            .ok_or_else(|| SessionError::NotFound(id.to_string()))?;
        s.check_token(token)?;
        if s.format == AudioFormat::Wav
            && seq == 0
            && body.len() >= 12
            && (&body[0..4] != b"RIFF" || &body[8..12] != b"WAVE")
        {
            return Err(SessionError::UnsupportedAudio(
                "chunk 0 of a \"wav\" session must start with a RIFF/WAVE header".into(),
            ));
        }
        let (accepted, ack) = {
            let mut st = s.lock();
            let now = Instant::now();
            st.last_activity = now;
            let per_s = f64::from(self.inner.config.max_chunks_per_s);
            let (tokens, at) = st.rate;
            let tokens = (tokens + now.duration_since(at).as_secs_f64() * per_s).min(2.0 * per_s);
            if tokens < 1.0 {
                st.rate = (tokens, now);
                return Err(SessionError::RateLimited {
                    per_s: self.inner.config.max_chunks_per_s,
                });
            }
            st.rate = (tokens - 1.0, now);
            let accepted = if st.status == "open" || st.status == "finishing" {
                st.ingest.offer(seq, body.clone(), last)
            } else {
                // Retries of chunks already taken stay safe after the session closed.
                if !st.ingest.is_duplicate(seq, &body) {
                    return Err(SessionError::Closed {
                        id: id.to_string(),
                        status: st.status.to_string(),
                    });
                }
                Ok(Accepted::Duplicate)
            }?;
            if st.ingest.finish_requested() && st.status == "open" {
                st.status = "finishing";
            }
            let ack = UploadAck {
                acked_seq: st.ingest.acked_seq(),
                duplicate: accepted == Accepted::Duplicate,
            };
            (accepted, ack)
        };
        if accepted == Accepted::New || last {
            s.wake.notify_one();
        }
        if accepted == Accepted::New {
            self.inner
                .writer
                .write(crate::store::ChunkRecord {
                    session_id: id.to_string(),
                    seq,
                    last,
                    data: body.to_vec(),
                })
                .await?;
        }
        Ok(ack)
    }

    /// Ends the session's audio once every earlier chunk has arrived. Idempotent.
    ///
    /// # Errors
    /// Unknown session, bad token.
    pub async fn finish(&self, id: &str, token: Option<&str>) -> Result<SessionInfo, SessionError> {
        let uuid = parse_id(id)?;
        if let Some(s) = self.live(&uuid) {
            s.check_token(token)?;
            {
                let mut st = s.lock();
                st.last_activity = Instant::now();
                st.ingest.request_finish();
                if st.status == "open" {
                    st.status = "finishing";
                }
            }
            s.wake.notify_one();
        }
        self.info(id, token).await
    }

    /// Cancels the session. Idempotent.
    ///
    /// # Errors
    /// Unknown session, bad token.
    pub async fn cancel(&self, id: &str, token: Option<&str>) -> Result<SessionInfo, SessionError> {
        let uuid = parse_id(id)?;
        if let Some(s) = self.live(&uuid) {
            s.check_token(token)?;
            s.lock().cancel_requested = true;
            s.cancel.cancel();
            // Wait (briefly) for the worker to record the end so the answer shows it.
            let mut rx = s.log_tx.subscribe();
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while !s.lock().log.ended() {
                    if rx.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        self.info(id, token).await
    }

    /// The session's state (from memory, else from the store).
    ///
    /// # Errors
    /// Unknown session, bad token, storage failure.
    pub async fn info(&self, id: &str, token: Option<&str>) -> Result<SessionInfo, SessionError> {
        let uuid = parse_id(id)?;
        if let Some(s) = self.live(&uuid) {
            s.check_token(token)?;
            let st = s.lock();
            return Ok(SessionInfo {
                session_id: id.to_string(),
                status: st.status.to_string(),
                end_reason: st.end_reason.map(|r| r.status().to_string()),
                acked_seq: st.ingest.acked_seq(),
                audio_ms: st.audio_ms,
                transcript: s.transcript(&st),
                sentences: st.finals.values().cloned().collect(),
                last_event_seq: st.log.last_seq(),
                epoch: s.epoch,
                provider: s.provider.clone(),
                engine: s.engine.clone(),
                created_at_ms: s.created_at_ms,
                updated_at_ms: st.updated_at_ms,
                ended_at_ms: st.ended_at_ms,
            });
        }
        let rec = self.stored_session(id, token).await?;
        let events = self.inner.store.events_after(id, 0).await?;
        let mut sentences = Vec::new();
        let mut last = 0;
        for e in &events {
            last = e.seq;
            if let Ok(ev) = serde_json::from_str::<Event>(&e.json) {
                if ev.kind == EventKind::Final && !ev.text.is_empty() {
                    sentences.push(Sentence {
                        sentence: ev.sentence,
                        text: ev.text,
                        start_ms: ev.start_ms,
                        end_ms: ev.end_ms,
                    });
                }
            }
        }
        Ok(SessionInfo {
            session_id: rec.id,
            status: rec.status,
            end_reason: rec.end_reason,
            acked_seq: rec.acked_seq,
            audio_ms: rec.audio_ms,
            transcript: rec.transcript,
            sentences,
            last_event_seq: last,
            epoch: rec.epoch,
            provider: rec.provider,
            engine: rec.engine,
            created_at_ms: rec.created_at_ms,
            updated_at_ms: rec.updated_at_ms,
            ended_at_ms: rec.ended_at_ms,
        })
    }

    async fn stored_session(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<SessionRecord, SessionError> {
        let rec = self
            .inner
            .store
            .get_session(id)
            .await?
            .ok_or_else(|| SessionError::NotFound(id.to_string()))?;
        let token = token.ok_or(SessionError::MissingToken)?;
        let mut expected = [0u8; 32];
        hex::decode_to_slice(&rec.token_sha256, &mut expected)
            .map_err(|_| SessionError::WrongToken)?;
        check_token_hash(&expected, token)?;
        Ok(rec)
    }

    /// Long-poll: events with seq > `after`, waiting up to `wait` (capped at the configured
    /// maximum) when there are none. Returns early on shutdown.
    ///
    /// # Errors
    /// Unknown session, bad token, storage failure.
    pub async fn poll(
        &self,
        id: &str,
        token: Option<&str>,
        after: u64,
        wait: Option<Duration>,
    ) -> Result<PollResult, SessionError> {
        let cfg = &self.inner.config;
        let uuid = parse_id(id)?;
        let Some(s) = self.live(&uuid) else {
            return self.poll_stored(id, token, after).await;
        };
        s.check_token(token)?;
        s.touch();
        let mut rx = s.log_tx.subscribe(); // subscribe before reading: no lost wake-up
        let first = read_after(&s, after);
        if !first.events.is_empty() || first.done {
            return Ok(first);
        }
        let hold = wait
            .unwrap_or_else(|| cfg.poll_hold())
            .min(cfg.poll_max_hold());
        tokio::select! {
            _ = rx.wait_for(|last| *last > after) => {}
            () = tokio::time::sleep(hold) => {}
            () = self.inner.shutdown.cancelled() => {}
        }
        s.touch();
        Ok(read_after(&s, after))
    }

    async fn poll_stored(
        &self,
        id: &str,
        token: Option<&str>,
        after: u64,
    ) -> Result<PollResult, SessionError> {
        let rec = self.stored_session(id, token).await?;
        let stored = self.inner.store.events_after(id, after).await?;
        let mut events = Vec::with_capacity(stored.len());
        for e in stored.into_iter().take(MAX_EVENTS_PER_POLL) {
            let ev: Event = serde_json::from_str(&e.json)
                .map_err(|err| StoreError::Pool(format!("stored event: {err}")))?;
            events.push(ev);
        }
        let next_cursor = events.last().map_or(after, |e| e.seq);
        let done =
            rec.ended_at_ms.is_some() && events.last().is_none_or(|e| e.kind == EventKind::End);
        Ok(PollResult {
            events,
            next_cursor,
            status: rec.status,
            epoch: rec.epoch,
            done,
        })
    }

    /// True once shutdown has begun (long-polls then return at once).
    pub fn shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Begins shutdown: every session finishes what it can and records its end; waits up to
    /// the configured grace period (plus a margin) for the workers.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let grace =
            Duration::from_millis(self.inner.config.shutdown_grace_ms) + Duration::from_secs(2);
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("session workers did not stop within the grace period");
        }
    }

    /// Registers a session and runs its worker.
    fn start(&self, session: Arc<Session>, worker: worker::Worker) {
        let id = session.id;
        self.sessions().insert(id, session);
        self.inner.tasks.spawn(tracing::Instrument::instrument(
            worker.run(),
            tracing::info_span!("session", id = %id),
        ));
    }

    fn remove(&self, id: &Uuid) {
        self.sessions().remove(id);
    }

    fn config(&self) -> &Config {
        &self.inner.config
    }

    fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }
}

fn read_after(s: &Session, after: u64) -> PollResult {
    let st = s.lock();
    let mut events = st.log.after(after, MAX_EVENTS_PER_POLL);
    events.retain(|e| e.seq <= st.visible);
    let next_cursor = events.last().map_or(after, |e| e.seq);
    let done =
        st.log.ended() && st.visible >= st.log.last_seq() && next_cursor >= st.log.last_seq();
    PollResult {
        events,
        next_cursor,
        status: st.status.to_string(),
        epoch: s.epoch,
        done,
    }
}

fn stored(ev: &Event) -> crate::store::StoredEvent {
    crate::store::StoredEvent {
        seq: ev.seq,
        json: serde_json::to_string(ev).unwrap_or_default(),
    }
}
