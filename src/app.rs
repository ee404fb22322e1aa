//! Wiring: builds the store, providers and session engine from [`Config`], and serves the routes
//! on a listener until a shutdown token fires.

use crate::config::Config;
use crate::http::AppState;
use crate::oneshot::Recognizer;
use crate::provider::embedded::{EmbeddedProvider, EmbeddedSettings};
use crate::provider::registry::{self, Providers};
use crate::provider::whisper::WhisperEngine;
use crate::provider::Provider;
use crate::session::{Cluster, SessionLimits, SessionManager};
use crate::store::redis::RedisStore;
use crate::store::sqlite::Db;
use crate::store::timed::Timed;
use crate::store::{HistoryStore, SessionStore};
use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

/// Loads the embedded engine named by `config` (model file, decode pool).
///
/// # Errors
/// Missing or unreadable model.
pub fn load_engine(config: &Config) -> anyhow::Result<Arc<WhisperEngine>> {
    Ok(Arc::new(WhisperEngine::load(
        &config.model,
        config.decode_workers,
        config.decode_threads,
    )?))
}

/// Builds the application state. `engine` lets callers (tests, the in-process `transcribe`)
/// share one loaded model; `None` loads it from `config.model`. A model that fails to load
/// leaves the server up but not ready (`/ready` says why).
///
/// # Errors
/// The database cannot be opened or migrated.
pub async fn build(
    config: Config,
    engine: Option<Arc<WhisperEngine>>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppState> {
    build_with_providers(config, engine, Vec::new(), shutdown).await
}

/// [`build`] plus extra providers, selectable by name per session (tests plug scripted ones in).
///
/// # Errors
/// The database cannot be opened or migrated.
pub async fn build_with_providers(
    config: Config,
    engine: Option<Arc<WhisperEngine>>,
    extra: Vec<Arc<dyn Provider>>,
    shutdown: CancellationToken,
) -> anyhow::Result<AppState> {
    config.validate()?;
    crate::fdlimit::raise_and_check(&config);
    crate::metrics::spawn_upkeep();
    let config = Arc::new(config);
    let engine = match engine {
        Some(e) => Ok(e),
        None => {
            let cfg = Arc::clone(&config);
            tokio::task::spawn_blocking(move || load_engine(&cfg))
                .await?
                .map_err(|e| {
                    tracing::error!(error = %e, "embedded engine not loaded");
                    format!("{e:#}")
                })
        }
    };
    let embedded: Arc<dyn Provider> = Arc::new(EmbeddedProvider::new(
        engine,
        EmbeddedSettings {
            partial_interval_ms: config.partial_interval_ms,
            first_partial_ms: config.first_partial_ms,
            vad_silence_ms: config.vad_silence_ms,
            early_final_ms: config.early_final_ms,
            max_queued_finals: config.max_queued_finals,
        },
    ));
    let mut by_name = HashMap::new();
    by_name.insert(embedded.name().to_string(), embedded);
    if let Some(path) = &config.providers {
        for entry in registry::load_file(path)? {
            let p = registry::build(entry)?;
            tracing::info!(
                provider = p.name(),
                ready = p.readiness().ready,
                "provider configured"
            );
            by_name.insert(p.name().to_string(), p);
        }
    }
    for p in extra {
        by_name.insert(p.name().to_string(), p);
    }
    anyhow::ensure!(
        by_name.contains_key(&config.default_provider),
        "--default-provider {:?} is not configured",
        config.default_provider
    );
    let providers = Providers {
        default: config.default_provider.clone(),
        by_name,
    };
    // An empty VOXPOLL_REDIS_URL (an env template's blank) means none.
    let redis_url = config.redis_url.as_ref().filter(|u| !u.expose().is_empty());
    let (store, history, cluster) = match redis_url {
        None => {
            let db = Arc::new(
                Db::open_with(&config.db, config.sqlite_synchronous)
                    .await
                    .with_context(|| format!("opening database {}", config.db.display()))?,
            );
            (
                Timed::wrap(Arc::clone(&db) as Arc<dyn SessionStore>, "sqlite"),
                db as Arc<dyn HistoryStore>,
                None,
            )
        }
        Some(url) => {
            let redis = RedisStore::connect(url.expose())
                .await
                .map_err(|e| anyhow::anyhow!("connecting to Redis (--redis-url): {e:#} ({e:?})"))?;
            let replica = config.replica_id.clone().unwrap_or_else(default_replica_id);
            tracing::info!(%replica, lease_ms = config.lease_ms, "sessions shared through Redis");
            let cluster = Cluster::new(redis.clone(), replica, config.lease_ms);
            let redis = Arc::new(redis);
            (
                Timed::wrap(Arc::clone(&redis) as Arc<dyn SessionStore>, "redis"),
                redis as Arc<dyn HistoryStore>,
                Some(cluster),
            )
        }
    };
    let recognizer = Recognizer::new(
        providers.clone(),
        Arc::clone(&history),
        config.max_recognize_audio_ms,
        config.max_recognize_concurrent,
    );
    let shared = cluster.is_some();
    let sessions = SessionManager::new(
        SessionLimits::from(&*config),
        store,
        providers,
        shutdown.clone(),
        cluster,
    );
    if shared {
        // Sessions a dead replica left are taken over once their lease lapses.
        sessions.start_cluster_tasks();
    } else {
        let (resumed, failed) = sessions.resume_orphans().await?;
        if resumed + failed > 0 {
            tracing::warn!(
                resumed,
                failed,
                "sessions left open by a previous process: resumed, or recorded as failed"
            );
        }
    }
    let auth = crate::auth::Authenticator::new(&crate::auth::AuthSettings {
        jwt_hs256_secret: config.jwt_hs256_secret.clone(),
        jwt_rs256_public_key_pem: match &config.jwt_rs256_public_key {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading RS256 public key {}", p.display()))?,
            ),
            None => None,
        },
        jwt_audience: config.jwt_audience.clone(),
        jwt_leeway_s: config.jwt_leeway_s,
        api_keys: config.api_keys.clone(),
    })?;
    tracing::info!(auth = ?auth, cors_origins = ?config.cors_origins, "caller authentication");
    spawn_purge(Arc::clone(&config), Arc::clone(&history), shutdown);
    Ok(AppState {
        config,
        sessions,
        history,
        recognizer,
        auth: Arc::new(auth),
    })
}

/// A replica name unique enough among replicas: the host name and 6 random hex digits.
fn default_replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "voxpoll".into());
    format!("{host}-{}", hex::encode(rand::random::<[u8; 3]>()))
}

/// Deletes history past `history_retention_ms` every `purge_interval_ms` until shutdown.
fn spawn_purge(config: Arc<Config>, db: Arc<dyn HistoryStore>, shutdown: CancellationToken) {
    if config.history_retention_ms == 0 {
        return;
    }
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(std::time::Duration::from_millis(config.purge_interval_ms));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let cutoff = crate::clock::now_ms().saturating_sub(config.history_retention_ms);
            match db.purge(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "history past retention purged"),
                Err(e) => tracing::error!(error = %e, cause = ?e, "history purge failed"),
            }
        }
    });
}

/// Binds `addr` with a large accept backlog (warp's own bind uses 128 and panics on failure).
///
/// # Errors
/// The address cannot be bound.
pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    Ok(socket.listen(4096)?)
}

/// Serves until `shutdown` fires; then waiting polls return, sessions finish or record their
/// end, and open connections drain.
///
/// # Errors
/// Never after a successful start today; kept fallible for future listeners.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let sessions = state.sessions.clone();
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let config = Arc::clone(&state.config);
    let server = tokio::spawn(crate::http::server::serve(
        listener,
        state,
        config,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    tracing::info!("shutdown begun");
    sessions.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    tracing::info!("shutdown finished");
    Ok(())
}
