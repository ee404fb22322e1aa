//! `GET /metrics` and JSON logs, on the real binary (a child process: its metrics are its own,
//! so counts are exact).

use crate::fakes::tencent::{Behavior, FakeTencent, APP_ID, SECRET_ID, SECRET_KEY};
use crate::process::{create_with, drain, Server};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const TOKEN: &str = "metrics-token-0123456789";

/// One sample line's value: `name{labels} value` with exactly these labels (any order).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        let (n, rest) = key.split_once('{').unwrap_or((key, "}"));
        if n != name {
            return None;
        }
        let got: HashMap<&str, &str> = rest
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k, v.trim_matches('"')))
            .collect();
        let want: HashMap<&str, &str> = labels.iter().copied().collect();
        (got == want).then(|| value.parse().ok())?
    })
}

async fn scrape(s: &Server) -> String {
    let r = s
        .http
        .get(format!("{}/metrics", s.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    r.text().await.unwrap()
}

fn loopback_file(dir: &std::path::Path) -> std::path::PathBuf {
    let file = dir.join("providers.json");
    std::fs::write(&file, r#"[{"name":"loopback","kind":"loopback"}]"#).unwrap();
    file
}

#[tokio::test]
async fn metrics_count_what_a_session_did() {
    let dir = tempfile::tempdir().unwrap();
    let providers = loopback_file(dir.path());
    let s = Server::start_with_env(
        &dir.path().join("db.sqlite"),
        &["--providers", providers.to_str().unwrap()],
        &[("VOXPOLL_METRICS_TOKEN", TOKEN)],
    );
    // The token is required.
    for auth in [None, Some("Bearer wrong"), Some(TOKEN)] {
        let mut req = s.http.get(format!("{}/metrics", s.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_metrics_token");
    }
    let (id, token) = create_with(&s, json!({"provider": "loopback"})).await;
    // A poll held while we scrape.
    let held = {
        let (http, url, id, token) = (s.http.clone(), s.url.clone(), id.clone(), token.clone());
        tokio::spawn(async move {
            http.get(format!(
                "{url}/v1/sessions/{id}/events?after=0&wait_ms=3000"
            ))
            .header("x-session-token", &token)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = scrape(&s).await;
    assert_eq!(
        sample(&during, "voxpoll_polls_waiting", &[]),
        Some(1.0),
        "{during}"
    );
    assert_eq!(
        sample(&during, "voxpoll_sessions", &[("state", "open")]),
        Some(1.0)
    );

    let chunk = vec![0u8; 6400];
    for seq in 0..5 {
        s.upload(&id, &token, seq, false, &chunk).await;
    }
    let woken = held.await.unwrap();
    assert!(!woken["events"].as_array().unwrap().is_empty(), "{woken}");
    s.upload(&id, &token, 4, false, &chunk).await; // a retry: duplicate
    let far = s
        .http
        .post(format!("{}/v1/sessions/{id}/audio?seq=900", s.url))
        .header("x-session-token", &token)
        .body(chunk.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(far.status(), 409);
    s.upload(&id, &token, 5, true, &chunk).await;
    let events = drain(&s, &id, &token, 0).await;
    let end = events.last().unwrap();
    assert_eq!(end["type"], "end");
    assert_eq!(end["reason"], "finished");

    let m = scrape(&s).await;
    let get = |name: &str, labels: &[(&str, &str)]| sample(&m, name, labels);
    let audio = "/v1/sessions/{id}/audio";
    assert_eq!(get("voxpoll_sessions_created_total", &[]), Some(1.0), "{m}");
    assert_eq!(
        get("voxpoll_sessions_ended_total", &[("reason", "finished")]),
        Some(1.0)
    );
    assert_eq!(get("voxpoll_sessions", &[("state", "ended")]), Some(1.0));
    assert_eq!(
        get("voxpoll_chunks_total", &[("outcome", "accepted")]),
        Some(6.0)
    );
    assert_eq!(
        get("voxpoll_chunks_total", &[("outcome", "duplicate")]),
        Some(1.0)
    );
    assert_eq!(
        get("voxpoll_chunks_total", &[("outcome", "out_of_window")]),
        Some(1.0)
    );
    assert_eq!(get("voxpoll_chunk_bytes_total", &[]), Some(6.0 * 6400.0));
    assert_eq!(
        get(
            "voxpoll_provider_stream_opens_total",
            &[("provider", "loopback")]
        ),
        Some(1.0)
    );
    let delivered = get("voxpoll_events_delivered_total", &[("transport", "poll")]).unwrap();
    let seen = (events.len() + woken["events"].as_array().unwrap().len()) as f64;
    assert_eq!(delivered, seen, "every event handed out is counted once");
    let http = |status: &str| {
        get(
            "voxpoll_http_responses_total",
            &[("route", audio), ("method", "POST"), ("status", status)],
        )
    };
    assert_eq!(http("200"), Some(7.0));
    assert_eq!(http("409"), Some(1.0));
    assert_eq!(
        get(
            "voxpoll_http_responses_total",
            &[("route", "/metrics"), ("method", "GET"), ("status", "401")]
        ),
        Some(3.0)
    );
    // Histograms are real Prometheus histograms (buckets), per route.
    let le_inf = [
        ("route", audio),
        ("method", "POST"),
        ("status", "200"),
        ("le", "+Inf"),
    ];
    assert_eq!(
        get("voxpoll_http_request_duration_seconds_bucket", &le_inf),
        Some(7.0)
    );
    let final_latency = [("provider", "loopback"), ("kind", "final")];
    assert_eq!(
        get(
            "voxpoll_provider_result_latency_seconds_count",
            &final_latency
        ),
        Some(1.0)
    );
    assert_eq!(
        get(
            "voxpoll_provider_result_latency_seconds_count",
            &[("provider", "loopback"), ("kind", "partial")]
        ),
        Some(6.0)
    );
    let commits = [("engine", "sqlite"), ("op", "put_chunks")];
    assert!(get("voxpoll_store_commit_duration_seconds_count", &commits).unwrap() >= 1.0);
    assert!(m.contains("# TYPE voxpoll_http_request_duration_seconds histogram"));
    assert!(m.contains("# HELP voxpoll_chunks_total"));
}

/// A session through the Tencent provider (its fake) with `VOXPOLL_LOG_FORMAT=json` at debug
/// level: every line is one JSON object, the lines the session causes carry its span, and no
/// secret (Tencent key, session token, API key, metrics token) is in any line.
#[tokio::test]
async fn json_logs_carry_the_session_span_and_never_a_secret() {
    let fake = FakeTencent::start(Behavior::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("providers.json");
    std::fs::write(
        &file,
        json!([{"name": "tc", "kind": "tencent", "realtime_url": fake.url, "bridge_after_ms": 500}])
            .to_string(),
    )
    .unwrap();
    let api_key = "alice:api-key-must-not-leak-42";
    let s = Server::start_with_env(
        &dir.path().join("db.sqlite"),
        &["--providers", file.to_str().unwrap()],
        &[
            ("VOXPOLL_LOG_FORMAT", "json"),
            ("RUST_LOG", "voxpoll=debug"),
            ("TENCENT_APP_ID", APP_ID),
            ("TENCENT_SECRET_ID", SECRET_ID),
            ("TENCENT_SECRET_KEY", SECRET_KEY),
            ("VOXPOLL_API_KEYS", api_key),
            ("VOXPOLL_METRICS_TOKEN", TOKEN),
        ],
    );
    let created: Value = s
        .http
        .post(format!("{}/v1/sessions", s.url))
        .header("x-api-key", "api-key-must-not-leak-42")
        .json(&json!({"provider": "tc", "engine": "16k_zh"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["session_id"].as_str().expect("created").to_string();
    let token = created["session_token"].as_str().unwrap().to_string();
    let chunks = crate::process::speech_chunks();
    for (seq, c) in chunks.iter().take(15).enumerate() {
        s.upload(&id, &token, seq, seq == 14, c).await;
    }
    let events = drain(&s, &id, &token, 0).await;
    assert_eq!(events.last().unwrap()["reason"], "finished", "{events:?}");
    assert!(
        !fake.conns().is_empty(),
        "the session went through the fake"
    );
    let _ = scrape(&s).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = s.log_lines();
    let mut in_span = 0;
    let mut provider_lines = 0;
    for line in &lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        for secret in [
            SECRET_KEY,
            token.as_str(),
            "api-key-must-not-leak-42",
            TOKEN,
        ] {
            assert!(!line.contains(secret), "a secret in the log: {line}");
        }
        let target = v["target"].as_str().unwrap_or_default();
        if target.starts_with("voxpoll::session::worker") || target.starts_with("voxpoll::provider")
        {
            if v["span"]["id"] == id.as_str() {
                assert_eq!(v["span"]["provider"], "tc", "{line}");
                assert_eq!(v["span"]["epoch"], created["epoch"], "{line}");
                in_span += 1;
                provider_lines += usize::from(target.starts_with("voxpoll::provider"));
            } else {
                assert!(
                    v["span"].is_null() || v["span"]["name"] != "session",
                    "{line}"
                );
            }
        }
    }
    assert!(in_span >= 2, "session lines carry the span: {lines:#?}");
    assert!(
        provider_lines >= 1,
        "the provider's own lines carry it too: {lines:#?}"
    );
    s.terminate();
}

/// `voxpoll serve` with `args`, under `ulimit -Sn soft` and `ulimit -Hn hard`, logging JSON.
fn start_under_ulimit(db: &std::path::Path, args: &[&str], soft: u64, hard: u64) -> Server {
    let serve = crate::process::serve_command(db, args);
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$@\""
        ))
        .arg("sh")
        .arg(serve.get_program())
        .args(serve.get_args())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "voxpoll=info")
        .env("VOXPOLL_LOG_FORMAT", "json");
    Server::start_command(cmd)
}

/// The JSON log lines whose message starts with `prefix`.
fn logged(s: &Server, prefix: &str) -> Vec<Value> {
    s.log_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

/// `voxpoll doctor`'s report on `s` (quick probes).
async fn doctor(s: &Server) -> voxpoll::doctor::Report {
    let args = voxpoll::doctor::DoctorArgs {
        url: s.url.clone(),
        json: true,
        max_hold_s: 1,
        max_body_bytes: 64 << 10,
        timeout_s: 5,
        api_key: None,
        token: None,
    };
    voxpoll::doctor::diagnose(&args).await.expect("diagnose")
}

fn fd_problems(r: &voxpoll::doctor::Report) -> Vec<String> {
    let p = r.verdict.problems.iter().filter(|p| p.code == "fd_limit");
    p.map(|p| p.message.clone()).collect()
}

async fn fd_budget(s: &Server) -> Value {
    let r = s.http.get(format!("{}/ready", s.url)).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "a short fd limit does not make the server unready"
    );
    r.json::<Value>().await.unwrap()["file_descriptors"].clone()
}

/// A soft `ulimit -n` under the hard one is raised to it at start; a hard one below what the
/// limits may hold open (`max_connections` + `max_sessions` + 256 chunk files + 3 × 8 SQLite
/// connections + 64) is warned about, with what to change, and shown by `/ready`; at exactly
/// that many there is no warning. `voxpoll doctor` reports it as a problem; `/metrics` has
/// `process_open_fds`, `process_max_fds` and `voxpoll_fds_needed`.
#[tokio::test]
async fn the_fd_limit_is_raised_to_the_hard_limit_and_checked_against_the_limits() {
    let (_, hard_here) = rlimit::Resource::NOFILE.get().unwrap();
    if hard_here < 1500 {
        eprintln!("skipped: this process's hard fd limit is {hard_here} (< 1500)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let needed_default = 768 + 64 + 256 + 3 * 8 + 64;

    // Raised: soft 300 under hard 1500.
    let s = start_under_ulimit(&db, &[], 300, 1500);
    let fd = fd_budget(&s).await;
    assert_eq!(fd["limit"], 1500, "{fd}");
    assert_eq!(fd["needed"], needed_default, "{fd}");
    let open = fd["open"].as_u64().expect("open fds on Linux");
    assert!(open > 3 && open < 300, "{fd}");
    let info = logged(&s, "file-descriptor limit");
    assert_eq!(info.len(), 1, "{:?}", s.log_lines());
    assert_eq!(info[0]["raised_from"], 300);
    assert!(logged(&s, "the file-descriptor limit is below").is_empty());
    let m = scrape(&s).await;
    assert_eq!(sample(&m, "process_max_fds", &[]), Some(1500.0), "{m}");
    assert_eq!(
        sample(&m, "voxpoll_fds_needed", &[]),
        Some(needed_default as f64)
    );
    let open_metric = sample(&m, "process_open_fds", &[]).expect("process_open_fds");
    assert!(open_metric > 3.0 && open_metric < 300.0, "{open_metric}");
    let report = doctor(&s).await;
    assert_eq!(report.file_descriptors.as_ref().unwrap().limit, Some(1500));
    assert!(fd_problems(&report).is_empty(), "{:?}", report.verdict);
    drop(s);

    // Not enough, and not raisable: warned, the server still runs.
    let s = start_under_ulimit(&db, &[], 300, 300);
    let fd = fd_budget(&s).await;
    assert_eq!(
        (fd["limit"].as_u64(), fd["needed"].as_u64()),
        (Some(300), Some(needed_default))
    );
    let warned = logged(&s, "the file-descriptor limit is below");
    assert_eq!(warned.len(), 1, "{:?}", s.log_lines());
    assert_eq!(warned[0]["level"], "WARN");
    assert!(warned[0]["message"]
        .as_str()
        .unwrap()
        .contains("ulimit -Hn"));
    assert_eq!(warned[0]["max_connections"], 768);
    let problems = fd_problems(&doctor(&s).await);
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].contains(&format!(
            "only 300 files and sockets (ulimit -n) but its limits may hold {needed_default}"
        )),
        "{problems:?}"
    );
    drop(s);

    // The edge: 100 connections and 10 sessions need 454.
    let small = ["--max-connections", "100", "--max-sessions", "10"];
    for (hard, warns) in [(454, false), (453, true)] {
        let s = start_under_ulimit(&db, &small, hard, hard);
        assert_eq!(fd_budget(&s).await["needed"], 454);
        assert_eq!(
            !logged(&s, "the file-descriptor limit is below").is_empty(),
            warns,
            "hard limit {hard}: {:?}",
            s.log_lines()
        );
    }
}
