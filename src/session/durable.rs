//! Durable acknowledgement of chunks: an upload is answered only after its chunk is in the
//! chunk store (unless `--durable-acks false`, which writes behind): the session's chunk file
//! beside the SQLite database, or Redis.
//! One writer task writes every chunk waiting at that moment at once (group commit: one write
//! per session's file, one Redis transaction), so concurrent uploads share one write instead of
//! queueing for one each; while a write runs, the next batch gathers. The chunks let a restarted process resume the session
//! (see `SessionManager::resume_orphans`); they are deleted when the session ends.

use crate::store::{ChunkRecord, SessionStore, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most chunks in one group commit.
const MAX_BATCH: usize = 512;

struct Pending {
    rec: ChunkRecord,
    done: oneshot::Sender<Result<(), String>>,
}

/// Handle to the writer task. Cheap to clone.
#[derive(Clone)]
pub struct ChunkWriter {
    tx: mpsc::Sender<Pending>,
}

impl ChunkWriter {
    /// Starts the writer task on `store`. It ends when every handle is dropped.
    pub fn spawn(store: Arc<dyn SessionStore>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut recs = vec![first.rec];
                let mut dones = vec![first.done];
                while recs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(p) => {
                            recs.push(p.rec);
                            dones.push(p.done);
                        }
                        Err(_) => break,
                    }
                }
                let result = store.put_chunks(recs).await.map_err(|e| {
                    tracing::error!(error = %e, cause = ?e, "writing chunks failed");
                    e.to_string()
                });
                for d in dones {
                    let _ = d.send(result.clone());
                }
            }
        });
        Self { tx }
    }

    /// Queues one chunk for the next commit without waiting for it (`--durable-acks false`);
    /// waits only for room in the queue. A failed commit is logged by the writer.
    ///
    /// # Errors
    /// The writer stopped.
    pub async fn write_behind(&self, rec: ChunkRecord) -> Result<(), StoreError> {
        let (done, _ignored) = oneshot::channel();
        self.tx
            .send(Pending { rec, done })
            .await
            .map_err(|_| StoreError::Pool("chunk writer stopped".into()))
    }

    /// Writes one chunk; returns once it is committed (with whatever else was waiting).
    ///
    /// # Errors
    /// The database write failed, or the writer stopped.
    pub async fn write(&self, rec: ChunkRecord) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending { rec, done })
            .await
            .map_err(|_| StoreError::Pool("chunk writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Pool("chunk writer stopped".into()))?
            .map_err(StoreError::Pool)
    }
}
