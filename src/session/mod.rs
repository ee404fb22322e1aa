//! The session engine: sessions, chunk ordering, the event log, long-poll wake-ups and lifecycle.
//! It knows no HTTP, so every transport (long-poll, WebSocket) sits on top of the same calls.
//!
//! Each session has one worker task ([`worker`]) that feeds its provider in `seq` order and turns
//! the provider's answers into the session's [`event::EventLog`]; readers wait on a `watch` of the
//! log's newest visible seq ([`state`]).
//!
//! # Layout
//! - this file: [`SessionManager`], the lifecycle (create, upload, finish, cancel, poll, info,
//!   shutdown);
//! - [`options`]: what a session is opened with, and the engine's [`SessionLimits`];
//! - [`view`]: the answers as the API serves them; [`error`]: what the engine refuses;
//! - `state`: one live session and its mutable state; `stored`: sessions as the store holds
//!   them; `worker`: the per-session task; `replay`: audio kept for a reopened stream;
//!   `resume`: sessions a killed process left open; `stability`: the settled prefix of partials;
//! - [`ingest`]: chunk reassembly; [`event`]: events and the log; [`durable`]: group commit of
//!   chunks.

mod cluster;
pub mod durable;
pub mod error;
pub mod event;
pub mod ingest;
pub mod options;
mod replay;
mod resume;
mod stability;
mod state;
mod stored;
mod timeline;
pub mod view;
mod worker;

pub use cluster::Cluster;
pub use error::SessionError;
pub use options::{
    check_hotwords, engine_rate, sentence_joiner, CreateOptions, InvalidOption, SessionLimits,
};
pub use state::{Status, MAX_EVENTS_PER_POLL};
pub use view::{
    Created, PollLimits, PollResult, Sentence, SessionInfo, UploadAck, UploadLimits, UploadReply,
};

use crate::audio::{AudioFormat, Decoder};
use crate::clock::now_ms;
use crate::provider::registry::Providers;
use crate::store::{ChunkRecord, SessionRecord, SessionStore};
use bytes::Bytes;
use ingest::Accepted;
use state::{parse_id, RateLimit, Session, State};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use worker::{Upstream, Worker, WorkerCtx};

/// Live sessions of this instance by id, and the sessions being created: both count against
/// the session budgets, so concurrent creates cannot pass a limit together.
#[derive(Default)]
struct Sessions {
    live: HashMap<Uuid, Arc<Session>>,
    /// Owner of each session admitted but not yet registered.
    admitting: Vec<Option<String>>,
}

type Registry = Mutex<Sessions>;

/// A place in the session budgets, held from admission until the session is registered (or
/// its creation failed).
struct Admission {
    registry: Arc<Registry>,
    user: Option<String>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut r = lock_registry(&self.registry);
        if let Some(i) = r.admitting.iter().position(|u| *u == self.user) {
            r.admitting.swap_remove(i);
        }
    }
}

struct Inner {
    limits: Arc<SessionLimits>,
    store: Arc<dyn SessionStore>,
    providers: Providers,
    sessions: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    epoch: u64,
    /// Long-polls being held now.
    waiting: AtomicUsize,
    /// Session creations (`max_creates_per_s`).
    creates: Mutex<RateLimit>,
    /// Group commit of accepted chunks.
    writer: durable::ChunkWriter,
    /// Set when replicas share sessions through Redis (`cluster.rs`).
    cluster: Option<Arc<Cluster>>,
}

/// Owns every live session. Cheap to clone.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

impl SessionManager {
    /// A manager whose sessions end when `shutdown` fires; with `cluster`, one replica of
    /// several sharing sessions through Redis (`store` is then that Redis engine).
    pub fn new(
        limits: SessionLimits,
        store: Arc<dyn SessionStore>,
        providers: Providers,
        shutdown: CancellationToken,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                creates: Mutex::new(RateLimit::new(limits.max_creates_per_s)),
                limits: Arc::new(limits),
                writer: durable::ChunkWriter::spawn(Arc::clone(&store)),
                store,
                providers,
                sessions: Arc::new(Mutex::new(Sessions::default())),
                shutdown,
                tasks: TaskTracker::new(),
                epoch: now_ms(),
                waiting: AtomicUsize::new(0),
                cluster,
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

    /// The limits the engine enforces.
    pub fn limits(&self) -> &SessionLimits {
        &self.inner.limits
    }

    fn sessions(&self) -> MutexGuard<'_, Sessions> {
        lock_registry(&self.inner.sessions)
    }

    fn live(&self, id: &Uuid) -> Option<Arc<Session>> {
        self.sessions().live.get(id).cloned()
    }

    /// Sessions still open or finishing on this instance.
    pub fn open_count(&self) -> usize {
        self.sessions()
            .live
            .values()
            .filter(|s| s.is_open())
            .count()
    }

    /// Sessions on this instance by state: `open`, `finishing`, `ended` (lingering so late polls
    /// are answered), for the `voxpoll_sessions` gauge.
    pub fn counts_by_state(&self) -> [(&'static str, usize); 3] {
        let mut n = [("open", 0), ("finishing", 0), ("ended", 0)];
        for s in self.sessions().live.values() {
            let i = match s.lock().status {
                Status::Open => 0,
                Status::Finishing => 1,
                Status::Ended(_) => 2,
            };
            n[i].1 += 1;
        }
        n
    }

    /// Long-polls held on this instance now (`/ready` reports it).
    pub fn polls_waiting(&self) -> usize {
        self.inner.waiting.load(Ordering::Relaxed)
    }

    /// Takes a place in the budgets for a new session of `user`: refused over
    /// `max_sessions` open or being created, over `max_sessions_per_user` for `user`, or (for
    /// a session the budgets admit) over `max_creates_per_s`.
    fn admit(&self, user: Option<&str>) -> Result<Admission, SessionError> {
        let limits = &self.inner.limits;
        let mut r = self.sessions();
        let open = r.live.values().filter(|s| s.is_open()).count() + r.admitting.len();
        if open >= limits.max_sessions {
            return Err(SessionError::TooMany {
                open,
                max: limits.max_sessions,
            });
        }
        if let Some(user) = user {
            let live = r
                .live
                .values()
                .filter(|s| s.user() == Some(user) && s.is_open())
                .count();
            let mine = live
                + r.admitting
                    .iter()
                    .filter(|u| u.as_deref() == Some(user))
                    .count();
            if mine >= limits.max_sessions_per_user {
                return Err(SessionError::TooManyForUser {
                    open: mine,
                    max: limits.max_sessions_per_user,
                });
            }
        }
        let per_s = limits.max_creates_per_s;
        let allowed = self
            .inner
            .creates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(per_s, Instant::now());
        if !allowed {
            return Err(SessionError::CreatesRateLimited { per_s });
        }
        let user = user.map(str::to_string);
        r.admitting.push(user.clone());
        Ok(Admission {
            registry: Arc::clone(&self.inner.sessions),
            user,
        })
    }

    /// Opens a session: validates options, opens the provider stream, records the row, starts
    /// the worker.
    ///
    /// # Errors
    /// Invalid options, unsupported audio, unknown, unavailable or busy provider, too many
    /// sessions, shutting down, storage failure.
    pub async fn create(
        &self,
        opts: CreateOptions,
        user_id: Option<String>,
    ) -> Result<Created, SessionError> {
        let limits = Arc::clone(&self.inner.limits);
        if self.inner.shutdown.is_cancelled() {
            return Err(SessionError::ShuttingDown);
        }
        let admission = self.admit(user_id.as_deref())?;
        let engine = opts.engine();
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
        let token = hex::encode(rand::random::<[u8; 24]>());
        let now = now_ms();
        let rec = SessionRecord {
            id: Uuid::new_v4().to_string(),
            user_id,
            token_sha256: hex::encode(state::sha256(&token)),
            provider: provider_name,
            engine,
            options_json: serde_json::to_string(&opts).unwrap_or_default(),
            status: Status::Open.as_str().into(),
            epoch: self.inner.epoch,
            acked_seq: None,
            audio_ms: 0,
            transcript: String::new(),
            end_reason: None,
            created_at_ms: now,
            updated_at_ms: now,
            ended_at_ms: None,
        };
        // The provider gets its own token: on server shutdown the worker still asks it to
        // flush the sentence in progress before it is stopped.
        let provider_cancel = CancellationToken::new();
        if let (Some(c), Some(user)) = (&self.inner.cluster, rec.user_id.as_deref()) {
            let max = limits.max_sessions_per_user;
            if let Err(open) = c.redis().admit_user(Some(user), &rec.id, max).await? {
                return Err(SessionError::TooManyForUser { open, max });
            }
        }
        let span = session_span(&rec.id, provider.name(), rec.epoch);
        let registered = async {
            let stream = {
                // The provider's own tasks log inside the session's span.
                let _in_span = span.enter();
                provider.open(&stream_opts, provider_cancel.clone())?
            };
            // The lease before the row: a replica looking for sessions to take over never
            // sees this one unleased.
            if let Some(c) = &self.inner.cluster {
                c.redis()
                    .acquire(&rec.id, c.replica(), rec.epoch, c.lease_ms())
                    .await?;
            }
            self.inner.store.insert_session(&rec).await?;
            Ok::<_, SessionError>(stream)
        }
        .await;
        let stream = match registered {
            Ok(stream) => {
                metrics::counter!(crate::metrics::SESSIONS_CREATED).increment(1);
                metrics::counter!(crate::metrics::PROVIDER_OPENS, "provider" => provider.name().to_string()).increment(1);
                stream
            }
            Err(e) => {
                provider_cancel.cancel();
                if let (Some(c), Some(user)) = (&self.inner.cluster, rec.user_id.as_deref()) {
                    let _ = c.redis().unadmit_user(Some(user), &rec.id).await;
                }
                return Err(e);
            }
        };
        let state = State::fresh(&limits);
        let session_id = rec.id.clone();
        let session = Session::new(rec, format, self.inner.epoch, state)
            .map_err(|e| SessionError::Store(crate::store::StoreError::Pool(e)))?;
        let upstream = Upstream {
            provider,
            opts: stream_opts,
            stream,
            cancel: provider_cancel,
        };
        self.launch(session, upstream, decoder, None, span.clone());
        drop(admission); // registered: the session itself counts now
        span.in_scope(|| tracing::info!(%session_id, "session created"));
        Ok(Created {
            session_id,
            session_token: token,
            status: Status::Open.as_str().into(),
            epoch: self.inner.epoch,
            expires_at_ms: now + limits.session_idle_ms,
            poll: PollLimits {
                hold_ms: limits.poll_hold_ms,
                max_hold_ms: limits.poll_max_hold_ms,
            },
            upload: UploadLimits {
                max_chunk_bytes: limits.max_chunk_bytes,
                chunk_bytes: limits.chunk_bytes.min(limits.max_chunk_bytes),
                max_inflight: limits.max_inflight,
                window: limits.reorder_window,
            },
        })
    }

    /// Accepts chunk `seq` of a session's audio. Returns once a new chunk is committed to the
    /// database (group commit), so an acknowledged chunk survives a crash.
    ///
    /// # Errors
    /// Chunk over `max_chunk_bytes` or empty but not last, unknown session, bad token, closed
    /// session, refused chunk, rate limit, storage failure.
    pub async fn upload(
        &self,
        id: &str,
        token: Option<&str>,
        seq: u64,
        last: bool,
        body: Bytes,
    ) -> Result<UploadAck, SessionError> {
        self.inner.limits.check_chunk(body.len(), last)?;
        if let Some(c) = &self.inner.cluster {
            return self.upload_shared(c, id, token, seq, last, body).await;
        }
        let uuid = parse_id(id)?;
        let s = self
            .live(&uuid)
            .ok_or_else(|| SessionError::NotFound(id.to_string()))?;
        s.check_token(token)?;
        check_wav_header(s.format, seq, &body)?;
        let (accepted, ack, to_commit, finishing) = {
            let mut st = s.lock();
            let now = Instant::now();
            st.last_activity = now;
            let per_s = self.inner.limits.max_chunks_per_s;
            if !st.rate.take(per_s, now) {
                return Err(SessionError::RateLimited { per_s });
            }
            let running = st.status.takes_audio();
            let accepted = if running {
                st.ingest.offer(seq, body.clone(), last)?
            } else if st.ingest.is_duplicate(seq, &body) {
                // Retries of chunks already taken stay safe after the session closed.
                Accepted::Duplicate
            } else {
                return Err(SessionError::Closed {
                    id: id.to_string(),
                    status: st.status.as_str().to_string(),
                });
            };
            let finishing = st.ingest.finish_requested() && st.status == Status::Open;
            if finishing {
                st.status = Status::Finishing;
            }
            let ack = UploadAck {
                acked_seq: st.ingest.acked_seq(),
                duplicate: accepted == Accepted::Duplicate,
            };
            // A running session's chunk is acknowledged only once it is committed, also when
            // this is a retry of one whose commit is pending or failed.
            let to_commit = running && !st.committed.contains(seq);
            (accepted, ack, to_commit, finishing)
        };
        if to_commit {
            let rec = ChunkRecord {
                session_id: uuid.to_string(),
                seq,
                last,
                data: body,
            };
            if self.inner.limits.durable_acks {
                self.inner.writer.write(rec).await?;
            } else {
                self.inner.writer.write_behind(rec).await?;
            }
            s.lock().committed.insert(seq);
        }
        if finishing {
            self.store_finishing(&s).await?;
        }
        // The worker hears of a chunk once it is stored: what the provider gets is always
        // what a restart would replay, and the answer is ready before any result of it.
        if accepted == Accepted::New || last {
            s.wake.notify_one();
        }
        Ok(ack)
    }

    /// Records that the session's audio is complete, before that is acknowledged, so a restart
    /// finishes the session instead of waiting for audio.
    async fn store_finishing(&self, s: &Session) -> Result<(), SessionError> {
        self.inner
            .store
            .update_progress(&s.id.to_string(), &s.progress(None))
            .await
            .map_err(SessionError::from)
    }

    /// Ends the session's audio once every earlier chunk has arrived. Idempotent.
    ///
    /// # Errors
    /// Unknown session, bad token.
    pub async fn finish(&self, id: &str, token: Option<&str>) -> Result<SessionInfo, SessionError> {
        if let Some(c) = &self.inner.cluster {
            return self.finish_shared(c, id, token).await;
        }
        if let Some(s) = self.live(&parse_id(id)?) {
            s.check_token(token)?;
            let finishing = {
                let mut st = s.lock();
                st.last_activity = Instant::now();
                st.ingest.request_finish();
                let finishing = st.status == Status::Open;
                if finishing {
                    st.status = Status::Finishing;
                }
                finishing
            };
            s.wake.notify_one();
            if finishing {
                self.store_finishing(&s).await?;
            }
        }
        self.info(id, token).await
    }

    /// Ends the current sentence after chunk `seq` (default: the highest contiguous chunk
    /// received, `acked_seq`) without ending the session: its final follows at once instead
    /// of after `vad_silence_ms` of silence (a push-to-talk release, a "send" button). Returns
    /// the seq the sentence ends after, `None` when no audio arrived yet (nothing to end).
    ///
    /// # Errors
    /// Unknown session, bad token; 410 `session_closed` once the audio is complete; a `seq`
    /// beyond the reorder window or after the last chunk (409, as for chunks).
    pub async fn finalize(
        &self,
        id: &str,
        token: Option<&str>,
        seq: Option<u64>,
    ) -> Result<Option<u64>, SessionError> {
        if let Some(c) = &self.inner.cluster {
            return self.finalize_shared(c, id, token, seq).await;
        }
        let Some(s) = self.live(&parse_id(id)?) else {
            let rec = stored::record(&*self.inner.store, id, token).await?;
            return Err(SessionError::Closed {
                id: id.into(),
                status: rec.status,
            });
        };
        s.check_token(token)?;
        let at = {
            let mut st = s.lock();
            if st.status != Status::Open {
                return Err(SessionError::Closed {
                    id: id.into(),
                    status: st.status.as_str().into(),
                });
            }
            st.last_activity = Instant::now();
            st.ingest.request_sentence_end(seq)?
        };
        s.wake.notify_one();
        Ok(at)
    }

    /// Cancels the session. Idempotent.
    ///
    /// # Errors
    /// Unknown session, bad token.
    pub async fn cancel(&self, id: &str, token: Option<&str>) -> Result<SessionInfo, SessionError> {
        if let Some(c) = &self.inner.cluster {
            return self.cancel_shared(c, id, token).await;
        }
        if let Some(s) = self.live(&parse_id(id)?) {
            s.check_token(token)?;
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
        let Some(s) = self.live(&parse_id(id)?) else {
            return stored::info(&*self.inner.store, id, token).await;
        };
        s.check_token(token)?;
        let st = s.lock();
        let sentences = st.finals.values().cloned().collect();
        Ok(SessionInfo::new(
            s.record(&st),
            sentences,
            st.log.last_seq(),
        ))
    }

    /// Long-poll: events with seq > `after`, waiting up to `wait` (capped at
    /// `poll_max_hold_ms`; `poll_hold_ms` when `None`) when there are none. Returns early on
    /// shutdown.
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
        let Some(s) = self.live(&parse_id(id)?) else {
            if let Some(c) = &self.inner.cluster {
                return self.poll_shared(c, id, token, after, wait).await;
            }
            return stored::poll(&*self.inner.store, id, token, after).await;
        };
        s.check_token(token)?;
        s.touch();
        let mut rx = s.log_tx.subscribe(); // subscribe before reading: no lost wake-up
        let first = s.read_after(after);
        if !first.events.is_empty() || first.done {
            return Ok(first);
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        let _held = Held(&self.inner.waiting);
        tokio::select! {
            _ = rx.wait_for(|last| *last > after) => {}
            () = tokio::time::sleep(self.inner.limits.hold(wait)) => {}
            () = self.inner.shutdown.cancelled() => {}
        }
        s.touch();
        Ok(s.read_after(after))
    }

    /// True once shutdown has begun (long-polls then return at once).
    pub fn shutting_down(&self) -> bool {
        self.inner.shutdown.is_cancelled()
    }

    /// Begins shutdown: every session finishes what it can and records its end; waits up to
    /// the grace period (plus a margin) for the workers.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let grace = self.inner.limits.grace() + Duration::from_secs(2);
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("session workers did not stop within the grace period");
        }
    }

    /// Registers a session and runs its worker; `resume` (replay audio, its start in ms, the
    /// next sentence index) for a session resumed after a restart.
    fn launch(
        &self,
        session: Session,
        upstream: Upstream,
        decoder: Decoder,
        resume: Option<(Vec<i16>, u64, u32)>,
        span: tracing::Span,
    ) {
        let s = Arc::new(session);
        let id = s.id;
        let registry = Arc::clone(&self.inner.sessions);
        let ctx = WorkerCtx {
            store: self.inner.store.fenced(s.epoch()),
            limits: Arc::clone(&self.inner.limits),
            shutdown: self.inner.shutdown.clone(),
            on_exit: Box::new(move || {
                lock_registry(&registry).live.remove(&id);
            }),
            shared: self.inner.cluster.as_ref().map(|c| worker::Shared {
                redis: c.redis().clone(),
                replica: c.replica().to_string(),
            }),
        };
        let mut worker = Worker::new(ctx, Arc::clone(&s), upstream, decoder);
        if let Some((pcm, from_ms, next_sentence)) = resume {
            worker = worker.resuming(&pcm, from_ms, next_sentence);
        }
        self.sessions().live.insert(id, s);
        self.inner
            .tasks
            .spawn(tracing::Instrument::instrument(worker.run(), span));
    }
}

/// The span every log line a session causes carries (its worker, its provider stream's tasks):
/// session id, provider name, epoch.
pub(crate) fn session_span(id: &str, provider: &str, epoch: u64) -> tracing::Span {
    tracing::info_span!("session", id = %id, provider = %provider, epoch)
}

/// Chunk 0 of a `wav` session must be a RIFF/WAVE header.
fn check_wav_header(format: AudioFormat, seq: u64, body: &[u8]) -> Result<(), SessionError> {
    if format == AudioFormat::Wav
        && seq == 0
        && body.len() >= 12
        && (&body[0..4] != b"RIFF" || &body[8..12] != b"WAVE")
    {
        return Err(SessionError::UnsupportedAudio(
            "chunk 0 of a \"wav\" session must start with a RIFF/WAVE header".into(),
        ));
    }
    Ok(())
}

/// Counts a held long-poll until dropped (also when the request is abandoned mid-hold).
struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock_registry(r: &Registry) -> MutexGuard<'_, Sessions> {
    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
