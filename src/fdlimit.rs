//! The process's file-descriptor budget (`RLIMIT_NOFILE`, what `ulimit -n` sets).
//!
//! Every connection, upstream provider socket, SQLite file and kept-open chunk file is a
//! descriptor, and past the soft limit `accept` and `open` fail with `EMFILE`: new clients then
//! wait in the listen backlog and stores refuse writes. Many hosts still start services with a
//! soft limit of 1024 under a much higher hard limit, so at start voxpoll raises its soft limit
//! to the hard one (what Go's runtime and nginx's `worker_rlimit_nofile` do), and warns when the
//! limit is still below what the configured limits may hold open ([`needed`]). `GET /ready`
//! reports the limit, that estimate and the descriptors open now.

use crate::config::Config;
use serde::{Deserialize, Serialize};

/// Descriptors kept for what the other terms do not count: the listener, the runtime's epoll
/// and wake-up descriptors, the model file, standard streams, blocking threads' files.
pub const RESERVE: u64 = 64;

/// Connections to Redis: the multiplexed command connection and the event subscriber
/// ([`crate::store::redis`]).
pub const REDIS_CONNECTIONS: u64 = 2;

/// The budget as `GET /ready` shows it (`file_descriptors`; `voxpoll doctor` reads it back).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FdBudget {
    /// The soft `RLIMIT_NOFILE` now; `None` where the platform has none.
    pub limit: Option<u64>,
    /// What the configured limits may hold open at once ([`needed`]).
    pub needed: u64,
    /// Descriptors open now (Linux: entries of `/proc/self/fd`); `None` elsewhere.
    pub open: Option<u64>,
}

impl FdBudget {
    /// The budget now, for `config`.
    pub fn now(config: &Config) -> Self {
        Self {
            limit: soft_limit(),
            needed: needed(config),
            open: open_now(),
        }
    }

    /// False when the limit is known and below [`FdBudget::needed`].
    pub fn enough(&self) -> bool {
        self.limit.is_none_or(|l| l >= self.needed)
    }
}

/// Descriptors the configured limits may hold open at once: `max_connections` client
/// connections, one upstream socket per open session (`max_sessions`; cloud providers hold a
/// WebSocket or HTTP connection per stream), with SQLite the kept-open chunk files
/// ([`crate::store::OPEN_CHUNK_FILES`]) and three files (database, WAL, shared memory)
/// per pooled connection ([`crate::store::sqlite::POOL_SIZE`]), with Redis
/// [`REDIS_CONNECTIONS`], plus [`RESERVE`].
pub fn needed(config: &Config) -> u64 {
    let redis = config
        .redis_url
        .as_ref()
        .is_some_and(|u| !u.expose().is_empty());
    let store = if redis {
        REDIS_CONNECTIONS
    } else {
        crate::store::OPEN_CHUNK_FILES as u64 + 3 * crate::store::sqlite::POOL_SIZE as u64
    };
    config.max_connections as u64 + config.max_sessions as u64 + store + RESERVE
}

/// Raises the soft limit to the hard limit and logs the budget for `config`: `info` when it
/// suffices, `warn` (with what to change) when it does not. Returns the budget after raising.
/// A failed raise is logged and leaves the limit as it was.
pub fn raise_and_check(config: &Config) -> FdBudget {
    let before = soft_limit();
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "cannot raise the file-descriptor limit");
    }
    let budget = FdBudget::now(config);
    let raised_from = before.filter(|b| Some(*b) != budget.limit);
    if budget.enough() {
        tracing::info!(
            limit = budget.limit,
            raised_from,
            needed = budget.needed,
            "file-descriptor limit"
        );
    } else {
        tracing::warn!(
            limit = budget.limit,
            raised_from,
            needed = budget.needed,
            max_connections = config.max_connections,
            max_sessions = config.max_sessions,
            "the file-descriptor limit is below what the configured limits may hold open: past \
             it new connections wait unanswered and chunk writes fail; raise the hard limit \
             (`ulimit -Hn`, systemd `LimitNOFILE=`, `docker run --ulimit nofile=N:N`) or lower \
             max_connections / max_sessions"
        );
    }
    budget
}

/// The soft `RLIMIT_NOFILE`, where the platform has one.
fn soft_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// Descriptors open now (Linux `/proc/self/fd`, less the one reading it).
fn open_now() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some((entries.count() as u64).saturating_sub(1))
}
