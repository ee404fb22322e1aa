//! [`SessionStore`] on SQLite (rusqlite, pooled by deadpool). Queries are synchronous functions
//! run through one async [`Db::call`]; the schema (`schema.sql`) is embedded and applied at open.

use super::chunk_files::ChunkFiles;
use super::{ChunkRecord, SessionProgress, SessionRecord, SessionStore, StoreError, StoredEvent};
use deadpool::managed::{Metrics, RecycleError, RecycleResult};
use deadpool::Runtime;
use deadpool_sync::SyncWrapper;
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The embedded schema; `PRAGMA user_version` records that it was applied.
const SCHEMA: &str = include_str!("../../schema.sql");
const SCHEMA_VERSION: i64 = 3;

/// The sessions a restart resumes (and whose chunks are kept): the one definition of
/// "running" for both.
const RUNNING: &str = "status IN ('open', 'finishing')";

/// When SQLite syncs to disk (`PRAGMA synchronous`, <https://sqlite.org/pragma.html#pragma_synchronous>),
/// in WAL mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Synchronous {
    /// `NORMAL`: a commit is in the WAL file before it is answered, so it survives the
    /// process being killed (kill -9, OOM); the WAL is synced at checkpoints only, so power
    /// loss can take back the last commits. No fsync per commit.
    #[default]
    Normal,
    /// `FULL`: every commit also waits for an fsync of the WAL, so it survives power loss too.
    Full,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Self::Normal => "NORMAL",
            Self::Full => "FULL",
        }
    }
}

/// Creates pooled connections with their settings applied once (foreign keys on,
/// [`wait_for_lock`] as busy handler, `synchronous`), and hands them out again without a round
/// trip: deadpool-sqlite's own manager ran a `SELECT` on a blocking thread at every checkout,
/// 3 % of the CPU of 200 streaming sessions in `scripts/bench-gateway` S6.
struct Manager {
    path: PathBuf,
    sync: Synchronous,
}

impl deadpool::managed::Manager for Manager {
    type Type = SyncWrapper<Connection>;
    type Error = rusqlite::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        let (path, sync) = (self.path.clone(), self.sync);
        SyncWrapper::new(Runtime::Tokio1, move || {
            let c = Connection::open(path)?;
            c.busy_handler(Some(wait_for_lock))?;
            c.pragma_update(None, "foreign_keys", true)?;
            c.pragma_update(None, "synchronous", sync.pragma())?;
            c.pragma_update(None, "wal_autocheckpoint", AUTOCHECKPOINT_PAGES)?;
            Ok(c)
        })
        .await
    }

    async fn recycle(&self, conn: &mut Self::Type, _: &Metrics) -> RecycleResult<Self::Error> {
        // A closure that panicked mid-transaction poisons the mutex: drop that connection.
        if conn.is_mutex_poisoned() {
            return Err(RecycleError::message("a query panicked on this connection"));
        }
        Ok(())
    }
}

type Pool = deadpool::managed::Pool<Manager>;

/// SQLite's busy handler: called with the number of earlier calls while another connection
/// holds the write lock; `true` retries. SQLite's own `busy_timeout` sleeps 1, 2, 5, 10 … ms
/// between tries, so a final's event write that met the chunk writer's commit (well under a
/// millisecond) waited milliseconds; this one looks again every 50 µs for the first 2 ms, then
/// every millisecond, and gives up (`SQLITE_BUSY`) after about 5 s.
fn wait_for_lock(calls: i32) -> bool {
    const FAST: i32 = 40;
    let pause = if calls < FAST {
        Duration::from_micros(50)
    } else {
        Duration::from_millis(1)
    };
    std::thread::sleep(pause);
    calls < FAST + 5_000
}

/// Pooled SQLite connections (deadpool's default would be 4 per core): reads run in
/// parallel, writes take SQLite's one write lock in turn. Each holds up to three files open.
pub const POOL_SIZE: usize = 8;

/// How often the background task checkpoints the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// How often the background task removes chunk files of sessions that are not running.
const SWEEP_EVERY: Duration = Duration::from_secs(300);

/// How long ago such a file must have been written last to be removed by a periodic sweep.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// WAL pages at which a committing connection checkpoints by itself (SQLite's default is
/// 1,000): only a backstop, should the background checkpoints fall behind.
const AUTOCHECKPOINT_PAGES: i64 = 16_384;

/// A pool of SQLite connections to one database file, with a background task that checkpoints
/// the WAL (passive: it waits for no reader or writer) every [`CHECKPOINT_EVERY`]. SQLite's
/// default is that the commit which passes 1,000 WAL pages copies them into the database file
/// itself, holding the write lock: under 200 streaming sessions that is a 4 MB copy about three
/// times a second, in the way of chunk acks and finals.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// Running sessions' chunks, beside the database file (`chunk_files`).
    chunks: Arc<ChunkFiles>,
    /// Stops the checkpoint task when the last clone is dropped.
    _checkpoints: Arc<tokio_util::sync::DropGuard>,
}

impl Db {
    /// Opens (creating if needed) the database at `path`, sets WAL mode and applies the schema;
    /// commits are synced as [`Synchronous::Normal`].
    ///
    /// # Errors
    /// The file cannot be opened or migrated.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, Synchronous::Normal).await
    }

    /// [`Db::open`] with the sync mode set.
    ///
    /// # Errors
    /// The file cannot be opened or migrated.
    pub async fn open_with(path: &Path, sync: Synchronous) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError::Pool(format!("creating {}: {e}", dir.display())))?;
        }
        let manager = Manager {
            path: path.to_path_buf(),
            sync,
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let stop = tokio_util::sync::CancellationToken::new();
        let db = Self {
            pool: pool.clone(),
            chunks: Arc::new(ChunkFiles::open(path, sync == Synchronous::Full)?),
            _checkpoints: Arc::new(stop.clone().drop_guard()),
        };
        db.call(migrate).await?;
        sweep_chunk_files(&pool, &db.chunks, Duration::ZERO).await?;
        tokio::spawn(maintain(pool, Arc::clone(&db.chunks), stop));
        Ok(db)
    }

    /// Runs `f` on a pooled connection on a blocking thread. The only place rusqlite is called.
    ///
    /// # Errors
    /// Pool failures and whatever `f` returns.
    pub async fn call<F, R>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Connection) -> Result<R, rusqlite::Error> + Send + 'static,
        R: Send + 'static,
    {
        call_on(&self.pool, f).await
    }
}

/// [`Db::call`] on `pool`, for the background task that holds no `Db`.
async fn call_on<F, R>(pool: &Pool, f: F) -> Result<R, StoreError>
where
    F: FnOnce(&mut Connection) -> Result<R, rusqlite::Error> + Send + 'static,
    R: Send + 'static,
{
    let conn = pool
        .get()
        .await
        .map_err(|e| StoreError::Pool(e.to_string()))?;
    conn.interact(f)
        .await
        .map_err(|e| StoreError::Pool(e.to_string()))?
        .map_err(StoreError::from)
}

/// [`Db::files`] on `files`, for the background task that holds no `Db`.
async fn files_on<F, R>(files: &Arc<ChunkFiles>, f: F) -> Result<R, StoreError>
where
    F: FnOnce(&ChunkFiles) -> Result<R, StoreError> + Send + 'static,
    R: Send + 'static,
{
    let files = Arc::clone(files);
    tokio::task::spawn_blocking(move || f(&files))
        .await
        .map_err(|e| StoreError::Io(e.to_string()))?
}

impl Db {
    /// Runs `f` on the chunk files on a blocking thread (file I/O, an fdatasync with
    /// `synchronous=full`).
    ///
    /// # Errors
    /// Whatever `f` returns; a panicked blocking task.
    async fn files<F, R>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&ChunkFiles) -> Result<R, StoreError> + Send + 'static,
        R: Send + 'static,
    {
        files_on(&self.chunks, f).await
    }
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] and sweeps the chunk files every
/// [`SWEEP_EVERY`] until `stop`.
async fn maintain(pool: Pool, chunks: Arc<ChunkFiles>, stop: tokio_util::sync::CancellationToken) {
    let mut swept = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECKPOINT_EVERY) => {}
            () = stop.cancelled() => return,
        }
        if swept.elapsed() >= SWEEP_EVERY {
            swept = tokio::time::Instant::now();
            if let Err(e) = sweep_chunk_files(&pool, &chunks, SWEEP_MIN_AGE).await {
                tracing::warn!(error = %e, "sweeping chunk files failed");
            }
        }
        let Ok(conn) = pool.get().await else { continue };
        let done = conn
            .interact(|c| c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())))
            .await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Removes the chunk files of sessions that are not running and were last written at least
/// `min_age` ago: ended sessions whose removal a crash cut short, or a chunk written just after
/// its session ended. Only running sessions are resumed, so these are of no use.
///
/// # Errors
/// The query or the directory listing failed.
async fn sweep_chunk_files(
    pool: &Pool,
    chunks: &Arc<ChunkFiles>,
    min_age: Duration,
) -> Result<(), StoreError> {
    let running = call_on(pool, |c| {
        let mut st = c.prepare(&format!("SELECT id FROM sessions WHERE {RUNNING}"))?;
        let ids = st.query_map([], |r| r.get::<_, String>(0))?;
        ids.collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let removed = files_on(chunks, move |f| f.remove_all_but(&running, min_age)).await?;
    if removed > 0 {
        tracing::info!(removed, "removed the chunk files of ended sessions");
    }
    Ok(())
}

fn migrate(c: &mut Connection) -> Result<(), rusqlite::Error> {
    c.pragma_update(None, "journal_mode", "WAL")?;
    let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < SCHEMA_VERSION {
        let tx = c.transaction()?;
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        tx.commit()?;
    }
    Ok(())
}

/// A u64 (ms, seq) as SQLite INTEGER, saturating.
pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<SessionRecord, rusqlite::Error> {
    Ok(SessionRecord {
        id: r.get(0)?,
        user_id: r.get(1)?,
        token_sha256: r.get(2)?,
        provider: r.get(3)?,
        engine: r.get(4)?,
        options_json: r.get(5)?,
        status: r.get(6)?,
        epoch: r.get::<_, i64>(7)? as u64,
        acked_seq: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        audio_ms: r.get::<_, i64>(9)? as u64,
        transcript: r.get(10)?,
        end_reason: r.get(11)?,
        created_at_ms: r.get::<_, i64>(12)? as u64,
        updated_at_ms: r.get::<_, i64>(13)? as u64,
        ended_at_ms: r.get::<_, Option<i64>>(14)?.map(|v| v as u64),
    })
}

const SELECT_SESSION: &str =
    "SELECT id, user_id, token_sha256, provider, engine, options_json, status, epoch, acked_seq, \
     audio_ms, transcript, end_reason, created_at_ms, updated_at_ms, ended_at_ms FROM sessions";

fn write_progress(c: &Connection, id: &str, p: &SessionProgress) -> Result<(), rusqlite::Error> {
    c.prepare_cached(
        // A status never goes back: `finishing` (stored before finish is answered) stays
        // `finishing` under a progress write from an older snapshot, and an ended one stays ended.
        "UPDATE sessions SET status = CASE WHEN ended_at_ms IS NOT NULL THEN status \
         WHEN status = 'finishing' AND ?2 = 'open' THEN status ELSE ?2 END, acked_seq = ?3, audio_ms = ?4, transcript = ?5, \
         end_reason = COALESCE(?6, end_reason), updated_at_ms = ?7, \
         ended_at_ms = CASE WHEN ?6 IS NULL THEN ended_at_ms ELSE ?7 END WHERE id = ?1",
    )?
    .execute(params![
            id,
            p.status,
            p.acked_seq.map(to_i64),
            to_i64(p.audio_ms),
            p.transcript,
            p.end_reason,
            to_i64(p.at_ms)
        ])?;
    Ok(())
}

fn insert_event(c: &Connection, id: &str, ev: &StoredEvent) -> Result<(), rusqlite::Error> {
    c.prepare_cached(
        "INSERT OR IGNORE INTO session_events (session_id, seq, event_json) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![id, to_i64(ev.seq), ev.json])?;
    Ok(())
}

#[async_trait::async_trait]
impl SessionStore for Db {
    async fn insert_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        let r = rec.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO sessions (id, user_id, token_sha256, provider, engine, options_json, status, epoch, \
                 acked_seq, audio_ms, transcript, end_reason, created_at_ms, updated_at_ms, ended_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    r.id, r.user_id, r.token_sha256, r.provider, r.engine, r.options_json, r.status, to_i64(r.epoch),
                    r.acked_seq.map(to_i64), to_i64(r.audio_ms), r.transcript, r.end_reason,
                    to_i64(r.created_at_ms), to_i64(r.updated_at_ms), r.ended_at_ms.map(to_i64)
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn update_progress(&self, id: &str, p: &SessionProgress) -> Result<(), StoreError> {
        let (id, p) = (id.to_string(), p.clone());
        self.call(move |c| write_progress(c, &id, &p)).await
    }

    async fn append_event(&self, id: &str, ev: &StoredEvent) -> Result<(), StoreError> {
        let (id, ev) = (id.to_string(), ev.clone());
        self.call(move |c| insert_event(c, &id, &ev)).await
    }

    async fn end_session(
        &self,
        id: &str,
        p: &SessionProgress,
        end: &StoredEvent,
    ) -> Result<(), StoreError> {
        let (id, p, end) = (id.to_string(), p.clone(), end.clone());
        let file_id = id.clone();
        self.call(move |c| {
            let tx = c.transaction()?;
            insert_event(&tx, &id, &end)?;
            write_progress(&tx, &id, &p)?;
            // An ended session is never resumed: its audio is not needed any more (rows
            // of databases written before the chunk files).
            tx.execute(
                "DELETE FROM session_chunks WHERE session_id = ?1",
                params![id],
            )?;
            tx.commit()
        })
        .await?;
        self.files(move |f| f.remove(&file_id)).await
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            c.query_row(
                &format!("{SELECT_SESSION} WHERE id = ?1"),
                params![id],
                row_to_record,
            )
            .optional()
        })
        .await
    }

    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, event_json FROM session_events WHERE session_id = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![id, to_i64(after)], |r| {
                Ok(StoredEvent { seq: r.get::<_, i64>(0)? as u64, json: r.get(1)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn unfinished(&self) -> Result<Vec<(SessionRecord, u64)>, StoreError> {
        self.call(|c| {
            let mut st = c.prepare(&format!(
                "{SELECT_SESSION} WHERE {RUNNING} ORDER BY created_at_ms"
            ))?;
            let recs: Vec<SessionRecord> =
                st.query_map([], row_to_record)?.collect::<Result<_, _>>()?;
            let mut out = Vec::with_capacity(recs.len());
            for r in recs {
                let max: i64 = c.query_row(
                    "SELECT COALESCE(MAX(seq), 0) FROM session_events WHERE session_id = ?1",
                    params![r.id],
                    |row| row.get(0),
                )?;
                out.push((r, max as u64));
            }
            Ok(out)
        })
        .await
    }

    async fn put_chunks(&self, chunks: Vec<ChunkRecord>) -> Result<(), StoreError> {
        if self.chunks.syncs() {
            self.files(move |f| f.append(&chunks)).await
        } else {
            // Without fdatasync an append is a copy into the page cache (a few µs per
            // session), cheaper than the two thread switches of the blocking pool
            // (`scripts/bench-gateway` S6).
            self.chunks.append(&chunks)
        }
    }

    async fn reserve_seqs(&self, id: &str, upto: u64) -> Result<(), StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE sessions SET seq_reserved = MAX(seq_reserved, ?2) WHERE id = ?1",
                params![id, to_i64(upto)],
            )
            .map(|_| ())
        })
        .await
    }

    async fn reserved_seqs(&self, id: &str) -> Result<u64, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT seq_reserved FROM sessions WHERE id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map(|v| v.unwrap_or(0) as u64)
        })
        .await
    }

    /// The session's chunk file, plus any `session_chunks` rows a version before the chunk
    /// files left for a session still running (the file's record of a seq wins).
    async fn chunks(&self, id: &str) -> Result<Vec<ChunkRecord>, StoreError> {
        let file_id = id.to_string();
        let mut from_file = self.files(move |f| f.read(&file_id)).await?;
        let id = id.to_string();
        let rows = self
            .call(move |c| {
                let mut st = c.prepare(
                    "SELECT seq, last, data FROM session_chunks WHERE session_id = ?1 ORDER BY seq",
                )?;
                let rows = st.query_map(params![id], |r| {
                    Ok(ChunkRecord {
                        session_id: id.clone(),
                        seq: r.get::<_, i64>(0)? as u64,
                        last: r.get(1)?,
                        data: r.get::<_, Vec<u8>>(2)?.into(),
                    })
                })?;
                rows.collect::<Result<Vec<_>, _>>()
            })
            .await?;
        if rows.is_empty() {
            return Ok(from_file);
        }
        let have: std::collections::HashSet<u64> = from_file.iter().map(|c| c.seq).collect();
        from_file.extend(rows.into_iter().filter(|r| !have.contains(&r.seq)));
        from_file.sort_by_key(|c| c.seq);
        Ok(from_file)
    }

    /// One process owns every session of a SQLite file: nothing to fence.
    fn fenced(&self, _epoch: u64) -> std::sync::Arc<dyn SessionStore> {
        std::sync::Arc::new(self.clone())
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        self.call(|c| c.execute_batch("BEGIN IMMEDIATE; ROLLBACK;"))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::{Db, Synchronous};
    use std::time::Duration;

    async fn settings(db: &Db) -> (i64, i64) {
        db.call(|c| {
            let get = |p: &str| c.pragma_query_value(None, p, |r| r.get::<_, i64>(0));
            Ok((get("synchronous")?, get("foreign_keys")?))
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn every_pooled_connection_carries_its_settings() {
        let dir = tempfile::tempdir().unwrap();
        // SQLite's values: synchronous NORMAL = 1, FULL = 2.
        for (sync, want) in [(Synchronous::Normal, 1), (Synchronous::Full, 2)] {
            let db = Db::open_with(&dir.path().join(format!("{sync:?}.db")), sync)
                .await
                .unwrap();
            // Two at once: the second runs on a fresh connection from the pool.
            let (a, b) = tokio::join!(settings(&db), settings(&db));
            for got in [a, b, settings(&db).await] {
                assert_eq!(got, (want, 1), "{sync:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_write_waits_for_another_connections_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("lock.db")).await.unwrap();
        db.call(|c| c.execute_batch("CREATE TABLE t (x INTEGER)"))
            .await
            .unwrap();
        let (locked_tx, locked) = std::sync::mpsc::channel();
        let holder = db.clone();
        let hold = tokio::spawn(async move {
            holder
                .call(move |c| {
                    let tx =
                        c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    tx.execute("INSERT INTO t VALUES (1)", [])?;
                    locked_tx.send(()).unwrap();
                    std::thread::sleep(Duration::from_millis(30));
                    tx.commit()
                })
                .await
        });
        tokio::task::spawn_blocking(move || locked.recv().unwrap())
            .await
            .unwrap();
        // Without a busy handler this write fails at once with SQLITE_BUSY.
        db.call(|c| c.execute("INSERT INTO t VALUES (2)", []))
            .await
            .unwrap();
        hold.await.unwrap().unwrap();
        let n: i64 = db
            .call(|c| c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(n, 2);
    }

    #[tokio::test]
    async fn the_wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.db");
        let db = Db::open(&path).await.unwrap();
        // About 2 MB in one commit: under SQLite's own 1,000-page threshold no commit would
        // copy it into the database file.
        db.call(|c| {
            c.execute_batch("CREATE TABLE t (b BLOB)")?;
            let tx = c.transaction()?;
            for _ in 0..320 {
                tx.execute("INSERT INTO t VALUES (?1)", [vec![7u8; 6400]])?;
            }
            tx.commit()
        })
        .await
        .unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        assert!(size() < 1 << 20, "not yet copied: {} bytes", size());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while size() < 2 << 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(size() >= 2 << 20, "database file {} bytes", size());
    }
}
