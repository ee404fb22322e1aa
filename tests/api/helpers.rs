//! The one test harness: `spawn_app()` starts the real server on port 0 with a real SQLite file,
//! sharing one loaded whisper model per test binary, plus a scripted `echo` provider.

use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use voxpoll::config::Config;
use voxpoll::provider::whisper::WhisperEngine;
use voxpoll::provider::{
    Provider, ProviderError, ProviderEvent, ProviderInput, ProviderStream, Readiness, Recognition,
    StreamOptions,
};

static ENGINE: OnceLock<Arc<WhisperEngine>> = OnceLock::new();

/// The shared model (loaded once; `scripts/test` fetches it first).
pub fn engine() -> Arc<WhisperEngine> {
    ENGINE
        .get_or_init(|| {
            let cfg = Config::loopback(PathBuf::from("unused.db"));
            voxpoll::app::load_engine(&cfg)
                .expect("model missing: run scripts/fetch-model (scripts/test does)")
        })
        .clone()
}

/// A provider whose results are a pure function of its input: every audio push yields a final
/// "N samples" for sentence k (k = push index); Finish yields Done. Lets protocol tests assert
/// exact events and timings without speech recognition.
pub struct EchoProvider;

impl Provider for EchoProvider {
    fn name(&self) -> &str {
        "echo"
    }
    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: "scripted".into(),
            stats: None,
        }
    }
    fn open(
        &self,
        _opts: &StreamOptions,
        cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let (in_tx, mut in_rx) = tokio::sync::mpsc::channel(8);
        let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut k = 0u32;
            let mut pos_ms = 0u64;
            loop {
                let msg = tokio::select! {
                    () = cancel.cancelled() => return,
                    m = in_rx.recv() => m,
                };
                match msg {
                    Some(ProviderInput::Audio(pcm) | ProviderInput::Encoded { pcm, .. }) => {
                        let start = pos_ms;
                        pos_ms += pcm.len() as u64 / 16;
                        let rec = Recognition {
                            sentence: k,
                            text: format!("{} samples", pcm.len()),
                            start_ms: start,
                            end_ms: pos_ms,
                            words: None,
                        };
                        k += 1;
                        if ev_tx.send(ProviderEvent::Final(rec)).await.is_err() {
                            return;
                        }
                    }
                    // Every push is a sentence already (and `can_finalize` is false).
                    Some(ProviderInput::Finalize) => {}
                    Some(ProviderInput::Finish) => {
                        let _ = ev_tx.send(ProviderEvent::Done).await;
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(ProviderStream {
            input: in_tx,
            events: ev_rx,
        })
    }
}

/// A running server owned by one test.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    dir: Arc<tempfile::TempDir>,
    providers: Vec<Arc<dyn Provider>>,
    /// The Redis server of a `VOXPOLL_TEST_ENGINE=redis` run.
    redis: Option<Arc<crate::store::RedisServer>>,
}

/// Starts a server with test defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts a server after `tweak` adjusts the config.
pub async fn spawn_app_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_providers(Vec::new(), tweak).await
}

/// Starts a server with extra providers (e.g. ones pointed at fake upstreams) beside `echo`.
pub async fn spawn_app_with_providers(
    providers: Vec<Arc<dyn Provider>>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    start(dir, providers, Some(engine()), None, tweak).await
}

/// Starts a server with an engine of its own, loaded from the model with the decode settings
/// `tweak` leaves (e.g. one decode worker): for tests whose bounds depend on what else the
/// engine is decoding, which the shared engine mixes with every other test's decodes.
pub async fn spawn_app_with_own_engine(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    start(dir, Vec::new(), None, None, tweak).await
}

async fn start(
    dir: Arc<tempfile::TempDir>,
    mut providers: Vec<Arc<dyn Provider>>,
    engine: Option<Arc<WhisperEngine>>,
    redis: Option<Arc<crate::store::RedisServer>>,
    tweak: impl FnOnce(&mut Config),
) -> TestApp {
    let extra = providers.clone();
    providers.push(Arc::new(EchoProvider));
    let db = dir.path().join("voxpoll.db");
    let mut config = Config::loopback(db.clone());
    // VOXPOLL_TEST_ENGINE=redis: the same tests on the Redis engine replicas share (a
    // restarted server keeps its Redis, as a restarted replica does).
    let redis = match redis {
        Some(r) => Some(r),
        None if std::env::var("VOXPOLL_TEST_ENGINE").as_deref() == Ok("redis") => {
            Some(Arc::new(crate::store::RedisServer::start().await))
        }
        None => None,
    };
    if let Some(r) = &redis {
        config.redis_url = Some(voxpoll::secret::Secret::new(r.url.clone()));
    }
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let state = voxpoll::app::build_with_providers(config, engine, providers, shutdown.clone())
        .await
        .expect("build app");
    let listener = voxpoll::app::bind(([127, 0, 0, 1], 0).into()).expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let handle = tokio::spawn(voxpoll::app::run(listener, state, shutdown.clone()));
    TestApp {
        url,
        http: reqwest::Client::new(),
        shutdown,
        handle: Some(handle),
        dir,
        providers: extra,
        redis,
    }
}

/// A session as the tests hold it.
pub struct TestSession {
    pub id: String,
    pub token: String,
    pub created: Value,
}

impl TestApp {
    /// The server's SQLite file.
    pub fn db_path(&self) -> std::path::PathBuf {
        self.dir.path().join("voxpoll.db")
    }

    /// Stops the server and waits for it (bounded).
    pub async fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), h)
                .await
                .expect("server stops within 20 s")
                .expect("join")
                .expect("run ok");
        }
    }

    /// Stops serving at once without any shutdown bookkeeping, as a crash would leave the
    /// database (the in-process session tasks are not stopped; the killed-binary test in
    /// `durability.rs` is the real crash).
    pub fn abandon(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }

    /// Shuts down and starts a new server on the same database file.
    pub async fn restart(mut self) -> TestApp {
        self.shutdown().await;
        start(
            Arc::clone(&self.dir),
            self.providers.clone(),
            Some(engine()),
            self.redis.take(),
            |_| {},
        )
        .await
    }

    pub async fn create(&self, body: Value) -> TestSession {
        // As a client does: 429 provider_busy (the engine saturated by the speech tests running
        // beside this one) is retried after its Retry-After, for up to a minute.
        let mut tries = 0;
        let r = loop {
            let r = self
                .http
                .post(format!("{}/v1/sessions", self.url))
                .json(&body)
                .send()
                .await
                .expect("create");
            if r.status() != StatusCode::TOO_MANY_REQUESTS || tries == 30 {
                break r;
            }
            let err: Value = r.json().await.expect("json");
            assert_eq!(
                err["error"]["code"], "provider_busy",
                "create session: {err}"
            );
            tries += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
        };
        assert_eq!(r.status(), StatusCode::CREATED, "create session");
        let created: Value = r.json().await.expect("json");
        TestSession {
            id: created["session_id"].as_str().expect("id").into(),
            token: created["session_token"].as_str().expect("token").into(),
            created,
        }
    }

    /// POST a chunk; returns (status, body).
    pub async fn upload(&self, s: &TestSession, query: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/v1/sessions/{}/audio?{query}", self.url, s.id))
            .header("x-session-token", &s.token)
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("upload");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET events after `after`, holding up to `wait_ms`.
    pub async fn poll(&self, s: &TestSession, after: u64, wait_ms: u64) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!(
                "{}/v1/sessions/{}/events?after={after}&wait_ms={wait_ms}",
                self.url, s.id
            ))
            .header("x-session-token", &s.token)
            .send()
            .await
            .expect("poll");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Starts a long-poll in the background; resolves to (when it returned, status, body).
    pub fn poll_in_background(
        &self,
        s: &TestSession,
        after: u64,
        wait_ms: u64,
    ) -> tokio::task::JoinHandle<(std::time::Instant, StatusCode, Value)> {
        let (http, url, id, token) = (
            self.http.clone(),
            self.url.clone(),
            s.id.clone(),
            s.token.clone(),
        );
        tokio::spawn(async move {
            let r = http
                .get(format!(
                    "{url}/v1/sessions/{id}/events?after={after}&wait_ms={wait_ms}"
                ))
                .header("x-session-token", token)
                .send()
                .await
                .expect("poll");
            let returned = std::time::Instant::now();
            let status = r.status();
            (returned, status, r.json().await.unwrap_or(Value::Null))
        })
    }

    /// Follows the session's events in the background; resolves to when the first event of
    /// type `kind` arrived, or `None` if the session ended without one.
    pub fn first_event_in_background(
        &self,
        s: &TestSession,
        kind: &'static str,
    ) -> tokio::task::JoinHandle<Option<std::time::Instant>> {
        let (http, url, id, token) = (
            self.http.clone(),
            self.url.clone(),
            s.id.clone(),
            s.token.clone(),
        );
        tokio::spawn(async move {
            let mut cursor = 0;
            loop {
                let page = events_page(&http, &url, &id, &token, cursor).await;
                if page["events"]
                    .as_array()
                    .expect("events")
                    .iter()
                    .any(|e| e["type"] == kind)
                {
                    return Some(std::time::Instant::now());
                }
                if page["done"] == true {
                    return None;
                }
                cursor = page["next_cursor"].as_u64().expect("cursor");
            }
        })
    }

    /// Every event of the session as the long-poll delivers it, in order, until its end.
    pub fn events_in_background(&self, s: &TestSession) -> tokio::task::JoinHandle<Vec<Value>> {
        self.follow_in_background(s, Vec::new(), |seen, events| {
            seen.extend(events.iter().cloned());
        })
    }

    /// Long-polls the session from cursor 0 until its end in a task, folding every page's
    /// events into `acc` as they arrive; the task answers `acc`.
    fn follow_in_background<T: Send + 'static>(
        &self,
        s: &TestSession,
        mut acc: T,
        mut on_page: impl FnMut(&mut T, &[Value]) + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        let (http, url, id, token) = (
            self.http.clone(),
            self.url.clone(),
            s.id.clone(),
            s.token.clone(),
        );
        tokio::spawn(async move {
            let mut cursor = 0;
            loop {
                let page = events_page(&http, &url, &id, &token, cursor).await;
                on_page(&mut acc, page["events"].as_array().expect("events"));
                if page["done"] == true {
                    return acc;
                }
                cursor = page["next_cursor"].as_u64().expect("cursor");
            }
        })
    }

    /// Arrival times of a session's events of `kind`, polled in the background until its end.
    pub fn arrivals_in_background(
        &self,
        s: &TestSession,
        kind: &'static str,
    ) -> tokio::task::JoinHandle<Vec<std::time::Instant>> {
        self.follow_in_background(s, Vec::new(), move |at, events| {
            let now = std::time::Instant::now();
            at.extend(events.iter().filter(|e| e["type"] == kind).map(|_| now));
        })
    }

    /// `POST /v1/recognize{query}` with `body` as `ctype`; returns (status, JSON body or null).
    pub async fn recognize(&self, query: &str, ctype: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}/v1/recognize{query}", self.url))
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .expect("post");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// GET `path` (e.g. `/ready`); returns (status, JSON body or null).
    pub async fn get_path(&self, path: &str) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("get");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, s: &TestSession) -> (StatusCode, Value) {
        let r = self
            .http
            .get(format!("{}/v1/sessions/{}", self.url, s.id))
            .header("x-session-token", &s.token)
            .send()
            .await
            .expect("get");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Waits (at most 10 s, checking every 10 ms) until `n` long-polls are held by the server,
    /// as `/ready` reports them.
    pub async fn until_polls_waiting(&self, n: u64) {
        let url = format!("{}/ready", self.url);
        until("long-polls held", || async {
            let v: Value = self.http.get(&url).send().await.ok()?.json().await.ok()?;
            (v["polls_waiting"].as_u64()? >= n).then_some(())
        })
        .await;
    }

    /// Polls until the `end` event; returns every event seen, in order.
    pub async fn collect_until_end(&self, s: &TestSession, timeout: Duration) -> Vec<Value> {
        let mut cursor = 0;
        let mut all = Vec::new();
        tokio::time::timeout(timeout, async {
            loop {
                let (status, page) = self.poll(s, cursor, 5_000).await;
                assert_eq!(status, StatusCode::OK, "{page}");
                all.extend(page["events"].as_array().expect("events").iter().cloned());
                cursor = page["next_cursor"].as_u64().expect("cursor");
                if page["done"] == json!(true) {
                    break;
                }
            }
        })
        .await
        .expect("session ends in time");
        all
    }

    /// Uploads `bytes` as chunks of `chunk` bytes (the last with `last=1`), each answered 200,
    /// and returns every event until `end`.
    pub async fn stream_bytes(&self, s: &TestSession, bytes: &[u8], chunk: usize) -> Vec<Value> {
        let pieces: Vec<&[u8]> = bytes.chunks(chunk).collect();
        for (seq, piece) in pieces.iter().enumerate() {
            let last = if seq + 1 == pieces.len() {
                "&last=1"
            } else {
                ""
            };
            let (st, body) = self
                .upload(s, &format!("seq={seq}{last}"), piece.to_vec())
                .await;
            assert_eq!(st, StatusCode::OK, "chunk {seq}: {body}");
        }
        self.collect_until_end(s, Duration::from_secs(60)).await
    }

    /// Streams 16 kHz mono samples in `chunk_ms` chunks (paced to real time when `realtime`),
    /// the last one with `last=1`, and returns every event until `end`.
    pub async fn stream_pcm(
        &self,
        s: &TestSession,
        pcm: &[i16],
        chunk_ms: usize,
        realtime: bool,
    ) -> Vec<Value> {
        let per = 16 * chunk_ms;
        let chunks: Vec<&[i16]> = pcm.chunks(per).collect();
        let started = tokio::time::Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            if realtime {
                tokio::time::sleep_until(
                    started + Duration::from_millis(((i + 1) * chunk_ms) as u64),
                )
                .await;
            }
            let last = if i + 1 == chunks.len() { "&last=1" } else { "" };
            // As a client does: a 429 (rate limit, backpressure) is retried after a pause.
            let (status, body) = loop {
                let (status, body) = self
                    .upload(s, &format!("seq={i}{last}"), pcm_bytes(c))
                    .await;
                if status != StatusCode::TOO_MANY_REQUESTS {
                    break (status, body);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert_eq!(status, StatusCode::OK, "chunk {i}: {body}");
        }
        self.collect_until_end(s, Duration::from_secs(120)).await
    }
}

/// Little-endian bytes of samples.
pub fn pcm_bytes(pcm: &[i16]) -> Vec<u8> {
    pcm.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// Reads a WAV (any supported rate) into 16 kHz mono.
pub fn read_wav(path: &std::path::Path) -> Vec<i16> {
    voxpoll::audio::decode_wav_bytes(
        &std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .expect("decode wav")
}

/// The transcript from the `end` event.
pub fn transcript(events: &[Value]) -> String {
    events
        .iter()
        .find(|e| e["type"] == "end")
        .and_then(|e| e["transcript"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Levenshtein distance over tokens.
pub fn edit_distance<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// English words, lower-cased, punctuation removed, a few spoken forms normalised.
pub fn en_words(s: &str) -> Vec<String> {
    s.to_lowercase()
        .replace('-', " ")
        .split_whitespace()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .collect::<String>()
        })
        .filter(|w| !w.is_empty())
        .map(|w| match w.as_str() {
            "mr" => "mister".into(),
            "mrs" => "missus".into(),
            "10" => "ten".into(),
            "5" => "five".into(),
            _ => w,
        })
        .collect()
}

/// Chinese characters only (punctuation and spaces removed).
pub fn zh_chars(s: &str) -> Vec<char> {
    s.chars().filter(|c| c.is_alphanumeric()).collect()
}

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Character error rate of `hyp` against `reference` (Chinese characters and words).
pub fn zh_cer(reference: &str, hyp: &str) -> f64 {
    let (r, h) = (zh_chars(reference), zh_chars(hyp));
    edit_distance(&r, &h) as f64 / r.len() as f64
}

/// A file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures").join(rel)).expect("fixture")
}

/// Event seqs in the order received.
pub fn event_seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect()
}

/// Asserts the seqs are 1, 2, 3, … (in order, no gap, no repeat).
pub fn assert_seqs_contiguous(events: &[Value], ctx: &str) {
    let seqs = event_seqs(events);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "{ctx}");
}

/// Asserts the seqs strictly ascend (no repeat; gaps allowed, as after a restart).
pub fn assert_seqs_ascending(events: &[Value], ctx: &str) {
    let seqs = event_seqs(events);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{ctx}: {seqs:?}");
}

/// Waits (at most 10 s, checking every 10 ms) until `check` gives a value; panics naming
/// `what` otherwise. The one way tests wait for something to happen.
pub async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One long-poll page of a session's events after `cursor` (held up to 20 s), as JSON.
async fn events_page(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    token: &str,
    cursor: u64,
) -> Value {
    http.get(format!(
        "{url}/v1/sessions/{id}/events?after={cursor}&wait_ms=20000"
    ))
    .header("x-session-token", token)
    .send()
    .await
    .expect("poll")
    .json()
    .await
    .expect("json")
}
