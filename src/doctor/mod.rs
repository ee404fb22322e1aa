//! `voxpoll doctor URL`: probes a deployment from the client's side of every proxy, the way the
//! seeds' engineers diagnosed hosts by hand (shared/longpoll-and-hosting.md §0, §2.3), and prints a
//! verdict with the settings to use. It measures, all at once:
//!
//! - reachability, TLS and round-trip time (`GET /health`, three times);
//! - whether a WebSocket upgrade passes (`GET /v1/probe/ws`): ok, refused with an HTTP status
//!   (404 from hosts that reject upgrades, 426 when voxpoll got a plain request because the proxy
//!   dropped the upgrade headers or speaks HTTP/1.0 upstream), silent (101 but nothing arrives),
//!   or closed early (1005/1006);
//! - how long a held request survives (`GET /v1/probe/hold`, up to `--max-hold-s`);
//! - whether the path buffers streamed responses (`GET /v1/probe/stream`, sent with
//!   `Accept-Encoding: gzip` as real clients send it: compressing proxies buffer);
//! - the largest request body accepted (`POST /v1/probe/echo`, growing sizes);
//! - the server's file-descriptor budget (`GET /ready`'s `file_descriptors`): its `ulimit -n`
//!   against what its limits may hold open.

use serde::Serialize;
mod probes;

use probes::{probe_body, probe_health, probe_hold, probe_ready, probe_stream, probe_ws};
use std::time::Duration;

/// `voxpoll doctor` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Base URL of the deployment, e.g. `https://asr.example.com` (a path prefix is kept).
    pub url: String,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Longest hold to try, in seconds (wx.request cuts every request at 60 s).
    #[arg(long, default_value_t = 65)]
    pub max_hold_s: u64,
    /// Largest body to try, in bytes.
    #[arg(long, default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Timeout of the quick probes (health, WebSocket, stream, bodies), in seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_s: u64,
    /// API key for a deployment with auth on (sent as `X-Api-Key`; the probes need it there).
    #[arg(long, env = "VOXPOLL_DOCTOR_API_KEY", hide_env_values = true)]
    pub api_key: Option<crate::secret::Secret>,
    /// Bearer JWT for a deployment with auth on (sent as `Authorization: Bearer …`).
    #[arg(long, env = "VOXPOLL_DOCTOR_TOKEN", hide_env_values = true)]
    pub token: Option<crate::secret::Secret>,
}

/// The credentials headers the probes send.
fn credentials(args: &DoctorArgs) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut h = reqwest::header::HeaderMap::new();
    if let Some(k) = &args.api_key {
        h.insert("x-api-key", k.expose().parse()?);
    }
    if let Some(t) = &args.token {
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", t.expose()).parse()?,
        );
    }
    Ok(h)
}

/// Everything doctor measured, plus the verdict. The JSON shape of `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The URL probed.
    pub url: String,
    /// `GET /health` answered 200.
    pub reachable: bool,
    /// `https` was used and the certificate verified (None for plain http).
    pub tls_ok: Option<bool>,
    /// Status of `GET /health`, when an answer came.
    pub health_status: Option<u16>,
    /// Connection or TLS error, when no answer came.
    pub error: Option<String>,
    /// Round-trip time of `GET /health`, ms: the fastest of three.
    pub rtt_ms: Option<u64>,
    /// The WebSocket probe.
    pub websocket: WsProbe,
    /// The held-request probe.
    pub hold: HoldProbe,
    /// The streamed-response probe.
    pub buffering: StreamProbe,
    /// The body-size probe.
    pub body: BodyProbe,
    /// The server's file-descriptor budget from `GET /ready`, when it answers one.
    pub file_descriptors: Option<crate::fdlimit::FdBudget>,
    /// What to change or use.
    pub verdict: Verdict,
}

/// Outcome of the WebSocket upgrade.
#[derive(Debug, Clone, Serialize)]
pub struct WsProbe {
    /// `ok`, `refused` (HTTP status instead of 101), `silent` (101 but no frame), `closed`
    /// (closed before the first frame), `error` (connection failed).
    pub outcome: String,
    /// HTTP status of a refused upgrade.
    pub status: Option<u16>,
    /// Close code of an early close (1005 = no status, 1006 = dropped).
    pub close_code: Option<u16>,
    /// Time to the `ready` frame, ms.
    pub ready_ms: Option<u64>,
    /// Human detail.
    pub detail: String,
}

/// Outcome of the held request.
#[derive(Debug, Clone, Serialize)]
pub struct HoldProbe {
    /// Hold asked for, ms.
    pub asked_ms: u64,
    /// The request came back 200 after the full hold.
    pub survived: bool,
    /// When it was cut, ms after sending (when it did not survive).
    pub cut_at_ms: Option<u64>,
    /// Status of the cut (504 from a proxy timeout), if an answer came.
    pub status: Option<u16>,
}

/// Outcome of the streamed response.
#[derive(Debug, Clone, Serialize)]
pub struct StreamProbe {
    /// The first event arrived only near the end: the path buffers responses.
    pub buffered: Option<bool>,
    /// First event after, ms.
    pub first_event_ms: Option<u64>,
    /// Last byte after, ms.
    pub total_ms: Option<u64>,
    /// Why the probe failed, if it did.
    pub error: Option<String>,
}

/// Outcome of the body-size probe.
#[derive(Debug, Clone, Serialize)]
pub struct BodyProbe {
    /// Largest size that came back 200, bytes.
    pub largest_ok: Option<usize>,
    /// First size refused, bytes.
    pub refused_at: Option<usize>,
    /// Its status (413 from a proxy's body cap).
    pub refused_status: Option<u16>,
}

/// Settings to use and problems found.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// `websocket` or `long-poll`.
    pub transport: String,
    /// Long-poll hold to configure (`VOXPOLL_POLL_HOLD_MS`, and the most a client should ask), ms.
    pub hold_ms: u64,
    /// Chunk size for uploads (`VOXPOLL_CHUNK_BYTES`), bytes.
    pub chunk_bytes: usize,
    /// Largest chunk to allow (`VOXPOLL_MAX_CHUNK_BYTES`), bytes.
    pub max_chunk_bytes: usize,
    /// Problems, each `{code, message}`.
    pub problems: Vec<Problem>,
}

/// One problem found.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// `unreachable`, `tls`, `health`, `websocket_refused`, `websocket_upgrade_dropped`,
    /// `websocket_silent`, `websocket_closed`, `hold_cut`, `responses_buffered`, `body_cap`,
    /// `body_refused`, `fd_limit`.
    pub code: String,
    /// What it means and what to do.
    pub message: String,
}

const SIZES: [usize; 9] = [
    16 << 10,
    64 << 10,
    96 << 10,
    100 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    4 << 20,
];

/// Runs every probe and prints the report. Exits non-zero when the deployment is unreachable.
///
/// # Errors
/// Only for a malformed URL; every network failure is part of the report.
pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let report = diagnose(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    if !report.reachable {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs every probe concurrently and derives the verdict.
///
/// # Errors
/// A URL that is not http(s).
pub async fn diagnose(args: &DoctorArgs) -> anyhow::Result<Report> {
    let base = args.url.trim_end_matches('/').to_string();
    anyhow::ensure!(
        base.starts_with("http://") || base.starts_with("https://"),
        "URL must start with http:// or https://"
    );
    let quick = Duration::from_secs(args.timeout_s);
    let creds = credentials(args)?;
    let http = reqwest::Client::builder()
        .connect_timeout(quick)
        .default_headers(creds.clone())
        .build()?;
    let (health, websocket, hold, buffering, body, file_descriptors) = tokio::join!(
        probe_health(&http, &base, quick),
        probe_ws(&base, quick, &creds),
        probe_hold(&http, &base, args.max_hold_s * 1000),
        probe_stream(&http, &base, quick),
        probe_body(&http, &base, args.max_body_bytes, quick),
        probe_ready(&http, &base, quick),
    );
    let (reachable, tls_ok, health_status, error, rtt_ms) = health;
    let mut report = Report {
        url: base,
        reachable,
        tls_ok,
        health_status,
        error,
        rtt_ms,
        websocket,
        hold,
        buffering,
        body,
        file_descriptors,
        verdict: Verdict {
            transport: String::new(),
            hold_ms: 0,
            chunk_bytes: 0,
            max_chunk_bytes: 0,
            problems: Vec::new(),
        },
    };
    report.verdict = verdict(&report);
    Ok(report)
}

fn problem(code: &str, message: String) -> Problem {
    Problem {
        code: code.into(),
        message,
    }
}

/// Derives the settings and problems from the measurements.
pub fn verdict(r: &Report) -> Verdict {
    let mut problems = Vec::new();
    if !r.reachable {
        let code = if r.tls_ok == Some(false) {
            "tls"
        } else if r.health_status.is_some() {
            "health"
        } else {
            "unreachable"
        };
        problems.push(problem(code, match (&r.error, r.health_status) {
            (Some(e), _) => format!("GET /health failed: {e}"),
            (None, Some(s)) => format!("GET /health answered {s}, not 200: is this a voxpoll deployment, and is the path prefix right?"),
            _ => "GET /health failed".into(),
        }));
    }
    let ws = &r.websocket;
    match ws.outcome.as_str() {
        "ok" => {}
        _ if !r.reachable => {} // the reachability problem says it all
        "refused" if ws.status == Some(426) => problems.push(problem("websocket_upgrade_dropped", "the proxy forwarded the WebSocket upgrade as a plain request (voxpoll answered 426): it speaks HTTP/1.0 upstream or drops the Upgrade/Connection headers (nginx: proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection \"upgrade\"). Use long-polling.".into())),
        "refused" => problems.push(problem("websocket_refused", format!("the host answers the WebSocket upgrade with {} (cloud hosts that block upgrades answer 404). Use long-polling.", ws.status.unwrap_or(0)))),
        "silent" => problems.push(problem("websocket_silent", format!("WebSocket: {}; something on the path swallows the socket. Use long-polling.", ws.detail))),
        "closed" => problems.push(problem("websocket_closed", format!("WebSocket closed early ({}): {}. Use long-polling.", ws.close_code.unwrap_or(1006), ws.detail))),
        _ => problems.push(problem("websocket_refused", format!("WebSocket failed: {}. Use long-polling.", ws.detail))),
    }
    let default_hold = 25_000;
    let hold_ms = match (r.hold.survived, r.hold.cut_at_ms) {
        (false, Some(cut)) if r.reachable => {
            let hold = if cut > 10_000 { cut - 5_000 } else { cut / 2 };
            let hold = (hold / 1000 * 1000).clamp(1000, default_hold);
            problems.push(problem("hold_cut", format!(
                "held requests are cut after about {} s{}: hold polls for at most {} s (VOXPOLL_POLL_HOLD_MS={hold}, VOXPOLL_POLL_MAX_HOLD_MS={hold}) or raise the proxy's read timeout",
                (cut + 500) / 1000,
                r.hold.status.map_or(String::new(), |s| format!(" (HTTP {s})")),
                hold / 1000,
            )));
            hold
        }
        _ => default_hold,
    };
    if r.buffering.buffered == Some(true) {
        problems.push(problem("responses_buffered", format!(
            "the path buffers streamed responses (first event after {} ms of {} ms): streaming (SSE, chunked) will not reach clients in time; long-polling and WebSocket are unaffected (nginx: proxy_buffering off and no gzip for text/event-stream, or X-Accel-Buffering: no)",
            r.buffering.first_event_ms.unwrap_or(0),
            r.buffering.total_ms.unwrap_or(0),
        )));
    }
    if let Some(crate::fdlimit::FdBudget {
        limit: Some(limit),
        needed,
        ..
    }) = r.file_descriptors
    {
        if limit < needed {
            problems.push(problem("fd_limit", format!(
                "the server may open only {limit} files and sockets (ulimit -n) but its limits may hold {needed} open: past it new connections wait unanswered and chunk writes fail; raise the hard limit (systemd LimitNOFILE=, docker run --ulimit nofile=N:N) or lower VOXPOLL_MAX_CONNECTIONS / VOXPOLL_MAX_SESSIONS"
            )));
        }
    }
    let default_max = 96 * 1024;
    let max_chunk_bytes = match (r.body.largest_ok, r.body.refused_at) {
        (None, Some(refused)) if r.reachable => {
            problems.push(problem("body_refused", format!(
                "every request body was refused, down to {} KB{}: chunk uploads cannot pass this path; raise the proxy's body limit (nginx client_max_body_size) or check its upstream",
                refused / 1024,
                r.body.refused_status.map_or(String::new(), |s| format!(" (HTTP {s})")),
            )));
            0
        }
        (ok, Some(refused)) if r.reachable => {
            let ok = ok.unwrap_or(0);
            problems.push(problem("body_cap", format!(
                "request bodies over {} KB are refused{} ({} KB passed): keep chunks ≤ {} KB (VOXPOLL_MAX_CHUNK_BYTES) and one-shot uploads under the cap (WeChat callContainer caps requests at 100 KB)",
                refused / 1024,
                r.body.refused_status.map_or(String::new(), |s| format!(" with {s}")),
                ok / 1024,
                ok.min(default_max) / 1024,
            )));
            ok.min(default_max)
        }
        _ => default_max,
    };
    Verdict {
        transport: if ws.outcome == "ok" {
            "websocket"
        } else {
            "long-poll"
        }
        .into(),
        hold_ms,
        chunk_bytes: 8192.min(max_chunk_bytes.max(1024)),
        max_chunk_bytes,
        problems,
    }
}

/// The text report.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "voxpoll doctor {}", r.url);
    let _ = writeln!(
        s,
        "  reachable      {}{}{}",
        if r.reachable { "yes" } else { "NO" },
        r.rtt_ms
            .map_or(String::new(), |ms| format!(", rtt {ms} ms")),
        match r.tls_ok {
            Some(true) => ", TLS ok",
            Some(false) => ", TLS FAILED",
            None => "",
        }
    );
    if let Some(e) = &r.error {
        let _ = writeln!(s, "                 {e}");
    }
    let _ = writeln!(
        s,
        "  websocket      {} — {}",
        r.websocket.outcome, r.websocket.detail
    );
    let _ = writeln!(
        s,
        "  held request   {}",
        if r.hold.survived {
            format!("survived {} s", r.hold.asked_ms / 1000)
        } else {
            format!(
                "cut after {} ms{}",
                r.hold.cut_at_ms.unwrap_or(0),
                r.hold
                    .status
                    .map_or(String::new(), |st| format!(" (HTTP {st})"))
            )
        }
    );
    let _ = writeln!(
        s,
        "  buffering      {}",
        match r.buffering.buffered {
            Some(true) => "responses buffered".to_string(),
            Some(false) => "none (events streamed)".into(),
            None => format!("unknown ({})", r.buffering.error.as_deref().unwrap_or("-")),
        }
    );
    let _ = writeln!(
        s,
        "  largest body   {}",
        match (r.body.largest_ok, r.body.refused_at) {
            (Some(ok), Some(no)) => format!("{} KB ok, {} KB refused", ok / 1024, no / 1024),
            (Some(ok), None) => format!("{} KB ok (largest tried)", ok / 1024),
            _ => "none accepted".into(),
        }
    );
    if let Some(fd) = &r.file_descriptors {
        let _ = writeln!(
            s,
            "  server fds     limit {}, needed {}, open {}",
            fd.limit.map_or("none".into(), |l| l.to_string()),
            fd.needed,
            fd.open.map_or("?".into(), |o| o.to_string())
        );
    }
    let v = &r.verdict;
    let _ = writeln!(s, "verdict");
    let _ = writeln!(
        s,
        "  transport {}, hold {} ms, chunk {} bytes (max {})",
        v.transport, v.hold_ms, v.chunk_bytes, v.max_chunk_bytes
    );
    if v.problems.is_empty() {
        let _ = writeln!(s, "  no problems found");
    }
    for p in &v.problems {
        let _ = writeln!(s, "  [{}] {}", p.code, p.message);
    }
    s
}
