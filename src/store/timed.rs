//! A [`SessionStore`] that times every write of the store it wraps into the
//! `voxpoll_store_commit_duration_seconds` histogram (labels `engine`, `op`); reads pass through.

use super::{ChunkRecord, SessionProgress, SessionRecord, SessionStore, StoreError, StoredEvent};
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

/// `inner` with its writes timed; `engine` (`sqlite`, `redis`) labels them.
pub struct Timed {
    inner: Arc<dyn SessionStore>,
    engine: &'static str,
}

impl Timed {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn SessionStore>, engine: &'static str) -> Arc<dyn SessionStore> {
        Arc::new(Self { inner, engine })
    }

    async fn time<T>(&self, op: &'static str, fut: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let out = fut.await;
        metrics::histogram!(crate::metrics::STORE_COMMIT, "engine" => self.engine, "op" => op)
            .record(started.elapsed().as_secs_f64());
        out
    }
}

#[async_trait::async_trait]
impl SessionStore for Timed {
    async fn insert_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        self.time("insert_session", self.inner.insert_session(rec))
            .await
    }
    async fn update_progress(&self, id: &str, p: &SessionProgress) -> Result<(), StoreError> {
        self.time("update_progress", self.inner.update_progress(id, p))
            .await
    }
    async fn append_event(&self, id: &str, ev: &StoredEvent) -> Result<(), StoreError> {
        self.time("append_event", self.inner.append_event(id, ev))
            .await
    }
    async fn end_session(
        &self,
        id: &str,
        p: &SessionProgress,
        end: &StoredEvent,
    ) -> Result<(), StoreError> {
        self.time("end_session", self.inner.end_session(id, p, end))
            .await
    }
    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        self.inner.get_session(id).await
    }
    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.events_after(id, after).await
    }
    async fn unfinished(&self) -> Result<Vec<(SessionRecord, u64)>, StoreError> {
        self.inner.unfinished().await
    }
    fn fenced(&self, epoch: u64) -> Arc<dyn SessionStore> {
        Self::wrap(self.inner.fenced(epoch), self.engine)
    }
    async fn check_writable(&self) -> Result<(), StoreError> {
        self.inner.check_writable().await
    }
    async fn put_chunks(&self, chunks: Vec<ChunkRecord>) -> Result<(), StoreError> {
        self.time("put_chunks", self.inner.put_chunks(chunks)).await
    }
    async fn chunks(&self, id: &str) -> Result<Vec<ChunkRecord>, StoreError> {
        self.inner.chunks(id).await
    }
    async fn reserve_seqs(&self, id: &str, upto: u64) -> Result<(), StoreError> {
        self.time("reserve_seqs", self.inner.reserve_seqs(id, upto))
            .await
    }
    async fn reserved_seqs(&self, id: &str) -> Result<u64, StoreError> {
        self.inner.reserved_seqs(id).await
    }
}
