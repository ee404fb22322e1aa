//! The load driver and the bare baseline server of `scripts/bench-gateway` (a benchmark, not a
//! test; README "Gateway benchmark").
//!
//! - `baseline --port P`: the physical limit of the stack: warp + tokio, everything in memory,
//!   the same routes and JSON shapes as voxpoll's session API (create; `POST …/audio?seq=N`
//!   publishes one event whose text is N to the session's channel; `GET …/events?after=K&
//!   wait_ms=W` long-polls it with a cursor), and none of voxpoll's work (no ordering window, no
//!   store, no provider, no limits).
//! - `s1`, `s2`, `s3`: the scenarios, against any URL with that API; each prints one JSON line.
//! - `fake-tencent`: the test suite's fake Tencent real-time ASR server (`tests/api/fakes`,
//!   signatures checked, ≤ 3× real-time pacing enforced), stamping each result text with its
//!   send time; prints its URL. `s6` drives real-time sessions through voxpoll's Tencent
//!   provider against it and measures what voxpoll adds between the fake's send and the poll.
//!
//! Every simulated client has its own HTTP/1.1 keep-alive connection(s); server CPU is read
//! from `/proc/<pid>/stat`, memory from `/proc/<pid>/status` (`VmRSS`).

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[allow(dead_code, unused_imports)]
#[path = "../tests/api/fakes/mod.rs"]
mod fakes;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The in-memory baseline server.
    Baseline {
        #[arg(long)]
        port: u16,
    },
    /// Chunk POST → event at a waiting long-poll.
    S1 {
        #[command(flatten)]
        t: Target,
        /// Sessions, each with a waiting poll.
        #[arg(long)]
        sessions: usize,
        /// Chunk POSTs per second over all sessions.
        #[arg(long)]
        rate: u64,
        /// Measured seconds (after a 2 s warm-up).
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
    /// Idle waiting polls: memory per session and per poll, idle CPU, hold-expiry jitter.
    S2 {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        sessions: usize,
        /// Poll hold, ms.
        #[arg(long, default_value_t = 25_000)]
        hold_ms: u64,
    },
    /// Chunk ingest: closed-loop POSTs of `body_bytes`, one session per worker.
    S3 {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        concurrency: usize,
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 6400)]
        body_bytes: usize,
    },
    /// The fake Tencent real-time ASR server; prints `{"url": …}` and serves until killed.
    FakeTencent {
        /// Connections at once before 4006.
        #[arg(long, default_value_t = 10_000)]
        max_connections: usize,
    },
    /// Real-time sessions through the Tencent provider against `fake-tencent`: what voxpoll
    /// adds between the fake sending a result and the result reaching a waiting poll.
    S6 {
        #[command(flatten)]
        t: Target,
        #[arg(long)]
        sessions: usize,
        /// Measured seconds (after a 3 s warm-up).
        #[arg(long, default_value_t = 20)]
        duration: u64,
    },
}

#[derive(clap::Args, Clone)]
struct Target {
    /// `127.0.0.1:PORT`.
    #[arg(long)]
    addr: String,
    /// The server's process id (CPU and RSS).
    #[arg(long)]
    pid: u32,
    /// JSON body of `POST /v1/sessions`.
    #[arg(long, default_value = "{}")]
    create: String,
    /// A label for the output line.
    #[arg(long, default_value = "")]
    label: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let out = match cli.cmd {
            Cmd::Baseline { port } => return baseline(port).await,
            Cmd::S1 {
                t,
                sessions,
                rate,
                duration,
            } => s1(&t, sessions, rate, duration).await?,
            Cmd::S2 {
                t,
                sessions,
                hold_ms,
            } => s2(&t, sessions, hold_ms).await?,
            Cmd::S3 {
                t,
                concurrency,
                duration,
                body_bytes,
            } => s3(&t, concurrency, duration, body_bytes).await?,
            Cmd::FakeTencent { max_connections } => return fake_tencent(max_connections).await,
            Cmd::S6 {
                t,
                sessions,
                duration,
            } => s6(&t, sessions, duration).await?,
        };
        println!("{out}");
        Ok(())
    })
}

// ---------------------------------------------------------------- the baseline server

#[derive(Default)]
struct Channel {
    /// (seq, text), the last 64.
    events: Mutex<VecDeque<(u64, String)>>,
    /// The highest seq.
    last: tokio::sync::watch::Sender<u64>,
}

async fn baseline(port: u16) -> anyhow::Result<()> {
    use warp::Filter;
    type Channels = Arc<Mutex<HashMap<u64, Arc<Channel>>>>;
    let channels: Channels = Arc::default();
    let next = Arc::new(AtomicU64::new(1));
    let ch = |c: Channels| warp::any().map(move || Arc::clone(&c));
    let create = warp::path!("v1" / "sessions")
        .and(warp::post())
        .and(ch(Arc::clone(&channels)))
        .map(move |c: Channels| {
            let id = next.fetch_add(1, Ordering::Relaxed);
            c.lock().unwrap().insert(id, Arc::default());
            warp::reply::with_status(
                warp::reply::json(&json!({"session_id": id.to_string(), "session_token": "t"})),
                warp::http::StatusCode::CREATED,
            )
        });
    let publish = warp::path!("v1" / "sessions" / u64 / "audio")
        .and(warp::post())
        .and(warp::query::<HashMap<String, u64>>())
        .and(warp::body::bytes())
        .and(ch(Arc::clone(&channels)))
        .map(
            |id: u64, q: HashMap<String, u64>, _body: Bytes, c: Channels| {
                let seq = q.get("seq").copied().unwrap_or(0);
                let Some(chan) = c.lock().unwrap().get(&id).cloned() else {
                    return warp::reply::with_status(
                        warp::reply::json(&json!({})),
                        warp::http::StatusCode::NOT_FOUND,
                    );
                };
                let ev_seq = {
                    let mut evs = chan.events.lock().unwrap();
                    let ev_seq = evs.back().map_or(1, |e| e.0 + 1);
                    evs.push_back((ev_seq, seq.to_string()));
                    if evs.len() > 64 {
                        evs.pop_front();
                    }
                    ev_seq
                };
                chan.last.send_replace(ev_seq);
                warp::reply::with_status(
                    warp::reply::json(&json!({"acked_seq": seq, "duplicate": false})),
                    warp::http::StatusCode::OK,
                )
            },
        );
    let poll = warp::path!("v1" / "sessions" / u64 / "events")
        .and(warp::get())
        .and(warp::query::<HashMap<String, u64>>())
        .and(ch(Arc::clone(&channels)))
        .then(|id: u64, q: HashMap<String, u64>, c: Channels| async move {
            let after = q.get("after").copied().unwrap_or(0);
            let wait = Duration::from_millis(q.get("wait_ms").copied().unwrap_or(25_000));
            let Some(chan) = c.lock().unwrap().get(&id).cloned() else {
                return warp::reply::json(&json!({"events": [], "next_cursor": after}));
            };
            let mut rx = chan.last.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|last| *last > after)).await;
            let evs: Vec<Value> = chan
                .events
                .lock()
                .unwrap()
                .iter()
                .filter(|e| e.0 > after)
                .map(|(seq, text)| json!({"seq": seq, "type": "partial", "sentence": 0, "text": text}))
                .collect();
            let next = evs.last().and_then(|e| e["seq"].as_u64()).unwrap_or(after);
            warp::reply::json(&json!({"events": evs, "next_cursor": next, "done": false}))
        });
    let routes = create.or(publish).or(poll);
    let listener = tokio::net::TcpSocket::new_v4()?;
    listener.set_reuseaddr(true)?;
    listener.bind(([127, 0, 0, 1], port).into())?;
    let listener = listener.listen(4096)?;
    warp::serve(routes).incoming(listener).run().await;
    Ok(())
}

// ---------------------------------------------------------------- the client side

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    tx: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            tx,
            host: addr.to_string(),
        })
    }

    /// One request; (status, body).
    async fn call(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.host);
        if let Some(t) = token {
            req = req.header("x-session-token", t);
        }
        if method == "POST" {
            let ct = if body.first() == Some(&b'{') {
                "application/json"
            } else {
                "application/octet-stream"
            };
            req = req.header("content-type", ct);
        }
        self.tx.ready().await?;
        let resp = self.tx.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// A created session: (id, token).
async fn create(conn: &mut Conn, body: &str) -> anyhow::Result<(String, String)> {
    let (status, b) = conn
        .call("POST", "/v1/sessions", None, Bytes::from(body.to_string()))
        .await?;
    anyhow::ensure!(
        status == 201,
        "create: {status} {}",
        String::from_utf8_lossy(&b)
    );
    let v: Value = serde_json::from_slice(&b)?;
    Ok((
        v["session_id"].as_str().unwrap_or_default().to_string(),
        v["session_token"].as_str().unwrap_or_default().to_string(),
    ))
}

/// One long-poll of session `id` after `cursor`: when its answer was read (before parsing)
/// and its events, with `cursor` moved past them; `None` after a failed poll (counted in
/// `errors`, then a 100 ms pause).
async fn poll_events(
    conn: &mut Conn,
    (id, token): (&str, &str),
    cursor: &mut u64,
    wait_ms: u64,
    errors: &AtomicU64,
) -> Option<(Instant, Vec<Value>)> {
    let path = format!("/v1/sessions/{id}/events?after={cursor}&wait_ms={wait_ms}");
    let r = conn.call("GET", &path, Some(token), Bytes::new()).await;
    let done = Instant::now();
    let Ok((200, body)) = r else {
        errors.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        return None;
    };
    let mut v: Value = serde_json::from_slice(&body).unwrap_or_default();
    *cursor = v["next_cursor"].as_u64().unwrap_or(*cursor);
    match v["events"].take() {
        Value::Array(events) => Some((done, events)),
        _ => Some((done, Vec::new())),
    }
}

/// Creates `n` sessions over 16 connections.
async fn create_many(t: &Target, n: usize) -> anyhow::Result<Vec<(String, String)>> {
    let per = n.div_ceil(16).max(1);
    let mut tasks = Vec::new();
    for part in 0..n.div_ceil(per) {
        let (addr, body) = (t.addr.clone(), t.create.clone());
        let count = per.min(n - part * per);
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(create(&mut conn, &body).await?);
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// CPU ticks (user + system) of a process.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12) // utime, stime (fields 14, 15 of stat)
}

/// Server CPU over a window as % of one core (100 ticks per second).
struct CpuWindow {
    pid: u32,
    ticks: u64,
    at: Instant,
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        Self {
            pid,
            ticks: cpu_ticks(pid),
            at: Instant::now(),
        }
    }
    fn pct(&self) -> f64 {
        let ticks = cpu_ticks(self.pid).saturating_sub(self.ticks) as f64;
        ticks / self.at.elapsed().as_secs_f64()
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Percentile of sorted milliseconds.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------- S1

struct S1Session {
    id: String,
    token: String,
    /// A poll is outstanding since this instant (None: not armed).
    armed_since: Mutex<Option<Instant>>,
    /// The publish whose event has not arrived yet: (seq, t0).
    pending: Mutex<Option<(u64, Instant)>>,
    next_seq: AtomicU64,
}

async fn s1(t: &Target, sessions: usize, rate: u64, duration: u64) -> anyhow::Result<Value> {
    const WARMUP: Duration = Duration::from_secs(2);
    const SETTLE: Duration = Duration::from_millis(2);
    let made = create_many(t, sessions).await?;
    let list: Vec<Arc<S1Session>> = made
        .into_iter()
        .map(|(id, token)| {
            Arc::new(S1Session {
                id,
                token,
                armed_since: Mutex::new(None),
                pending: Mutex::new(None),
                next_seq: AtomicU64::new(0),
            })
        })
        .collect();
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let measuring = Arc::new(AtomicBool::new(false));
    let poll_errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // One poll loop per session on its own connection.
    for s in &list {
        let (s, addr, lat, measuring, errors, stop) = (
            Arc::clone(s),
            t.addr.clone(),
            Arc::clone(&latencies),
            Arc::clone(&measuring),
            Arc::clone(&poll_errors),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let Ok(mut conn) = Conn::open(&addr).await else {
                errors.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let mut cursor = 0u64;
            while !stop.load(Ordering::Relaxed) {
                *s.armed_since.lock().unwrap() = Some(Instant::now());
                let polled =
                    poll_events(&mut conn, (&s.id, &s.token), &mut cursor, 25_000, &errors).await;
                *s.armed_since.lock().unwrap() = None;
                let Some((done, events)) = polled else {
                    continue;
                };
                for ev in &events {
                    let Some(seq) = ev["text"].as_str().and_then(|x| x.parse::<u64>().ok()) else {
                        continue;
                    };
                    let mut p = s.pending.lock().unwrap();
                    if let Some((want, t0)) = *p {
                        if seq >= want {
                            if measuring.load(Ordering::Relaxed) {
                                lat.lock()
                                    .unwrap()
                                    .push(done.duration_since(t0).as_secs_f64() * 1000.0);
                            }
                            *p = None;
                        }
                    }
                }
            }
        });
    }
    // One publish connection per session.
    let mut pubs = Vec::with_capacity(list.len());
    for _ in &list {
        pubs.push(Arc::new(tokio::sync::Mutex::new(
            Conn::open(&t.addr).await?,
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let body = Bytes::from(vec![0u8; 640]); // 20 ms of 16 kHz s16
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut published, mut skipped, mut i) = (0u64, 0u64, 0usize);
    let mut cpu = None;
    let publish_errors = Arc::new(AtomicU64::new(0));
    while started.elapsed() < WARMUP + Duration::from_secs(duration) {
        tick.tick().await;
        if cpu.is_none() && started.elapsed() >= WARMUP {
            measuring.store(true, Ordering::Relaxed);
            cpu = Some(CpuWindow::start(t.pid));
        }
        let s = Arc::clone(&list[i % list.len()]);
        let conn = Arc::clone(&pubs[i % list.len()]);
        i += 1;
        let armed = s
            .armed_since
            .lock()
            .unwrap()
            .is_some_and(|a| a.elapsed() >= SETTLE);
        if !armed || s.pending.lock().unwrap().is_some() {
            skipped += u64::from(cpu.is_some());
            continue;
        }
        let seq = s.next_seq.fetch_add(1, Ordering::Relaxed);
        *s.pending.lock().unwrap() = Some((seq, Instant::now()));
        published += u64::from(cpu.is_some());
        let (errors, body) = (Arc::clone(&publish_errors), body.clone());
        tokio::spawn(async move {
            let path = format!("/v1/sessions/{}/audio?seq={seq}", s.id);
            let r = conn
                .lock()
                .await
                .call("POST", &path, Some(&s.token), body)
                .await;
            if !matches!(r, Ok((200, _))) {
                errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let cpu_pct = cpu.map_or(0.0, |c| c.pct());
    measuring.store(false, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await; // grace for the last events
    let lost = list
        .iter()
        .filter(|s| s.pending.lock().unwrap().is_some())
        .count();
    stop.store(true, Ordering::Relaxed);
    let mut l = latencies.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    Ok(json!({
        "scenario": "s1", "label": t.label, "sessions": sessions, "rate": rate,
        "samples": l.len(), "published": published, "lost": lost, "not_armed": skipped,
        "poll_errors": poll_errors.load(Ordering::Relaxed),
        "publish_errors": publish_errors.load(Ordering::Relaxed),
        "p50_ms": round3(pct(&l, 50.0)), "p90_ms": round3(pct(&l, 90.0)),
        "p99_ms": round3(pct(&l, 99.0)), "max_ms": round3(l.last().copied().unwrap_or(f64::NAN)),
        "server_cpu_pct": round3(cpu_pct),
    }))
}

// ---------------------------------------------------------------- S2

async fn s2(t: &Target, sessions: usize, hold_ms: u64) -> anyhow::Result<Value> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_start = rss_kib(t.pid);
    let made = create_many(t, sessions).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_sessions = rss_kib(t.pid);
    let connects = Arc::new(Semaphore::new(200));
    let results = Arc::new(Mutex::new(Vec::<f64>::new()));
    let failures = Arc::new(AtomicU64::new(0));
    let opened = Instant::now();
    let mut tasks = Vec::with_capacity(sessions);
    for (id, token) in made {
        let (addr, connects, results, failures) = (
            t.addr.clone(),
            Arc::clone(&connects),
            Arc::clone(&results),
            Arc::clone(&failures),
        );
        tasks.push(tokio::spawn(async move {
            let permit = connects.acquire_owned().await;
            let Ok(mut conn) = Conn::open(&addr).await else {
                failures.fetch_add(1, Ordering::Relaxed);
                return;
            };
            drop(permit);
            let path = format!("/v1/sessions/{id}/events?after=0&wait_ms={hold_ms}");
            let sent = Instant::now();
            match conn.call("GET", &path, Some(&token), Bytes::new()).await {
                Ok((200, _)) => {
                    let jitter = sent.elapsed().as_secs_f64() * 1000.0 - hold_ms as f64;
                    results.lock().unwrap().push(jitter);
                }
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // All polls sent (connections made) — then 3 s for the server to settle.
    while connects.available_permits() < 200 || opened.elapsed() < Duration::from_millis(200) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open_s = opened.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_polls = rss_kib(t.pid);
    let idle = CpuWindow::start(t.pid);
    let left =
        Duration::from_millis(hold_ms).saturating_sub(opened.elapsed() + Duration::from_secs(2));
    tokio::time::sleep(left.min(Duration::from_secs(15))).await;
    let idle_cpu = idle.pct();
    for task in tasks {
        let _ = task.await;
    }
    let mut j = results.lock().unwrap().clone();
    j.sort_by(f64::total_cmp);
    let n = sessions.max(1) as f64;
    Ok(json!({
        "scenario": "s2", "label": t.label, "sessions": sessions, "hold_ms": hold_ms,
        "rss_start_kib": rss_start, "rss_sessions_kib": rss_sessions, "rss_polls_kib": rss_polls,
        "bytes_per_session": ((rss_sessions.saturating_sub(rss_start)) as f64 * 1024.0 / n).round(),
        "bytes_per_poll": ((rss_polls.saturating_sub(rss_sessions)) as f64 * 1024.0 / n).round(),
        "bytes_per_session_and_poll": ((rss_polls.saturating_sub(rss_start)) as f64 * 1024.0 / n).round(),
        "idle_cpu_pct": round3(idle_cpu),
        "jitter_p50_ms": round3(pct(&j, 50.0)), "jitter_p99_ms": round3(pct(&j, 99.0)),
        "jitter_max_ms": round3(j.last().copied().unwrap_or(f64::NAN)),
        "completed": j.len(), "failures": failures.load(Ordering::Relaxed),
        "open_s": round3(open_s),
    }))
}

// ---------------------------------------------------------------- S3

async fn s3(
    t: &Target,
    concurrency: usize,
    duration: u64,
    body_bytes: usize,
) -> anyhow::Result<Value> {
    const WARMUP: Duration = Duration::from_secs(2);
    let made = create_many(t, concurrency).await?;
    let body = Bytes::from(vec![0u8; body_bytes]);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (id, token) in made {
        let (addr, body, measuring, stop, errors) = (
            t.addr.clone(),
            body.clone(),
            Arc::clone(&measuring),
            Arc::clone(&stop),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut conn = Conn::open(&addr).await?;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let path = format!("/v1/sessions/{id}/audio?seq={seq}");
                let t0 = Instant::now();
                let r = conn.call("POST", &path, Some(&token), body.clone()).await;
                let ok = matches!(r, Ok((200, _)));
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if ok {
                    seq += 1;
                } else if r.is_err() {
                    conn = Conn::open(&addr).await?;
                }
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    let cpu = CpuWindow::start(t.pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = window.elapsed().as_secs_f64();
    let cpu_pct = cpu.pct();
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort_by(f64::total_cmp);
    Ok(json!({
        "scenario": "s3", "label": t.label, "concurrency": concurrency, "body_bytes": body_bytes,
        "req_per_s": (all.len() as f64 / secs).round(), "requests": all.len(),
        "errors": errors.load(Ordering::Relaxed),
        "p50_ms": round3(pct(&all, 50.0)), "p99_ms": round3(pct(&all, 99.0)),
        "server_cpu_pct": round3(cpu_pct),
    }))
}

// ---------------------------------------------------------------- S6

async fn fake_tencent(max_connections: usize) -> anyhow::Result<()> {
    let fake = fakes::tencent::FakeTencent::start(fakes::tencent::Behavior {
        max_connections,
        stamp_texts: true,
        keep_raw: false,
        ..Default::default()
    })
    .await;
    println!(
        "{}",
        json!({"url": fake.url, "app_id": fakes::tencent::APP_ID,
        "secret_id": fakes::tencent::SECRET_ID, "secret_key": fakes::tencent::SECRET_KEY})
    );
    std::future::pending::<()>().await;
    Ok(())
}

/// 200 ms (6400 B) of the S6 speaker at `chunk`: 2 s of a tone, then 1 s of silence, over and
/// over, so the fake's energy segmentation gives a partial every 600 ms of voice and a final
/// 300 ms into each pause.
fn s6_chunk(chunk: u64) -> Bytes {
    let pos_ms = (chunk * 200) % 3000;
    let pcm: Vec<i16> = if pos_ms < 2000 {
        fakes::tone(200)
    } else {
        vec![0; 3200]
    };
    Bytes::from(
        pcm.iter()
            .flat_map(|s| s.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

async fn s6(t: &Target, sessions: usize, duration: u64) -> anyhow::Result<Value> {
    const WARMUP: Duration = Duration::from_secs(3);
    let made = create_many(t, sessions).await?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // (ms added, the result was a final)
    let added = Arc::new(Mutex::new(Vec::<(f64, bool)>::new()));
    let uploads = Arc::new(Mutex::new(Vec::<f64>::new()));
    let (poll_errors, upload_errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for (i, (id, token)) in made.into_iter().enumerate() {
        // Uploader: one 200 ms chunk every 200 ms, the sessions' phases spread over 200 ms.
        let (addr, measuring_up, stop_up, uploads, errors) = (
            t.addr.clone(),
            Arc::clone(&measuring),
            Arc::clone(&stop),
            Arc::clone(&uploads),
            Arc::clone(&upload_errors),
        );
        let (up_id, up_token) = (id.clone(), token.clone());
        let offset = Duration::from_micros(200_000 * i as u64 / sessions.max(1) as u64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut conn = Conn::open(&addr).await?;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            let mut seq = 0u64;
            while !stop_up.load(Ordering::Relaxed) {
                tick.tick().await;
                let path = format!("/v1/sessions/{up_id}/audio?seq={seq}");
                let t0 = Instant::now();
                let r = conn
                    .call("POST", &path, Some(&up_token), s6_chunk(seq))
                    .await;
                if matches!(r, Ok((200, _))) {
                    if measuring_up.load(Ordering::Relaxed) {
                        uploads
                            .lock()
                            .unwrap()
                            .push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    seq += 1;
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    if r.is_err() {
                        conn = Conn::open(&addr).await?;
                    }
                }
            }
            anyhow::Ok(())
        }));
        // Poller: a waiting long-poll at all times.
        let (addr, measuring, stop, added, errors) = (
            t.addr.clone(),
            Arc::clone(&measuring),
            Arc::clone(&stop),
            Arc::clone(&added),
            Arc::clone(&poll_errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(&addr).await?;
            let mut cursor = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let polled =
                    poll_events(&mut conn, (&id, &token), &mut cursor, 2_000, &errors).await;
                let Some((done, events)) = polled else {
                    continue;
                };
                // The arrival as unix µs, to compare with the fake's stamps.
                let now =
                    fakes::tencent::now_us().saturating_sub(done.elapsed().as_micros() as u64);
                for ev in &events {
                    let stamp = ev["text"]
                        .as_str()
                        .and_then(|x| x.rsplit_once('@'))
                        .and_then(|(_, us)| us.parse::<u64>().ok());
                    if let (Some(us), true) = (stamp, measuring.load(Ordering::Relaxed)) {
                        let ms = now.saturating_sub(us) as f64 / 1000.0;
                        added.lock().unwrap().push((ms, ev["type"] == "final"));
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(WARMUP).await;
    measuring.store(true, Ordering::Relaxed);
    let cpu = CpuWindow::start(t.pid);
    tokio::time::sleep(Duration::from_secs(duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu_pct = cpu.pct();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let sorted = |finals: Option<bool>| {
        let mut v: Vec<f64> = added
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| finals.is_none_or(|want| *f == want))
            .map(|(ms, _)| *ms)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let (a, finals) = (sorted(None), sorted(Some(true)));
    let mut u = uploads.lock().unwrap().clone();
    u.sort_by(f64::total_cmp);
    Ok(json!({
        "scenario": "s6", "label": t.label, "sessions": sessions, "duration_s": duration,
        "results": a.len(),
        "added_p50_ms": round3(pct(&a, 50.0)), "added_p90_ms": round3(pct(&a, 90.0)),
        "added_p99_ms": round3(pct(&a, 99.0)),
        "added_max_ms": round3(a.last().copied().unwrap_or(f64::NAN)),
        "finals": finals.len(), "final_added_p50_ms": round3(pct(&finals, 50.0)),
        "final_added_p99_ms": round3(pct(&finals, 99.0)),
        "uploads": u.len(), "upload_p50_ms": round3(pct(&u, 50.0)),
        "upload_p99_ms": round3(pct(&u, 99.0)),
        "upload_errors": upload_errors.load(Ordering::Relaxed),
        "poll_errors": poll_errors.load(Ordering::Relaxed),
        "server_cpu_pct": round3(cpu_pct),
    }))
}
