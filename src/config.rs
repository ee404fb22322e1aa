//! Server configuration: one declaration gives the `serve` flags, their `VOXPOLL_*` environment
//! variables and `--help`. README.md's configuration table mirrors this file.

use crate::store::sqlite::Synchronous;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Everything `voxpoll serve` can be told. Every limit lives here, with its unit in the name.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address to bind.
    #[arg(long, env = "VOXPOLL_HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// TCP port. When unset, the `PORT` variable that cloud hosts set is used, then 8080.
    #[arg(long, env = "VOXPOLL_PORT")]
    pub port: Option<u16>,

    /// SQLite database file (created if missing).
    #[arg(long, env = "VOXPOLL_DB", default_value = "voxpoll.db")]
    pub db: PathBuf,

    /// When SQLite syncs a commit to disk (`PRAGMA synchronous`, WAL mode): `normal`, the
    /// default, writes each commit to the WAL file before answering (it survives the process
    /// being killed; power loss can take back the last commits); `full` also waits for an
    /// fsync per commit (survives power loss, costs one disk flush per group commit).
    #[arg(long, env = "VOXPOLL_SQLITE_SYNCHRONOUS", value_enum, default_value_t = Synchronous::Normal)]
    pub sqlite_synchronous: Synchronous,

    /// Redis 7+ / Valkey shared by several replicas (`redis://[user:password@]host:port[/db]`,
    /// `rediss://…` for TLS, verified against the system trust store or the CA file named by
    /// `SSL_CERT_FILE`, `redis+unix:///path`): sessions, chunks, events, leases and the
    /// per-user budget then live there, and any replica serves any request of any session
    /// (README "Many replicas"). Unset: everything stays in the SQLite file `--db`.
    #[arg(long, env = "VOXPOLL_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<crate::secret::Secret>,

    /// This replica's name among those sharing a Redis (the lease holder's name). Default:
    /// the host name and a random suffix, new at every start.
    #[arg(long, env = "VOXPOLL_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// With `--redis-url`: how long a replica's hold on a session lasts unless renewed (every
    /// third of it), in ms. After a replica dies, another takes its sessions over within
    /// about this time plus a quarter of it.
    #[arg(long, env = "VOXPOLL_LEASE_MS", default_value_t = defaults::LEASE_MS)]
    pub lease_ms: u64,

    /// whisper.cpp ggml model for the embedded provider (`scripts/setup` puts it here).
    #[arg(long, env = "VOXPOLL_MODEL", default_value_os_t = default_model_path())]
    pub model: PathBuf,

    /// Default long-poll hold when the client gives no `wait_ms`, in ms.
    #[arg(long, env = "VOXPOLL_POLL_HOLD_MS", default_value_t = defaults::POLL_HOLD_MS)]
    pub poll_hold_ms: u64,

    /// Longest hold a client may ask for, in ms. Keep it below the shortest proxy or client
    /// timeout on the path (wx.request caps at 60 s; callContainer at 15 s).
    #[arg(long, env = "VOXPOLL_POLL_MAX_HOLD_MS", default_value_t = defaults::POLL_MAX_HOLD_MS)]
    pub poll_max_hold_ms: u64,

    /// Largest audio chunk body, in bytes (callContainer caps requests at 100 KB).
    #[arg(long, env = "VOXPOLL_MAX_CHUNK_BYTES", default_value_t = defaults::MAX_CHUNK_BYTES)]
    pub max_chunk_bytes: usize,

    /// Chunk size advertised to clients, in bytes: 8192 is 256 ms of 16 kHz mono s16, small
    /// enough for partials to move, large enough to keep the request rate low.
    #[arg(long, env = "VOXPOLL_CHUNK_BYTES", default_value_t = defaults::CHUNK_BYTES)]
    pub chunk_bytes: usize,

    /// Chunk uploads a session may make per second (retries and duplicates count), with bursts
    /// of twice that; beyond it 429 `rate_limited`. A recording client sends about 4 per second.
    #[arg(long, env = "VOXPOLL_MAX_CHUNKS_PER_S", default_value_t = defaults::MAX_CHUNKS_PER_S)]
    pub max_chunks_per_s: u32,

    /// Whether an upload is answered only once its chunk is committed to the store (`true`,
    /// the default: an acknowledged chunk survives a crash). `false` answers once the chunk is
    /// in memory and writes it behind (a crash can lose the last acknowledged chunks; the
    /// benchmark compares both).
    #[arg(long, env = "VOXPOLL_DURABLE_ACKS", default_value_t = true, action = clap::ArgAction::Set)]
    pub durable_acks: bool,

    /// Chunk uploads a client should keep in flight at once (advertised; wx allows 10 requests).
    #[arg(long, env = "VOXPOLL_MAX_INFLIGHT", default_value_t = defaults::MAX_INFLIGHT)]
    pub max_inflight: u32,

    /// Reorder window in chunks: a chunk up to this many seqs ahead of the next expected one is
    /// buffered; further ahead is rejected with 409 `seq_out_of_window`.
    #[arg(long, env = "VOXPOLL_REORDER_WINDOW", default_value_t = defaults::REORDER_WINDOW)]
    pub reorder_window: u64,

    /// Audio bytes a session may hold accepted but not yet consumed by its provider; beyond it
    /// uploads get 429 `backpressure`.
    #[arg(long, env = "VOXPOLL_MAX_BUFFERED_BYTES", default_value_t = defaults::MAX_BUFFERED_BYTES)]
    pub max_buffered_bytes: usize,

    /// Session creations per second on this instance (bursts of twice that); beyond it 429
    /// `rate_limited`. Every session leaves a row kept for `history_retention_ms`.
    #[arg(long, env = "VOXPOLL_MAX_CREATES_PER_S", default_value_t = defaults::MAX_CREATES_PER_S)]
    pub max_creates_per_s: u32,

    /// Sessions open at once on this instance; beyond it creation gets 429.
    #[arg(long, env = "VOXPOLL_MAX_SESSIONS", default_value_t = defaults::MAX_SESSIONS)]
    pub max_sessions: usize,

    /// A session with no upload and no poll for this long expires, in ms. Mini-programs pause
    /// for 5-60 s when sent to the background.
    #[arg(long, env = "VOXPOLL_SESSION_IDLE_MS", default_value_t = defaults::SESSION_IDLE_MS)]
    pub session_idle_ms: u64,

    /// Longest audio a session may carry, in ms (RecorderManager's own cap is 600 s).
    #[arg(long, env = "VOXPOLL_SESSION_MAX_AUDIO_MS", default_value_t = defaults::SESSION_MAX_AUDIO_MS)]
    pub session_max_audio_ms: u64,

    /// How long an ended session stays in memory for late polls, in ms; afterwards its finals
    /// and end event are served from the database.
    #[arg(long, env = "VOXPOLL_SESSION_LINGER_MS", default_value_t = defaults::SESSION_LINGER_MS)]
    pub session_linger_ms: u64,

    /// Largest JSON request body, in bytes.
    #[arg(long, env = "VOXPOLL_MAX_JSON_BYTES", default_value_t = defaults::MAX_JSON_BYTES)]
    pub max_json_bytes: u64,

    /// Decode workers for the embedded engine (each holds one whisper state).
    #[arg(long, env = "VOXPOLL_DECODE_WORKERS", default_value_t = default_workers())]
    pub decode_workers: usize,

    /// Finals waiting for an embedded-engine decode worker past which new embedded sessions
    /// (and one-shot recognitions) get 429 `provider_busy` with `Retry-After: 2`: past it the
    /// engine is saturated, and one more stream would make everybody's results late.
    #[arg(long, env = "VOXPOLL_MAX_QUEUED_FINALS", default_value_t = defaults::MAX_QUEUED_FINALS)]
    pub max_queued_finals: usize,

    /// Least CPU threads per decode; a decode running while other workers idle takes their
    /// share of the machine's cores too.
    #[arg(long, env = "VOXPOLL_DECODE_THREADS", default_value_t = defaults::DECODE_THREADS)]
    pub decode_threads: usize,

    /// Audio between two partial re-decodes of the current utterance, in ms.
    #[arg(long, env = "VOXPOLL_PARTIAL_INTERVAL_MS", default_value_t = defaults::PARTIAL_INTERVAL_MS)]
    pub partial_interval_ms: u64,

    /// Audio from the onset of an utterance to its first partial re-decode, in ms (at most
    /// `partial_interval_ms`).
    #[arg(long, env = "VOXPOLL_FIRST_PARTIAL_MS", default_value_t = defaults::FIRST_PARTIAL_MS)]
    pub first_partial_ms: u64,

    /// Non-speech that ends an utterance, in ms (a session's `vad_silence_ms` overrides it).
    #[arg(long, env = "VOXPOLL_VAD_SILENCE_MS", default_value_t = defaults::VAD_SILENCE_MS)]
    pub vad_silence_ms: u64,

    /// Non-speech after which the embedded engine starts decoding a sentence's final, in ms:
    /// its text is published at once as the sentence's partial, and as its final the moment
    /// `vad_silence_ms` confirms the end; if speech resumes first it stays a partial and the
    /// sentence goes on (0: decode the final only once the end is confirmed).
    #[arg(long, env = "VOXPOLL_EARLY_FINAL_MS", default_value_t = defaults::EARLY_FINAL_MS)]
    pub early_final_ms: u64,

    /// Time to let sessions finish on shutdown before they are recorded as failed, in ms.
    #[arg(long, env = "VOXPOLL_SHUTDOWN_GRACE_MS", default_value_t = defaults::SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,

    /// Providers file (JSON array of named Tencent / OpenAI-compatible / FunASR providers; see
    /// README "Providers"). The embedded provider is always available as `embedded`.
    #[arg(long, env = "VOXPOLL_PROVIDERS")]
    pub providers: Option<PathBuf>,

    /// Provider a session or one-shot request gets when it names none.
    #[arg(long, env = "VOXPOLL_DEFAULT_PROVIDER", default_value = defaults::DEFAULT_PROVIDER)]
    pub default_provider: String,

    /// Largest one-shot upload (`/v1/recognize`, `/api/realtime-voice/recognize`), in bytes.
    #[arg(long, env = "VOXPOLL_MAX_UPLOAD_BYTES", default_value_t = defaults::MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,

    /// Longest audio a one-shot request may carry, in ms.
    #[arg(
        long,
        env = "VOXPOLL_MAX_RECOGNIZE_AUDIO_MS",
        default_value_t = defaults::MAX_RECOGNIZE_AUDIO_MS)]
    pub max_recognize_audio_ms: u64,

    /// One-shot recognitions decoding or recognising at once; beyond it 429
    /// `too_many_recognitions` (each holds its decoded audio and a decode slot).
    #[arg(long, env = "VOXPOLL_MAX_RECOGNIZE_CONCURRENT", default_value_t = defaults::MAX_RECOGNIZE_CONCURRENT)]
    pub max_recognize_concurrent: usize,

    /// How long ended sessions and one-shot recognitions stay in history, in ms (0 = forever).
    #[arg(long, env = "VOXPOLL_HISTORY_RETENTION_MS", default_value_t = defaults::HISTORY_RETENTION_MS)]
    pub history_retention_ms: u64,

    /// How often the purge task deletes history past retention, in ms.
    #[arg(long, env = "VOXPOLL_PURGE_INTERVAL_MS", default_value_t = defaults::PURGE_INTERVAL_MS)]
    pub purge_interval_ms: u64,

    /// Times a session reopens a failed provider stream (dropped socket, timeout, upstream
    /// unavailable or internal error) and replays the unfinished utterance before it gives up
    /// with an `error` and `end: failed`. Counted per failure streak: a final result resets it.
    #[arg(long, env = "VOXPOLL_PROVIDER_RETRIES", default_value_t = defaults::PROVIDER_RETRIES)]
    pub provider_retries: u32,

    /// First backoff before reopening a failed provider stream, in ms; doubles per attempt.
    #[arg(long, env = "VOXPOLL_PROVIDER_BACKOFF_MS", default_value_t = defaults::PROVIDER_BACKOFF_MS)]
    pub provider_backoff_ms: u64,

    /// Sessions one authenticated user may have open at once; beyond it creation gets 429
    /// `too_many_sessions`. (With auth off only `max_sessions` applies.)
    #[arg(long, env = "VOXPOLL_MAX_SESSIONS_PER_USER", default_value_t = defaults::MAX_SESSIONS_PER_USER)]
    pub max_sessions_per_user: usize,

    /// HS256 secret for caller JWTs (set it in the environment, not on the command line).
    /// Setting any of the JWT keys or API keys turns auth on.
    #[arg(long, env = "VOXPOLL_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<crate::secret::Secret>,

    /// PEM file with the RS256 public key for caller JWTs.
    #[arg(long, env = "VOXPOLL_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,

    /// Audience (`aud`) caller JWTs must carry; unchecked when unset.
    #[arg(long, env = "VOXPOLL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew accepted on `exp` and `nbf`, in seconds (at most 300).
    #[arg(long, env = "VOXPOLL_JWT_LEEWAY_S", default_value_t = defaults::JWT_LEEWAY_S)]
    pub jwt_leeway_s: u64,

    /// Static API keys, `user:key` pairs separated by commas (keys ≥ 16 characters), sent as
    /// `X-Api-Key` (set it in the environment).
    #[arg(long, env = "VOXPOLL_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<crate::secret::Secret>,

    /// Bearer token `GET /metrics` requires (`Authorization: Bearer <token>`); unset: the
    /// endpoint is open (keep it off the public network then).
    #[arg(long, env = "VOXPOLL_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<crate::secret::Secret>,

    /// Origins allowed to call from browsers (H5 pages), comma-separated, e.g.
    /// `https://h5.example.com`. Empty: no CORS headers; requests with another `Origin` get 403.
    #[arg(long, env = "VOXPOLL_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// A client must send its request headers within this time, in ms (slow-header clients are
    /// cut off).
    #[arg(long, env = "VOXPOLL_HEADER_READ_TIMEOUT_MS", default_value_t = defaults::HEADER_READ_TIMEOUT_MS)]
    pub header_read_timeout_ms: u64,

    /// TCP connections served at once (every protocol the listener accepts: HTTP/1.1 and
    /// WebSocket; HTTP/2 is not spoken). Beyond it a new connection is answered 503
    /// `too_many_connections` with `Retry-After: 1` and closed. Keep it under the process's
    /// file-descriptor limit (`ulimit -n`) less the SQLite and upstream sockets.
    #[arg(long, env = "VOXPOLL_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Largest request header section, in bytes (all names and values); beyond it 431
    /// `headers_too_large`.
    #[arg(long, env = "VOXPOLL_MAX_HEADER_BYTES", default_value_t = defaults::MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,

    /// Most request headers; beyond it 431 `headers_too_large`.
    #[arg(long, env = "VOXPOLL_MAX_HEADERS", default_value_t = defaults::MAX_HEADERS)]
    pub max_headers: usize,

    /// Longest a request body may take to arrive, in ms; beyond it 408 `request_timeout` (a
    /// client trickling a body cannot hold the connection).
    #[arg(long, env = "VOXPOLL_REQUEST_TIMEOUT_MS", default_value_t = defaults::REQUEST_TIMEOUT_MS)]
    pub request_timeout_ms: u64,

    /// WebSocket transport: interval of server pings, in ms. Keeps proxies with a read timeout
    /// (nginx `proxy_read_timeout` 60 s, 15 s on some gateways) from cutting a quiet socket.
    #[arg(long, env = "VOXPOLL_WS_PING_MS", default_value_t = defaults::WS_PING_MS)]
    pub ws_ping_ms: u64,

    /// Longest hold `GET /v1/probe/hold` grants `voxpoll doctor`, in ms (0 disables the
    /// `/v1/probe/*` routes).
    #[arg(long, env = "VOXPOLL_PROBE_MAX_HOLD_MS", default_value_t = defaults::PROBE_MAX_HOLD_MS)]
    pub probe_max_hold_ms: u64,

    /// Largest body `POST /v1/probe/echo` reads, in bytes (doctor's body-size probe).
    #[arg(long, env = "VOXPOLL_PROBE_MAX_BODY_BYTES", default_value_t = defaults::PROBE_MAX_BODY_BYTES)]
    pub probe_max_body_bytes: u64,
}

/// Every default, named once: the flags above and [`Config::loopback`] both read them.
mod defaults {
    pub const DEFAULT_PROVIDER: &str = "embedded";
    pub const LEASE_MS: u64 = 3_000;
    pub const POLL_HOLD_MS: u64 = 25_000;
    pub const POLL_MAX_HOLD_MS: u64 = 50_000;
    pub const MAX_CHUNK_BYTES: usize = 96 * 1024;
    pub const CHUNK_BYTES: usize = 8192;
    pub const MAX_CHUNKS_PER_S: u32 = 50;
    pub const MAX_INFLIGHT: u32 = 2;
    pub const REORDER_WINDOW: u64 = 16;
    pub const MAX_BUFFERED_BYTES: usize = 2 * 1024 * 1024;
    pub const MAX_SESSIONS: usize = 64;
    pub const MAX_CREATES_PER_S: u32 = 20;
    pub const SESSION_IDLE_MS: u64 = 60_000;
    pub const SESSION_MAX_AUDIO_MS: u64 = 600_000;
    pub const SESSION_LINGER_MS: u64 = 120_000;
    pub const MAX_JSON_BYTES: u64 = 64 * 1024;
    pub const DECODE_THREADS: usize = 1;
    pub const MAX_QUEUED_FINALS: usize = 8;
    pub const PARTIAL_INTERVAL_MS: u64 = 1000;
    pub const FIRST_PARTIAL_MS: u64 = 500;
    pub const VAD_SILENCE_MS: u64 = 600;
    pub const EARLY_FINAL_MS: u64 = 150;
    pub const SHUTDOWN_GRACE_MS: u64 = 10_000;
    pub const MAX_UPLOAD_BYTES: u64 = 10 * 1024 * 1024;
    pub const MAX_RECOGNIZE_AUDIO_MS: u64 = 600_000;
    pub const MAX_RECOGNIZE_CONCURRENT: usize = 4;
    pub const HISTORY_RETENTION_MS: u64 = 30 * 24 * 3_600_000;
    pub const PURGE_INTERVAL_MS: u64 = 3_600_000;
    pub const PROVIDER_RETRIES: u32 = 3;
    pub const PROVIDER_BACKOFF_MS: u64 = 250;
    pub const MAX_SESSIONS_PER_USER: usize = 4;
    pub const JWT_LEEWAY_S: u64 = 60;
    pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    pub const MAX_CONNECTIONS: usize = 768;
    pub const MAX_HEADERS: usize = 64;
    pub const REQUEST_TIMEOUT_MS: u64 = 30_000;
    pub const WS_PING_MS: u64 = 10_000;
    pub const PROBE_MAX_HOLD_MS: u64 = 70_000;
    pub const PROBE_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `$XDG_CACHE_HOME/voxpoll/ggml-base-q8_0.bin`, else `~/.cache/voxpoll/ggml-base-q8_0.bin`
/// (Whisper-base with Q8_0 weight matrices, as `scripts/fetch-model` converts it).
pub fn default_model_path() -> PathBuf {
    cache_dir().join("ggml-base-q8_0.bin")
}

/// voxpoll's cache directory (models live here, outside any checkout).
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("voxpoll");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("voxpoll")
}

impl Config {
    /// Defaults on loopback port 0 with the given database file, reading no environment: the
    /// in-process server of `voxpoll transcribe` and the test harness use it.
    pub fn loopback(db: PathBuf) -> Self {
        use defaults::*;
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: Some(0),
            db,
            redis_url: None,
            replica_id: None,
            lease_ms: LEASE_MS,
            model: default_model_path(),
            decode_workers: default_workers(),
            providers: None,
            default_provider: DEFAULT_PROVIDER.into(),
            jwt_hs256_secret: None,
            jwt_rs256_public_key: None,
            jwt_audience: None,
            api_keys: None,
            metrics_token: None,
            durable_acks: true,
            sqlite_synchronous: Synchronous::Normal,
            cors_origins: Vec::new(),
            poll_hold_ms: POLL_HOLD_MS,
            poll_max_hold_ms: POLL_MAX_HOLD_MS,
            max_chunk_bytes: MAX_CHUNK_BYTES,
            chunk_bytes: CHUNK_BYTES,
            max_chunks_per_s: MAX_CHUNKS_PER_S,
            max_inflight: MAX_INFLIGHT,
            reorder_window: REORDER_WINDOW,
            max_buffered_bytes: MAX_BUFFERED_BYTES,
            max_sessions: MAX_SESSIONS,
            max_creates_per_s: MAX_CREATES_PER_S,
            session_idle_ms: SESSION_IDLE_MS,
            session_max_audio_ms: SESSION_MAX_AUDIO_MS,
            session_linger_ms: SESSION_LINGER_MS,
            max_json_bytes: MAX_JSON_BYTES,
            decode_threads: DECODE_THREADS,
            max_queued_finals: MAX_QUEUED_FINALS,
            partial_interval_ms: PARTIAL_INTERVAL_MS,
            first_partial_ms: FIRST_PARTIAL_MS,
            vad_silence_ms: VAD_SILENCE_MS,
            early_final_ms: EARLY_FINAL_MS,
            shutdown_grace_ms: SHUTDOWN_GRACE_MS,
            max_upload_bytes: MAX_UPLOAD_BYTES,
            max_recognize_audio_ms: MAX_RECOGNIZE_AUDIO_MS,
            max_recognize_concurrent: MAX_RECOGNIZE_CONCURRENT,
            history_retention_ms: HISTORY_RETENTION_MS,
            purge_interval_ms: PURGE_INTERVAL_MS,
            provider_retries: PROVIDER_RETRIES,
            provider_backoff_ms: PROVIDER_BACKOFF_MS,
            max_sessions_per_user: MAX_SESSIONS_PER_USER,
            jwt_leeway_s: JWT_LEEWAY_S,
            header_read_timeout_ms: HEADER_READ_TIMEOUT_MS,
            max_header_bytes: MAX_HEADER_BYTES,
            max_headers: MAX_HEADERS,
            max_connections: MAX_CONNECTIONS,
            request_timeout_ms: REQUEST_TIMEOUT_MS,
            ws_ping_ms: WS_PING_MS,
            probe_max_hold_ms: PROBE_MAX_HOLD_MS,
            probe_max_body_bytes: PROBE_MAX_BODY_BYTES,
        }
    }

    /// The address to bind: `--port`/`VOXPOLL_PORT`, else `port_env` (the host's `PORT`), else 8080.
    pub fn listen_addr(&self, port_env: Option<&str>) -> anyhow::Result<SocketAddr> {
        let port = match (self.port, port_env) {
            (Some(p), _) => p,
            (None, Some(p)) => p
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT={p:?} is not a TCP port number"))?,
            (None, None) => 8080,
        };
        Ok(SocketAddr::new(self.host, port))
    }

    /// Rejects settings that contradict each other, naming the option to fix.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.poll_hold_ms > 0, "--poll-hold-ms must be > 0");
        anyhow::ensure!(
            (300..=60_000).contains(&self.lease_ms),
            "--lease-ms must be between 300 and 60000"
        );
        anyhow::ensure!(
            self.poll_hold_ms <= self.poll_max_hold_ms,
            "--poll-hold-ms ({}) must not exceed --poll-max-hold-ms ({})",
            self.poll_hold_ms,
            self.poll_max_hold_ms
        );
        anyhow::ensure!(self.max_chunk_bytes > 0, "--max-chunk-bytes must be > 0");
        anyhow::ensure!(self.chunk_bytes > 0, "--chunk-bytes must be > 0");
        anyhow::ensure!(
            self.request_timeout_ms > 0,
            "--request-timeout-ms must be > 0"
        );
        anyhow::ensure!(
            self.header_read_timeout_ms > 0,
            "--header-read-timeout-ms must be > 0"
        );
        anyhow::ensure!(
            self.max_header_bytes >= 1024 && self.max_headers >= 8,
            "--max-header-bytes must be >= 1024 and --max-headers >= 8"
        );
        anyhow::ensure!(self.max_chunks_per_s > 0, "--max-chunks-per-s must be > 0");
        anyhow::ensure!(
            self.max_sessions_per_user > 0,
            "--max-sessions-per-user must be > 0"
        );
        anyhow::ensure!(self.ws_ping_ms > 0, "--ws-ping-ms must be > 0");
        anyhow::ensure!(
            self.max_buffered_bytes >= self.max_chunk_bytes,
            "--max-buffered-bytes must be at least --max-chunk-bytes"
        );
        anyhow::ensure!(self.decode_workers > 0, "--decode-workers must be > 0");
        anyhow::ensure!(self.decode_threads > 0, "--decode-threads must be > 0");
        anyhow::ensure!(
            self.max_queued_finals > 0,
            "--max-queued-finals must be > 0"
        );
        anyhow::ensure!(self.max_sessions > 0, "--max-sessions must be > 0");
        anyhow::ensure!(self.max_connections > 0, "--max-connections must be > 0");
        anyhow::ensure!(
            self.max_creates_per_s > 0,
            "--max-creates-per-s must be > 0"
        );
        anyhow::ensure!(self.max_upload_bytes > 0, "--max-upload-bytes must be > 0");
        anyhow::ensure!(
            self.max_recognize_concurrent > 0,
            "--max-recognize-concurrent must be > 0"
        );
        anyhow::ensure!(
            self.purge_interval_ms > 0,
            "--purge-interval-ms must be > 0"
        );
        Ok(())
    }

    /// [`Config::poll_hold_ms`] as a duration.
    pub fn poll_hold(&self) -> Duration {
        Duration::from_millis(self.poll_hold_ms)
    }

    /// [`Config::poll_max_hold_ms`] as a duration.
    pub fn poll_max_hold(&self) -> Duration {
        Duration::from_millis(self.poll_max_hold_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: Config,
    }

    #[test]
    fn the_flags_and_the_loopback_config_share_their_defaults() {
        if std::env::vars().any(|(k, _)| k.starts_with("VOXPOLL_")) {
            return; // the environment sets options: the comparison would not be of defaults
        }
        let mut flags = Cli::try_parse_from(["voxpoll"]).unwrap().config;
        let loopback = Config::loopback(flags.db.clone());
        flags.host = loopback.host;
        flags.port = loopback.port;
        assert_eq!(format!("{flags:?}"), format!("{loopback:?}"));
        flags.validate().unwrap();
    }
}
