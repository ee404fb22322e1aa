//! Sessions shared by several replicas through Redis (`--redis-url`; issue 12), for hosts that
//! send each request to any replica. The API and its answers are the same as on one instance.
//!
//! - **One owner.** The replica that creates a session holds its lease (`lease_ms`, renewed
//!   every third of it) and runs its worker; every store write of that worker carries the
//!   session's epoch, and a write under an old epoch is refused (fencing), so a replica that
//!   lost the lease stops without touching the session.
//! - **Chunks on any replica.** An upload anywhere goes through the shared ingest script (same
//!   rules as the in-memory buffer), is stored before it is acknowledged, and wakes the owner
//!   over pub/sub; the owner takes chunks from the shared log in seq order.
//! - **Polls on any replica.** The owner stores every event (partials included) and announces
//!   it; a poll held on another replica waits on that announcement, then reads the store.
//! - **Takeover.** Every replica looks for unfinished sessions whose lease lapsed (the owner was
//!   killed, or drained and dropped it) and claims one with a new epoch; it resumes through the
//!   same path as after a restart (replay since the last final), so seq and cursor continue.

use super::error::SessionError;
use super::ingest::IngestError;
use super::state::{parse_id, Status};
use super::stored;
use super::view::{PollResult, SessionInfo, UploadAck};
use super::{CreateOptions, SessionManager};
use crate::audio::AudioFormat;
use crate::store::redis::RedisStore;
use crate::store::redis::EVENTS_CHANNEL;
use crate::store::redis_coord::{IngestLimits, Offer, SentenceEnd, WAKE_CHANNEL};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Replicas sharing sessions: the Redis engine, this replica's name, the lease time, and the
/// long-polls this replica holds for sessions other replicas run.
pub struct Cluster {
    redis: RedisStore,
    replica: String,
    lease_ms: u64,
    /// Session id → newest announced event seq, while polls wait for it here.
    waiters: Mutex<HashMap<String, (watch::Sender<u64>, usize)>>,
}

impl Cluster {
    /// A replica named `replica` (unique among the replicas: the lease holder's name) whose
    /// leases last `lease_ms`.
    pub fn new(redis: RedisStore, replica: String, lease_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            redis,
            replica,
            lease_ms,
            waiters: Mutex::new(HashMap::new()),
        })
    }

    /// The Redis engine.
    pub fn redis(&self) -> &RedisStore {
        &self.redis
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Lease time, ms.
    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<String, (watch::Sender<u64>, usize)>> {
        self.waiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to announcements of session `id`'s events until the guard drops.
    fn watch(self: &Arc<Self>, id: &str) -> Watch {
        let mut w = self.waiters();
        let entry = w
            .entry(id.to_string())
            .or_insert_with(|| (watch::Sender::new(0), 0));
        entry.1 += 1;
        Watch {
            rx: entry.0.subscribe(),
            cluster: Arc::clone(self),
            id: id.to_string(),
        }
    }

    fn announce(&self, id: &str, seq: u64) {
        if let Some((tx, _)) = self.waiters().get(id) {
            tx.send_modify(|v| *v = (*v).max(seq));
        }
    }

    /// Wakes every waiting poll (after the announcement channel was re-established: what
    /// was announced meanwhile is read from the store).
    fn announce_all(&self) {
        for (tx, _) in self.waiters().values() {
            tx.send_replace(u64::MAX);
        }
    }
}

/// A poll's subscription to one session's announcements.
struct Watch {
    rx: watch::Receiver<u64>,
    cluster: Arc<Cluster>,
    id: String,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut w = self.cluster.waiters();
        if let Some(entry) = w.get_mut(&self.id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                w.remove(&self.id);
            }
        }
    }
}

impl SessionManager {
    fn ingest_limits(&self) -> IngestLimits {
        let l = &self.inner.limits;
        IngestLimits {
            window: l.reorder_window,
            max_buffered: l.max_buffered_bytes,
            per_s: l.max_chunks_per_s,
        }
    }

    /// `upload` with replicas: the chunk goes through the shared ingest script and is stored
    /// before the answer; the owner is woken.
    pub(super) async fn upload_shared(
        &self,
        c: &Arc<Cluster>,
        id: &str,
        token: Option<&str>,
        seq: u64,
        last: bool,
        body: Bytes,
    ) -> Result<UploadAck, SessionError> {
        let uuid = parse_id(id)?;
        let local = self.live(&uuid);
        let format = match &local {
            Some(s) => {
                s.check_token(token)?;
                s.touch();
                s.format
            }
            None => {
                let rec = stored::record(&*self.inner.store, id, token).await?;
                let opts: CreateOptions = serde_json::from_str(&rec.options_json)
                    .map_err(|e| crate::store::StoreError::Corrupt(format!("options: {e}")))?;
                AudioFormat::parse(opts.format.as_deref().unwrap_or("pcm"))
                    .map_err(SessionError::UnsupportedAudio)?
            }
        };
        super::check_wav_header(format, seq, &body)?;
        let limits = self.ingest_limits();
        let offer = c.redis.offer_chunk(id, seq, last, &body, limits).await?;
        let (acked, duplicate) = match offer {
            Offer::New { acked } => (acked, false),
            Offer::Duplicate { acked } => (acked, true),
            Offer::Conflict => return Err(IngestError::Conflict { seq }.into()),
            Offer::OutOfWindow { expected } => {
                return Err(IngestError::OutOfWindow {
                    seq,
                    expected,
                    window: limits.window.max(1),
                }
                .into())
            }
            Offer::AfterLast(seq, last) => return Err(IngestError::AfterLast { seq, last }.into()),
            Offer::Backpressure { buffered } => {
                return Err(IngestError::Backpressure {
                    buffered,
                    max: limits.max_buffered,
                }
                .into())
            }
            Offer::RateLimited => {
                return Err(SessionError::RateLimited {
                    per_s: limits.per_s,
                })
            }
            Offer::Closed(status) => {
                return Err(SessionError::Closed {
                    id: id.to_string(),
                    status,
                })
            }
            Offer::Gone => return Err(SessionError::NotFound(id.to_string())),
        };
        if !duplicate || last {
            self.wake_owner(c, id).await;
        }
        Ok(UploadAck {
            acked_seq: acked,
            duplicate,
        })
    }

    /// Tells the session's owner new chunks (or the end of the audio) are stored: directly
    /// when it runs here, else over pub/sub (the owner also looks on every tick).
    async fn wake_owner(&self, c: &Cluster, id: &str) {
        let local = parse_id(id).ok().and_then(|u| self.live(&u));
        // A session this replica lost (fenced) is another replica's: announce it.
        if let Some(s) = local.filter(|s| !s.fenced.is_cancelled()) {
            s.wake.notify_one();
        } else if let Err(e) = c.redis.publish_wake(id, "chunk").await {
            tracing::warn!(error = %e, "announcing a chunk failed; the owner finds it on its next tick");
        }
    }

    /// `finish` with replicas.
    pub(super) async fn finish_shared(
        &self,
        c: &Arc<Cluster>,
        id: &str,
        token: Option<&str>,
    ) -> Result<SessionInfo, SessionError> {
        match self.live(&parse_id(id)?) {
            Some(s) => s.check_token(token)?,
            None => drop(stored::record(&*self.inner.store, id, token).await?),
        }
        c.redis.request_finish(id).await?;
        self.wake_owner(c, id).await;
        self.info(id, token).await
    }

    /// `finalize` with replicas: recorded beside the chunk log for the owner, who takes it
    /// with the chunks and ends the sentence at its place in the audio.
    pub(super) async fn finalize_shared(
        &self,
        c: &Arc<Cluster>,
        id: &str,
        token: Option<&str>,
        seq: Option<u64>,
    ) -> Result<Option<u64>, SessionError> {
        match self.live(&parse_id(id)?) {
            Some(s) => s.check_token(token)?,
            None => drop(stored::record(&*self.inner.store, id, token).await?),
        }
        let window = self.inner.limits.reorder_window;
        let at = match c.redis.request_sentence_end(id, seq, window).await? {
            SentenceEnd::After(at) => Some(at),
            SentenceEnd::NoAudio => None,
            SentenceEnd::NotOpen(status) => {
                return Err(SessionError::Closed {
                    id: id.into(),
                    status,
                })
            }
            SentenceEnd::AfterLast(last) => {
                let seq = seq.unwrap_or(last + 1);
                return Err(IngestError::AfterLast { seq, last }.into());
            }
            SentenceEnd::OutOfWindow(expected) => {
                let seq = seq.unwrap_or(expected);
                return Err(IngestError::OutOfWindow {
                    seq,
                    expected,
                    window,
                }
                .into());
            }
        };
        self.wake_owner(c, id).await;
        Ok(at)
    }

    /// `cancel` with replicas: recorded in the store (a replica taking the session over
    /// honours it too), then waits briefly for the owner to record the end.
    pub(super) async fn cancel_shared(
        &self,
        c: &Arc<Cluster>,
        id: &str,
        token: Option<&str>,
    ) -> Result<SessionInfo, SessionError> {
        let local = self.live(&parse_id(id)?);
        let rec = match &local {
            Some(s) => {
                s.check_token(token)?;
                None
            }
            None => Some(stored::record(&*self.inner.store, id, token).await?),
        };
        if rec.as_ref().is_some_and(|r| r.ended_at_ms.is_some()) {
            return self.info(id, token).await;
        }
        let mut watch = c.watch(id);
        c.redis.request_cancel(id).await?;
        if let Some(s) = local {
            s.cancel.cancel();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match self.inner.store.get_session(id).await {
                    Ok(Some(r)) if r.ended_at_ms.is_none() => {}
                    _ => return,
                }
                if watch.rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.info(id, token).await
    }

    /// A long-poll of a session another replica runs: held here until its owner announces an
    /// event past `after` (or the hold ends), then answered from the store.
    pub(super) async fn poll_shared(
        &self,
        c: &Arc<Cluster>,
        id: &str,
        token: Option<&str>,
        after: u64,
        wait: Option<Duration>,
    ) -> Result<PollResult, SessionError> {
        let mut watch = c.watch(id); // before reading: no announcement is missed
        let first = stored::poll(&*self.inner.store, id, token, after).await?;
        if !first.events.is_empty()
            || first.done
            || first.status != Status::Open.as_str() && first.status != Status::Finishing.as_str()
        {
            return Ok(first);
        }
        // The poll counts as activity for the session's idle timeout, wherever it runs.
        if let Err(e) = c.redis.publish_wake(id, "poll").await {
            tracing::debug!(error = %e, "announcing a poll failed");
        }
        self.inner.waiting.fetch_add(1, Ordering::Relaxed);
        let _held = super::Held(&self.inner.waiting);
        tokio::select! {
            _ = watch.rx.wait_for(|last| *last > after) => {}
            () = tokio::time::sleep(self.inner.limits.hold(wait)) => {}
            () = self.inner.shutdown.cancelled() => {}
        }
        stored::poll(&*self.inner.store, id, token, after).await
    }

    /// Runs the replica's background tasks: the announcement listener, lease renewal and
    /// takeover of sessions whose lease lapsed. They stop at shutdown.
    pub fn start_cluster_tasks(&self) {
        let Some(c) = self.inner.cluster.clone() else {
            return;
        };
        let (m, c1) = (self.clone(), Arc::clone(&c));
        tokio::spawn(async move { m.listen(c1).await });
        let (m, c2) = (self.clone(), Arc::clone(&c));
        tokio::spawn(async move { m.renew_leases(c2).await });
        let m = self.clone();
        tokio::spawn(async move { m.take_over(c).await });
    }

    /// Hears event announcements (wakes polls held here) and owner wake-ups (chunks stored,
    /// cancels, polls elsewhere); reconnects after a loss.
    async fn listen(&self, c: Arc<Cluster>) {
        let shutdown = self.inner.shutdown.clone();
        while !shutdown.is_cancelled() {
            let ps = match c.redis.subscribe().await {
                Ok(ps) => ps,
                Err(e) => {
                    tracing::warn!(error = %e, "subscribing to announcements failed; retrying");
                    let _ = shutdown
                        .run_until_cancelled(tokio::time::sleep(Duration::from_millis(500)))
                        .await;
                    continue;
                }
            };
            // Whatever was announced while unsubscribed is in the store: look again.
            c.announce_all();
            for s in self.sessions().live.values() {
                s.wake.notify_one();
            }
            let mut stream = ps.into_on_message();
            loop {
                let msg = tokio::select! {
                    m = stream.next() => m,
                    () = shutdown.cancelled() => return,
                };
                let Some(msg) = msg else { break };
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                let Some((id, what)) = payload.split_once(' ') else {
                    continue;
                };
                match msg.get_channel_name() {
                    EVENTS_CHANNEL => {
                        if let Ok(seq) = what.parse() {
                            c.announce(id, seq);
                        }
                    }
                    WAKE_CHANNEL => {
                        let Some(s) = parse_id(id).ok().and_then(|u| self.live(&u)) else {
                            continue;
                        };
                        match what {
                            "cancel" => s.cancel.cancel(),
                            "chunk" => {
                                s.touch();
                                s.wake.notify_one();
                            }
                            _ => s.touch(),
                        }
                    }
                    _ => {}
                }
            }
            tracing::warn!("announcement channel lost; resubscribing");
        }
    }

    /// Renews the leases of the sessions this replica runs every third of `lease_ms`; a lease
    /// found lost stops its session here.
    async fn renew_leases(&self, c: Arc<Cluster>) {
        let shutdown = self.inner.shutdown.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(c.lease_ms / 3));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let held: Vec<_> = self
                .sessions()
                .live
                .values()
                .filter(|s| s.is_open() && !s.fenced.is_cancelled())
                .map(|s| (s.id.to_string(), s.epoch(), Arc::clone(s)))
                .collect();
            if held.is_empty() {
                continue;
            }
            let ids: Vec<_> = held.iter().map(|(id, e, _)| (id.clone(), *e)).collect();
            match c.redis.renew(&c.replica, &ids, c.lease_ms).await {
                Ok(kept) => {
                    for ((id, _, s), kept) in held.iter().zip(kept) {
                        if !kept {
                            tracing::warn!(session_id = %id, "lease lost; another replica runs the session");
                            s.fenced.cancel();
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, cause = ?e, "renewing leases failed"),
            }
        }
    }

    /// Looks for unfinished sessions nobody holds the lease of, every quarter of `lease_ms`,
    /// and resumes those it claims (while this replica has room for them).
    async fn take_over(&self, c: Arc<Cluster>) {
        let shutdown = self.inner.shutdown.clone();
        let period = Duration::from_millis((c.lease_ms / 4).max(50));
        loop {
            // Jitter, so replicas do not all race for the same session at once.
            let jitter =
                Duration::from_millis(rand::random::<u64>() % (period.as_millis() as u64 / 2 + 1));
            if shutdown
                .run_until_cancelled(tokio::time::sleep(period + jitter))
                .await
                .is_none()
            {
                return;
            }
            let ids = match c.redis.unleased().await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "looking for sessions to take over failed");
                    continue;
                }
            };
            for id in ids {
                if shutdown.is_cancelled() || self.open_count() >= self.inner.limits.max_sessions {
                    break;
                }
                if parse_id(&id).ok().and_then(|u| self.live(&u)).is_some() {
                    continue;
                }
                if let Err(e) = self.claim_one(&c, &id).await {
                    tracing::warn!(session_id = %id, error = %e, "taking a session over failed");
                }
            }
        }
    }

    async fn claim_one(&self, c: &Cluster, id: &str) -> Result<(), SessionError> {
        let Some(epoch) = c.redis.claim(id, &c.replica, c.lease_ms).await? else {
            return Ok(()); // another replica was first, or it ended
        };
        let Some(rec) = self.inner.store.get_session(id).await? else {
            return Ok(());
        };
        tracing::info!(session_id = %id, epoch, "taking over a session whose lease lapsed");
        match self.resume(rec.clone(), epoch).await {
            Ok(()) => {
                if c.redis.cancel_requested(id).await? {
                    if let Some(s) = parse_id(id).ok().and_then(|u| self.live(&u)) {
                        s.cancel.cancel();
                    }
                }
            }
            Err(why) => {
                tracing::warn!(session_id = %id, %why, "cannot resume session");
                let events = self.inner.store.events_after(id, 0).await?;
                let last_seq = events.last().map_or(0, |e| e.seq);
                self.fail_orphan(&rec, last_seq, &why).await?;
            }
        }
        Ok(())
    }
}
