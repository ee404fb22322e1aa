//! Server configuration: one declaration gives the `serve` flags, their `VOXPOLL_*` environment
//! variables and `--help`. README.md's configuration table mirrors this file.

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

    /// whisper.cpp ggml model for the embedded provider (`scripts/setup` puts it here).
    #[arg(long, env = "VOXPOLL_MODEL", default_value_os_t = default_model_path())]
    pub model: PathBuf,

    /// Default long-poll hold when the client gives no `wait_ms`, in ms.
    #[arg(long, env = "VOXPOLL_POLL_HOLD_MS", default_value_t = 25_000)]
    pub poll_hold_ms: u64,

    /// Longest hold a client may ask for, in ms. Keep it below the shortest proxy or client
    /// timeout on the path (wx.request caps at 60 s; callContainer at 15 s).
    #[arg(long, env = "VOXPOLL_POLL_MAX_HOLD_MS", default_value_t = 50_000)]
    pub poll_max_hold_ms: u64,

    /// Largest audio chunk body, in bytes (callContainer caps requests at 100 KB).
    #[arg(long, env = "VOXPOLL_MAX_CHUNK_BYTES", default_value_t = 96 * 1024)]
    pub max_chunk_bytes: usize,

    /// Chunk size advertised to clients, in bytes: 8192 is 256 ms of 16 kHz mono s16, small
    /// enough for partials to move, large enough to keep the request rate low.
    #[arg(long, env = "VOXPOLL_CHUNK_BYTES", default_value_t = 8192)]
    pub chunk_bytes: usize,

    /// Chunk uploads a session may make per second (retries and duplicates count), with bursts
    /// of twice that; beyond it 429 `rate_limited`. A recording client sends about 4 per second.
    #[arg(long, env = "VOXPOLL_MAX_CHUNKS_PER_S", default_value_t = 50)]
    pub max_chunks_per_s: u32,

    /// Chunk uploads a client should keep in flight at once (advertised; wx allows 10 requests).
    #[arg(long, env = "VOXPOLL_MAX_INFLIGHT", default_value_t = 2)]
    pub max_inflight: u32,

    /// Reorder window in chunks: a chunk up to this many seqs ahead of the next expected one is
    /// buffered; further ahead is rejected with 409 `seq_out_of_window`.
    #[arg(long, env = "VOXPOLL_REORDER_WINDOW", default_value_t = 16)]
    pub reorder_window: u64,

    /// Audio bytes a session may hold accepted but not yet consumed by its provider; beyond it
    /// uploads get 429 `backpressure`.
    #[arg(long, env = "VOXPOLL_MAX_BUFFERED_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_buffered_bytes: usize,

    /// Sessions open at once on this instance; beyond it creation gets 429.
    #[arg(long, env = "VOXPOLL_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,

    /// A session with no upload and no poll for this long expires, in ms. Mini-programs pause
    /// for 5-60 s when sent to the background.
    #[arg(long, env = "VOXPOLL_SESSION_IDLE_MS", default_value_t = 60_000)]
    pub session_idle_ms: u64,

    /// Longest audio a session may carry, in ms (RecorderManager's own cap is 600 s).
    #[arg(long, env = "VOXPOLL_SESSION_MAX_AUDIO_MS", default_value_t = 600_000)]
    pub session_max_audio_ms: u64,

    /// How long an ended session stays in memory for late polls, in ms; afterwards its finals
    /// and end event are served from the database.
    #[arg(long, env = "VOXPOLL_SESSION_LINGER_MS", default_value_t = 120_000)]
    pub session_linger_ms: u64,

    /// Largest JSON request body, in bytes.
    #[arg(long, env = "VOXPOLL_MAX_JSON_BYTES", default_value_t = 64 * 1024)]
    pub max_json_bytes: u64,

    /// Decode workers for the embedded engine (each holds one whisper state).
    #[arg(long, env = "VOXPOLL_DECODE_WORKERS", default_value_t = default_workers())]
    pub decode_workers: usize,

    /// CPU threads per decode.
    #[arg(long, env = "VOXPOLL_DECODE_THREADS", default_value_t = 1)]
    pub decode_threads: usize,

    /// Audio between two partial re-decodes of the current utterance, in ms.
    #[arg(long, env = "VOXPOLL_PARTIAL_INTERVAL_MS", default_value_t = 1000)]
    pub partial_interval_ms: u64,

    /// Non-speech that ends an utterance, in ms (a session's `vad_silence_ms` overrides it).
    #[arg(long, env = "VOXPOLL_VAD_SILENCE_MS", default_value_t = 600)]
    pub vad_silence_ms: u64,

    /// Time to let sessions finish on shutdown before they are recorded as failed, in ms.
    #[arg(long, env = "VOXPOLL_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,

    /// Providers file (JSON array of named Tencent / OpenAI-compatible / FunASR providers; see
    /// README "Providers"). The embedded provider is always available as `embedded`.
    #[arg(long, env = "VOXPOLL_PROVIDERS")]
    pub providers: Option<PathBuf>,

    /// Provider a session or one-shot request gets when it names none.
    #[arg(long, env = "VOXPOLL_DEFAULT_PROVIDER", default_value = "embedded")]
    pub default_provider: String,

    /// Largest one-shot upload (`/v1/recognize`, `/api/realtime-voice/recognize`), in bytes.
    #[arg(long, env = "VOXPOLL_MAX_UPLOAD_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_upload_bytes: u64,

    /// Longest audio a one-shot request may carry, in ms.
    #[arg(
        long,
        env = "VOXPOLL_MAX_RECOGNIZE_AUDIO_MS",
        default_value_t = 600_000
    )]
    pub max_recognize_audio_ms: u64,

    /// How long ended sessions and one-shot recognitions stay in history, in ms (0 = forever).
    #[arg(long, env = "VOXPOLL_HISTORY_RETENTION_MS", default_value_t = 30 * 24 * 3_600_000)]
    pub history_retention_ms: u64,

    /// How often the purge task deletes history past retention, in ms.
    #[arg(long, env = "VOXPOLL_PURGE_INTERVAL_MS", default_value_t = 3_600_000)]
    pub purge_interval_ms: u64,

    /// Times a session reopens a failed provider stream (dropped socket, timeout, upstream
    /// unavailable or internal error) and replays the unfinished utterance before it gives up
    /// with an `error` and `end: failed`. Counted per failure streak: a final result resets it.
    #[arg(long, env = "VOXPOLL_PROVIDER_RETRIES", default_value_t = 3)]
    pub provider_retries: u32,

    /// First backoff before reopening a failed provider stream, in ms; doubles per attempt.
    #[arg(long, env = "VOXPOLL_PROVIDER_BACKOFF_MS", default_value_t = 250)]
    pub provider_backoff_ms: u64,

    /// Sessions one authenticated user may have open at once; beyond it creation gets 429
    /// `too_many_sessions`. (With auth off only `max_sessions` applies.)
    #[arg(long, env = "VOXPOLL_MAX_SESSIONS_PER_USER", default_value_t = 4)]
    pub max_sessions_per_user: usize,

    /// HS256 secret for caller JWTs (set it in the environment, not on the command line).
    /// Setting any of the JWT keys or API keys turns auth on.
    #[arg(long, env = "VOXPOLL_JWT_HS256_SECRET", hide_env_values = true)]
    pub jwt_hs256_secret: Option<crate::auth::SecretString>,

    /// PEM file with the RS256 public key for caller JWTs.
    #[arg(long, env = "VOXPOLL_JWT_RS256_PUBLIC_KEY")]
    pub jwt_rs256_public_key: Option<PathBuf>,

    /// Audience (`aud`) caller JWTs must carry; unchecked when unset.
    #[arg(long, env = "VOXPOLL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock skew accepted on `exp` and `nbf`, in seconds (at most 300).
    #[arg(long, env = "VOXPOLL_JWT_LEEWAY_S", default_value_t = 60)]
    pub jwt_leeway_s: u64,

    /// Static API keys, `user:key` pairs separated by commas (keys ≥ 16 characters), sent as
    /// `X-Api-Key` (set it in the environment).
    #[arg(long, env = "VOXPOLL_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<crate::auth::SecretString>,

    /// Origins allowed to call from browsers (H5 pages), comma-separated, e.g.
    /// `https://h5.example.com`. Empty: no CORS headers; requests with another `Origin` get 403.
    #[arg(long, env = "VOXPOLL_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,

    /// A client must send its request headers within this time, in ms (slow-header clients are
    /// cut off).
    #[arg(long, env = "VOXPOLL_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,

    /// Largest request header section, in bytes (all names and values); beyond it 431
    /// `headers_too_large`.
    #[arg(long, env = "VOXPOLL_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Most request headers; beyond it 431 `headers_too_large`.
    #[arg(long, env = "VOXPOLL_MAX_HEADERS", default_value_t = 64)]
    pub max_headers: usize,

    /// Longest a request body may take to arrive, in ms; beyond it 408 `request_timeout` (a
    /// client trickling a body cannot hold the connection).
    #[arg(long, env = "VOXPOLL_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// WebSocket transport: interval of server pings, in ms. Keeps proxies with a read timeout
    /// (nginx `proxy_read_timeout` 60 s, 15 s on some gateways) from cutting a quiet socket.
    #[arg(long, env = "VOXPOLL_WS_PING_MS", default_value_t = 10_000)]
    pub ws_ping_ms: u64,

    /// Longest hold `GET /v1/probe/hold` grants `voxpoll doctor`, in ms (0 disables the
    /// `/v1/probe/*` routes).
    #[arg(long, env = "VOXPOLL_PROBE_MAX_HOLD_MS", default_value_t = 70_000)]
    pub probe_max_hold_ms: u64,

    /// Largest body `POST /v1/probe/echo` reads, in bytes (doctor's body-size probe).
    #[arg(long, env = "VOXPOLL_PROBE_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub probe_max_body_bytes: u64,
}

fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `$XDG_CACHE_HOME/voxpoll/ggml-base.bin`, else `~/.cache/voxpoll/ggml-base.bin`.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("ggml-base.bin")
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
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: Some(0),
            db,
            model: default_model_path(),
            poll_hold_ms: 25_000,
            poll_max_hold_ms: 50_000,
            max_chunk_bytes: 96 * 1024,
            chunk_bytes: 8192,
            max_chunks_per_s: 50,
            max_inflight: 2,
            reorder_window: 16,
            max_buffered_bytes: 2 * 1024 * 1024,
            max_sessions: 64,
            session_idle_ms: 60_000,
            session_max_audio_ms: 600_000,
            session_linger_ms: 120_000,
            max_json_bytes: 64 * 1024,
            decode_workers: default_workers(),
            decode_threads: 1,
            partial_interval_ms: 1000,
            vad_silence_ms: 600,
            shutdown_grace_ms: 10_000,
            providers: None,
            default_provider: "embedded".into(),
            max_upload_bytes: 10 * 1024 * 1024,
            max_recognize_audio_ms: 600_000,
            history_retention_ms: 30 * 24 * 3_600_000,
            purge_interval_ms: 3_600_000,
            provider_retries: 3,
            provider_backoff_ms: 250,
            max_sessions_per_user: 4,
            jwt_hs256_secret: None,
            jwt_rs256_public_key: None,
            jwt_audience: None,
            jwt_leeway_s: 60,
            api_keys: None,
            cors_origins: Vec::new(),
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            request_timeout_ms: 30_000,
            ws_ping_ms: 10_000,
            probe_max_hold_ms: 70_000,
            probe_max_body_bytes: 4 * 1024 * 1024,
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
        anyhow::ensure!(self.max_sessions > 0, "--max-sessions must be > 0");
        anyhow::ensure!(self.max_upload_bytes > 0, "--max-upload-bytes must be > 0");
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
