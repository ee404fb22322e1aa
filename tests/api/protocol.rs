//! The HTTP contract of sessions: chunk ordering, errors, long-poll timing. Uses the scripted
//! `echo` provider so every expected event is exact.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn echo() -> Value {
    json!({"provider": "echo"})
}

fn texts(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "final")
        .map(|e| e["text"].as_str().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn creating_a_session_advertises_limits_and_a_token() {
    let app = spawn_app().await;
    let s = app.create(json!({})).await;
    assert_eq!(s.created["status"], "open");
    assert!(s.token.len() >= 32, "token has ≥128 bits");
    assert_eq!(s.created["poll"]["hold_ms"], 25_000);
    assert_eq!(s.created["poll"]["max_hold_ms"], 50_000);
    assert_eq!(s.created["upload"]["max_chunk_bytes"], 96 * 1024);
    assert_eq!(s.created["upload"]["window"], 16);
    assert!(s.created["epoch"].as_u64().is_some());
}

#[tokio::test]
async fn chunks_are_reassembled_in_seq_order() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    // seq 2 and 1 arrive before 0: buffered, then released in order.
    let (st, b) = app.upload(&s, "seq=2", vec![0; 6]).await;
    assert_eq!((st, b["acked_seq"].clone()), (StatusCode::OK, Value::Null));
    let (st, b) = app.upload(&s, "seq=1", vec![0; 4]).await;
    assert_eq!((st, b["acked_seq"].clone()), (StatusCode::OK, Value::Null));
    let (st, b) = app.upload(&s, "seq=0", vec![0; 2]).await;
    assert_eq!((st, b["acked_seq"].clone()), (StatusCode::OK, json!(2)));
    let (st, _) = app.upload(&s, "seq=3&last=1", vec![0; 8]).await;
    assert_eq!(st, StatusCode::OK);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(
        texts(&events),
        vec!["1 samples", "2 samples", "3 samples", "4 samples"]
    );
    assert_seqs_contiguous(&events, "event seqs ascend by one");
    assert_eq!(events.last().unwrap()["reason"], "finished");
}

#[tokio::test]
async fn duplicate_chunks_are_no_ops_and_conflicts_are_rejected() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    assert_eq!(
        app.upload(&s, "seq=0", vec![1, 2, 3, 4]).await.0,
        StatusCode::OK
    );
    let (st, b) = app.upload(&s, "seq=0", vec![1, 2, 3, 4]).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(b["duplicate"], true);
    let (st, b) = app.upload(&s, "seq=0", vec![9, 9, 9, 9]).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "seq_conflict");
    app.upload(&s, "seq=1&last=1", vec![0; 2]).await;
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(
        texts(&events),
        vec!["2 samples", "1 samples"],
        "the duplicate was not fed twice"
    );
}

#[tokio::test]
async fn seqs_beyond_the_window_are_rejected_at_the_edge() {
    let app = spawn_app_with(|c| c.reorder_window = 4).await;
    let s = app.create(echo()).await;
    // expected 0, window 4: seq 3 is the last accepted, 4 is refused.
    assert_eq!(app.upload(&s, "seq=3", vec![0; 2]).await.0, StatusCode::OK);
    let (st, b) = app.upload(&s, "seq=4", vec![0; 2]).await;
    assert_eq!(st, StatusCode::CONFLICT);
    assert_eq!(b["error"]["code"], "seq_out_of_window");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .contains("next expected seq is 0"));
}

#[tokio::test]
async fn chunks_after_the_last_one_are_rejected() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    app.upload(&s, "seq=0&last=1", vec![0; 2]).await;
    let (st, b) = app.upload(&s, "seq=1", vec![0; 2]).await;
    assert!(
        st == StatusCode::CONFLICT || st == StatusCode::GONE,
        "{st} {b}"
    );
}

#[tokio::test]
async fn oversized_chunks_get_413_at_the_limit_edge() {
    let app = spawn_app_with(|c| c.max_chunk_bytes = 1000).await;
    let s = app.create(echo()).await;
    assert_eq!(
        app.upload(&s, "seq=0", vec![0; 1000]).await.0,
        StatusCode::OK
    );
    let (st, b) = app.upload(&s, "seq=1", vec![0; 1001]).await;
    assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(b["error"]["code"], "chunk_too_large");
}

#[tokio::test]
async fn unknown_and_malformed_session_ids_are_404() {
    let app = spawn_app().await;
    for id in [
        "00000000-0000-4000-8000-000000000000",
        "not-a-uuid",
        "..%2F..%2Fetc",
    ] {
        let r = app
            .http
            .get(format!(
                "{}/v1/sessions/{id}/events?after=0&wait_ms=0",
                app.url
            ))
            .header("x-session-token", "x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{id}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "session_not_found");
    }
}

#[tokio::test]
async fn session_calls_need_the_session_token() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    let url = format!("{}/v1/sessions/{}", app.url, s.id);
    let r = app.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .http
        .get(&url)
        .header("x-session-token", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app
        .http
        .get(format!("{url}?session_token={}", s.token))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "query-parameter token works for header-less clients"
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let app = spawn_app().await;
    let post = |body: &'static str| {
        app.http
            .post(format!("{}/v1/sessions", app.url))
            .body(body)
            .send()
    };
    let r = post("{not json").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = post(r#"{"sample_rate": "fast"}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = post(r#"{"format": "m4a"}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = post(r#"{"sample_rate": 1000000}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let r = post(r#"{"engine": "16k_xx"}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_option"
    );
    let r = post(r#"{"provider": "nope"}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Tencent's number modes are 0, 1 and 3; filter_punc 2 is the REST API's "drop all".
    let r = post(r#"{"convert_num_mode": 2}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = post(r#"{"filter_punc": 2, "convert_num_mode": 3}"#)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // null is "not given" (openapi.yaml says so), as a JS client sends for an unset field.
    let r = post(r#"{"provider": null, "engine": null}"#).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let s = app.create(echo()).await;
    let (st, b) = app.upload(&s, "seq=-1", vec![0; 2]).await;
    assert_eq!(
        (st, b["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("invalid_query"))
    );
    let (st, b) = app.upload(&s, "seq=1", vec![]).await;
    assert_eq!(
        (st, b["error"]["code"].clone()),
        (StatusCode::BAD_REQUEST, json!("empty_chunk"))
    );
    let r = app
        .http
        .get(format!("{}/v2/nothing", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
}

#[tokio::test]
async fn garbage_wav_is_415_and_garbage_pcm_does_not_break_the_session() {
    let app = spawn_app().await;
    let s = app.create(json!({"format": "wav"})).await;
    let (st, b) = app
        .upload(&s, "seq=0", b"GARBAGE-GARBAGE-GARBAGE".to_vec())
        .await;
    assert_eq!(st, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(b["error"]["code"], "unsupported_audio");
    // A RIFF header that lies about its format: accepted bytes, then an `error` event and `end`.
    let s = app.create(json!({"format": "wav"})).await;
    let mut bad = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x55\x00\x01\x00".to_vec();
    bad.extend_from_slice(&[0x80, 0x3e, 0, 0, 0, 0x7d, 0, 0, 2, 0, 16, 0]);
    bad.extend_from_slice(b"data\x00\x00\x00\x00");
    assert_eq!(app.upload(&s, "seq=0&last=1", bad).await.0, StatusCode::OK);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "error" && e["code"] == "unsupported_audio"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["reason"], "failed");
    // Random bytes declared as PCM: recognised as noise, the session ends normally.
    let s = app.create(json!({})).await;
    let noise: Vec<u8> = (0..32_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let events = {
        assert_eq!(
            app.upload(&s, "seq=0&last=1", noise).await.0,
            StatusCode::OK
        );
        app.collect_until_end(&s, Duration::from_secs(60)).await
    };
    assert_eq!(events.last().unwrap()["reason"], "finished");
}

#[tokio::test]
async fn an_idle_poll_returns_empty_within_the_hold() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    let t = Instant::now();
    let (st, page) = app.poll(&s, 0, 1000).await;
    let took = t.elapsed();
    assert_eq!(st, StatusCode::OK);
    assert_eq!(page["events"], json!([]));
    assert_eq!(page["next_cursor"], 0);
    assert_eq!(page["done"], false);
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(1500),
        "held {took:?}"
    );
}

#[tokio::test]
async fn a_poll_never_holds_past_the_advertised_maximum() {
    let app = spawn_app_with(|c| {
        c.poll_hold_ms = 300;
        c.poll_max_hold_ms = 600;
    })
    .await;
    let s = app.create(echo()).await;
    let t = Instant::now();
    let (st, _) = app.poll(&s, 0, 60_000).await;
    assert_eq!(st, StatusCode::OK);
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1000),
        "held {took:?}"
    );
}

#[tokio::test]
async fn a_waiting_poll_returns_within_milliseconds_of_an_event() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    let poll = app.poll_in_background(&s, 0, 20_000);
    app.until_polls_waiting(1).await;
    let sent = Instant::now();
    assert_eq!(
        app.upload(&s, "seq=0", vec![0; 320]).await.0,
        StatusCode::OK
    );
    let (returned, _, page) = tokio::time::timeout(Duration::from_secs(5), poll)
        .await
        .unwrap()
        .unwrap();
    let latency = returned.duration_since(sent);
    assert_eq!(page["events"][0]["text"], "160 samples");
    assert!(
        latency < Duration::from_millis(250),
        "poll returned {latency:?} after the chunk"
    );
}

#[tokio::test]
async fn the_same_cursor_yields_the_same_events_and_uploads_can_carry_results() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    for i in 0..3 {
        app.upload(&s, &format!("seq={i}"), vec![0; 2 * (i + 1)])
            .await;
    }
    until("the echo results of three chunks", || async {
        let (_, p) = app.poll(&s, 0, 0).await;
        (p["events"].as_array()?.len() >= 3).then_some(())
    })
    .await;
    let (_, a) = app.poll(&s, 1, 0).await;
    let (_, b) = app.poll(&s, 1, 0).await;
    assert_eq!(a["events"], b["events"]);
    assert_eq!(a["events"].as_array().unwrap().len(), 2);
    let (st, up) = app.upload(&s, "seq=3&after=0", vec![0; 2]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        up["events"].as_array().unwrap().len() >= 3,
        "results ride on the upload response: {up}"
    );
    assert!(up["next_cursor"].as_u64().unwrap() >= 3);
}

#[tokio::test]
async fn finish_and_cancel_are_idempotent() {
    let app = spawn_app().await;
    let s = app.create(echo()).await;
    app.upload(&s, "seq=0", vec![0; 2]).await;
    let finish = || {
        app.http
            .post(format!("{}/v1/sessions/{}/finish", app.url, s.id))
            .header("x-session-token", &s.token)
            .send()
    };
    assert_eq!(finish().await.unwrap().status(), StatusCode::OK);
    assert_eq!(finish().await.unwrap().status(), StatusCode::OK);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap()["reason"], "finished");

    let s = app.create(echo()).await;
    let cancel = || {
        app.http
            .delete(format!("{}/v1/sessions/{}", app.url, s.id))
            .header("x-session-token", &s.token)
            .send()
    };
    let r: Value = cancel().await.unwrap().json().await.unwrap();
    assert_eq!(r["status"], "cancelled");
    assert_eq!(cancel().await.unwrap().status(), StatusCode::OK);
    let (st, b) = app.upload(&s, "seq=0", vec![0; 2]).await;
    assert_eq!(
        (st, b["error"]["code"].clone()),
        (StatusCode::GONE, json!("session_closed"))
    );
}

#[tokio::test]
async fn session_count_limit_gives_429_with_retry_after() {
    let app = spawn_app_with(|c| c.max_sessions = 2).await;
    app.create(echo()).await;
    app.create(echo()).await;
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&echo())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "too_many_sessions"
    );
}

#[tokio::test]
async fn buffered_bytes_are_bounded_with_backpressure() {
    let app = spawn_app_with(|c| {
        c.max_chunk_bytes = 100;
        c.max_buffered_bytes = 250;
    })
    .await;
    let s = app.create(echo()).await;
    // Out-of-order chunks stay buffered (seq 0 missing): the third would exceed 250 bytes.
    assert_eq!(
        app.upload(&s, "seq=1", vec![0; 100]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        app.upload(&s, "seq=2", vec![0; 100]).await.0,
        StatusCode::OK
    );
    let (st, b) = app.upload(&s, "seq=3", vec![0; 100]).await;
    assert_eq!(
        (st, b["error"]["code"].clone()),
        (StatusCode::TOO_MANY_REQUESTS, json!("backpressure"))
    );
    // Nothing accepted was lost: filling the gap releases 1 and 2.
    assert_eq!(
        app.upload(&s, "seq=0&last=1", vec![]).await.0,
        StatusCode::CONFLICT,
        "last cannot precede buffered seqs"
    );
    assert_eq!(app.upload(&s, "seq=0", vec![0; 10]).await.0, StatusCode::OK);
    assert_eq!(
        app.upload(&s, "seq=3&last=1", vec![0; 100]).await.0,
        StatusCode::OK
    );
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(
        texts(&events),
        vec!["5 samples", "50 samples", "50 samples", "50 samples"]
    );
}

#[tokio::test]
async fn idle_sessions_expire() {
    let app = spawn_app_with(|c| c.session_idle_ms = 500).await;
    let s = app.create(echo()).await;
    app.upload(&s, "seq=0", vec![0; 2]).await;
    let info = until("the idle session to expire", || async {
        let (_, info) = app.get(&s).await;
        (info["status"] == "expired").then_some(info)
    })
    .await;
    assert_eq!(info["status"], "expired", "{info}");
    let events = app.collect_until_end(&s, Duration::from_secs(5)).await;
    assert!(events.iter().any(|e| e["code"] == "idle_timeout"));
    assert_eq!(events.last().unwrap()["reason"], "expired");
}

#[tokio::test]
async fn sessions_end_at_the_maximum_audio_duration() {
    let app = spawn_app_with(|c| c.session_max_audio_ms = 1000).await;
    let s = app.create(echo()).await;
    // 0.5 s chunks: the third crosses 1000 ms.
    for i in 0..3 {
        let (st, _) = app.upload(&s, &format!("seq={i}"), vec![0; 16_000]).await;
        assert_eq!(st, StatusCode::OK);
    }
    let events = app.collect_until_end(&s, Duration::from_secs(5)).await;
    assert!(
        events.iter().any(|e| e["code"] == "max_duration"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["reason"], "expired");
    assert_eq!(
        texts(&events).len(),
        3,
        "audio accepted before the limit is still recognised"
    );
}

#[tokio::test]
async fn health_and_ready() {
    let app = spawn_app().await;
    let r: Value = app.get_path("/health").await.1;
    assert_eq!(r, json!({"status": "ok"}));
    let (status, b) = app.get_path("/ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b["providers"]["embedded"]["ready"], true);
    assert_eq!(b["database"]["writable"], true);
}

#[tokio::test]
async fn ready_is_503_without_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = voxpoll::config::Config::loopback(dir.path().join("db.sqlite"));
    cfg.model = dir.path().join("missing.bin");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let state = voxpoll::app::build(cfg, None, shutdown.clone())
        .await
        .unwrap();
    let listener = voxpoll::app::bind(([127, 0, 0, 1], 0).into()).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let h = tokio::spawn(voxpoll::app::run(listener, state, shutdown.clone()));
    let r = reqwest::get(format!("{url}/ready")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let b: Value = r.json().await.unwrap();
    assert!(
        b["providers"]["embedded"]["detail"]
            .as_str()
            .unwrap()
            .contains("scripts/setup"),
        "{b}"
    );
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/sessions"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    shutdown.cancel();
    h.await.unwrap().unwrap();
}

/// The demo page and its scripts come from the binary; `voxpoll.js` is the mini-program
/// client byte for byte (one protocol implementation), and unknown files are JSON 404s.
#[tokio::test]
async fn the_demo_page_and_its_scripts_are_served_from_the_binary() {
    let app = spawn_app().await;
    let get = |path: &'static str| {
        let (http, url) = (app.http.clone(), app.url.clone());
        async move {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            let ct = r.headers()["content-type"].to_str().unwrap().to_string();
            (r.status(), ct, r.text().await.unwrap())
        }
    };
    let (status, ct, page) = get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with("text/html"), "{ct}");
    for script in ["/ui/voxpoll.js", "/ui/wx-browser.js", "/ui/app.js"] {
        assert!(page.contains(script), "the page loads {script}");
        let (status, ct, _) = get(script).await;
        assert_eq!(status, StatusCode::OK, "{script}");
        assert!(ct.starts_with("text/javascript"), "{ct}");
    }
    assert!(
        !page.contains("https://"),
        "nothing from outside the server"
    );
    let (_, _, client) = get("/ui/voxpoll.js").await;
    let file = std::fs::read_to_string(root().join("clients/miniprogram/voxpoll.js")).unwrap();
    assert_eq!(client, file);
    let (status, _, body) = get("/ui/../Cargo.toml").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _, body) = get("/ui/nothing.js").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
}

/// A misspelt option is an error, not silently ignored.
#[tokio::test]
async fn unknown_session_options_are_refused_by_name() {
    let app = spawn_app().await;
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&json!({"provider": "echo", "engnie": "16k_en"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_option", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("\"engnie\"") && message.contains("engine"),
        "{message}"
    );
}
