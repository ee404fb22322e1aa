//! The worker's side of sessions shared by replicas (`cluster.rs`): taking chunks from the
//! shared chunk log, and handing the session over when this replica drains.

use super::Worker;
use crate::session::state::Status;
use crate::store::redis::RedisStore;

/// Chunks taken from the shared chunk log per pull.
const TAKE_BATCH: u64 = 64;

/// What the owner of a shared session needs of the other replicas (see `cluster.rs`).
pub(in crate::session) struct Shared {
    /// The Redis engine.
    pub redis: RedisStore,
    /// This replica's id (the lease holder name).
    pub replica: String,
}

impl Worker {
    /// Moves chunks any replica stored in the shared chunk log into the local ingest buffer, in
    /// seq order; the end of the audio once every chunk up to it is taken.
    pub(super) async fn pull(&mut self) {
        let Some(sh) = &self.ctx.shared else { return };
        let id = self.s.id.to_string();
        let from = self.s.lock().ingest.expected();
        let taken = match sh.redis.take_chunks(&id, from, TAKE_BATCH).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "taking chunks from the shared log failed; retrying on the next tick");
                return;
            }
        };
        let mut st = self.s.lock();
        let full = taken.chunks.len() as u64 == TAKE_BATCH;
        for c in taken.chunks {
            if let Err(e) = st.ingest.offer(c.seq, c.data, c.last) {
                tracing::error!(error = %e, seq = c.seq, "a chunk of the shared log was refused");
            }
        }
        for seq in taken.sentence_ends {
            // Checked by the script already; a seq now outside the window ends at once.
            let _ = st.ingest.request_sentence_end(Some(seq));
        }
        if taken.finish && st.status == Status::Open {
            st.status = Status::Finishing;
        }
        if taken.complete {
            st.ingest.request_finish();
        }
        drop(st);
        if full {
            self.s.wake.notify_one(); // more to take once this batch is fed
        }
    }

    /// Drops this replica's lease (drain): the session is another replica's from now on.
    pub(super) async fn hand_off(&mut self) {
        let Some(sh) = &self.ctx.shared else { return };
        let id = self.s.id.to_string();
        if let Err(e) = sh.redis.release(&id, &sh.replica, self.s.epoch()).await {
            tracing::warn!(error = %e, "dropping the lease failed; it lapses on its own");
        }
        self.s.fenced.cancel();
    }
}
