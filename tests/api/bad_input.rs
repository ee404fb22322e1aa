//! Bad-input classes not covered elsewhere, one test each: every one gets its documented status
//! and code, and the server stays healthy. (Malformed JSON, wrong types, absurd sample rates,
//! zero-length chunks and multipart chunks: `protocol::bad_requests_get_json_errors`; gaps beyond
//! the window: `protocol::seqs_beyond_the_window_are_rejected_at_the_edge`; chunks after `last`:
//! `protocol::chunks_after_the_last_one_are_rejected`; garbage WAV: `protocol::garbage_wav_*`;
//! garbage MP3: `compressed::garbage_in_an_mp3_session_*`; truncated uploads: `oneshot`; another
//! session's token and expired or forged JWTs: `auth`.)

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn healthy(app: &TestApp) {
    let (st, _) = app.get_path("/health").await;
    assert_eq!(st, 200, "the server stays healthy");
}

#[tokio::test]
async fn negative_and_huge_seqs() {
    let app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    for (query, status, code) in [
        ("seq=-1", 400, "invalid_query"),
        ("seq=1.5", 400, "invalid_query"),
        ("seq=99999999999999999999999", 400, "invalid_query"), // beyond u64
        ("seq=18446744073709551615", 409, "seq_out_of_window"), // u64::MAX: no overflow
        ("seq=9007199254740993", 409, "seq_out_of_window"),    // beyond JS's 2^53
    ] {
        let (st, body) = app.upload(&s, query, vec![0u8; 32]).await;
        assert_eq!(
            (st.as_u16(), body["error"]["code"].as_str()),
            (status, Some(code)),
            "{query}: {body}"
        );
    }
    // Nothing was stored for them: chunk 0 is still expected.
    let (st, ack) = app.upload(&s, "seq=0", vec![0u8; 32]).await;
    assert_eq!((st.as_u16(), ack["acked_seq"].clone()), (200, json!(0)));
    healthy(&app).await;
}

#[tokio::test]
async fn oversized_or_malformed_hotword_lists() {
    let app = spawn_app().await;
    let words = |n: usize| {
        (0..n)
            .map(|i| format!("词{i}|5"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let post = |list: String| {
        let app = &app;
        async move {
            let r = app
                .http
                .post(format!("{}/v1/sessions", app.url))
                .json(&json!({"provider": "echo", "hotword_list": list}))
                .send()
                .await
                .expect("post");
            let st = r.status();
            (st, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(
        post(words(128)).await.0,
        StatusCode::CREATED,
        "128 items is the limit"
    );
    for (what, list) in [
        ("129 items", words(129)),
        ("a 31-character word", format!("{}|5", "a".repeat(31))),
        ("weight 101", "腾讯云|101".into()),
        ("weight 0", "腾讯云|0".into()),
        ("no weight", "腾讯云".into()),
        ("a space in a word", "腾讯 云|5".into()),
        ("an empty item", "腾讯云|5,".into()),
    ] {
        let (st, body) = post(list).await;
        assert_eq!(
            (st, body["error"]["code"].clone()),
            (StatusCode::BAD_REQUEST, json!("invalid_option")),
            "{what}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("hotword_list"),
            "{what}"
        );
    }
    // A list over the JSON body limit never reaches the parser.
    let (st, body) = post("词|5,".repeat(20_000)).await;
    assert_eq!(
        (st, body["error"]["code"].clone()),
        (StatusCode::PAYLOAD_TOO_LARGE, json!("body_too_large"))
    );
    healthy(&app).await;
}

#[tokio::test]
async fn traversal_style_and_oversized_ids() {
    let app = spawn_app().await;
    let long = "a".repeat(10_000);
    for path in [
        "/v1/sessions/..%2F..%2Fetc%2Fpasswd/events".to_string(),
        "/v1/sessions/%2e%2e/events".into(),
        "/v1/sessions/00000000-0000-0000-0000-000000000000%00/events".into(),
        format!("/v1/sessions/{long}/events"),
    ] {
        let r = app
            .http
            .get(format!("{}{path}", app.url))
            .header("x-session-token", "x")
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path:.60}");
        let body: Value = r.json().await.expect("json");
        assert!(
            ["session_not_found", "not_found"].contains(&body["error"]["code"].as_str().unwrap()),
            "{body}"
        );
        assert!(body.to_string().len() < 400, "the id is not echoed whole");
    }
    for path in ["/v1/history/..%2F..%2Fetc%2Fpasswd", "/v1/history/%2e%2e"] {
        let (st, body) = app.get_path(path).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    healthy(&app).await;
}

#[tokio::test]
async fn odd_byte_counts_for_s16_are_carried_across_chunks() {
    let app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    // 3201 + 3199 + 1 + 1 bytes = 3201 samples; the odd byte waits for its partner.
    for (seq, n) in [(0, 3201usize), (1, 3199), (2, 1)] {
        let (st, _) = app.upload(&s, &format!("seq={seq}"), vec![1u8; n]).await;
        assert_eq!(st, 200);
    }
    let (st, _) = app.upload(&s, "seq=3&last=1", vec![1u8; 1]).await;
    assert_eq!(st, 200);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    let samples: u64 = events
        .iter()
        .filter(|e| e["type"] == "final")
        .map(|e| {
            e["text"]
                .as_str()
                .unwrap()
                .trim_end_matches(" samples")
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(samples, 3201, "{events:?}");
    assert_eq!(events.last().unwrap()["reason"], "finished");
}

#[tokio::test]
async fn truncated_wav_and_mp3_streams() {
    let app = spawn_app().await;
    // A WAV session whose stream ends inside its 44-byte header.
    let s = app
        .create(json!({"provider": "echo", "format": "wav"}))
        .await;
    let (st, _) = app
        .upload(&s, "seq=0&last=1", b"RIFF\x24\x00\x00\x00WAVEfmt ".to_vec())
        .await;
    assert_eq!(st, 200);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    let err = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(err["code"], "unsupported_audio");
    assert!(err["message"].as_str().unwrap().contains("header"), "{err}");
    assert_eq!(events.last().unwrap()["reason"], "failed");
    // An MP3 cut after its first 100 bytes: the 45-byte ID3 tag and part of the first frame.
    let mp3 = fixture("compressed/01-16k.mp3");
    let s = app
        .create(json!({"provider": "echo", "format": "mp3"}))
        .await;
    let (st, _) = app.upload(&s, "seq=0&last=1", mp3[..100].to_vec()).await;
    assert_eq!(st, 200);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap()["reason"], "failed", "{events:?}");
    // An MP3 cut in the middle: what was whole is recognised, the cut frame is dropped.
    let s = app
        .create(json!({"provider": "echo", "format": "mp3"}))
        .await;
    let (st, _) = app
        .upload(&s, "seq=0&last=1", mp3[..mp3.len() / 2 + 7].to_vec())
        .await;
    assert_eq!(st, 200);
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap()["reason"], "finished", "{events:?}");
    assert!(events.iter().any(|e| e["type"] == "final"));
    healthy(&app).await;
}

#[tokio::test]
async fn wrong_content_types() {
    let app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    let r = app
        .http
        .post(format!("{}/v1/sessions/{}/audio?seq=0", app.url, s.id))
        .header("x-session-token", &s.token)
        .header("content-type", "multipart/form-data; boundary=x")
        .body("--x--")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    for ct in ["text/plain", "application/json"] {
        let r = app
            .http
            .post(format!("{}/v1/recognize", app.url))
            .header("content-type", ct)
            .body("hello")
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        assert_eq!(
            r.json::<Value>().await.expect("json")["error"]["code"],
            "unsupported_audio"
        );
    }
    let r = app
        .http
        .post(format!("{}/api/realtime-voice/recognize", app.url))
        .header("content-type", "application/octet-stream")
        .body(vec![0u8; 100])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    healthy(&app).await;
}

#[tokio::test]
async fn chunk_rate_limit_gives_429_at_its_edge() {
    let app = spawn_app_with(|c| c.max_chunks_per_s = 5).await;
    let s = app.create(json!({"provider": "echo"})).await;
    // A burst of twice the rate passes; the next upload is refused with Retry-After.
    for seq in 0..10 {
        let (st, body) = app.upload(&s, &format!("seq={seq}"), vec![0u8; 32]).await;
        assert_eq!(st, 200, "chunk {seq} of the burst: {body}");
    }
    let r = app
        .http
        .post(format!("{}/v1/sessions/{}/audio?seq=10", app.url, s.id))
        .header("x-session-token", &s.token)
        .body(vec![0u8; 32])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "rate_limited"
    );
    // Nothing was stored for it: after the pause the same chunk is new, not a duplicate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (st, ack) = app.upload(&s, "seq=10", vec![0u8; 32]).await;
    assert_eq!(
        (
            st.as_u16(),
            ack["duplicate"].clone(),
            ack["acked_seq"].clone()
        ),
        (200, json!(false), json!(10))
    );
    healthy(&app).await;
}

#[tokio::test]
async fn slow_clients_and_oversized_headers_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(|c| {
        c.header_read_timeout_ms = 500;
        c.request_timeout_ms = 500;
        c.max_header_bytes = 4096;
        c.max_headers = 16;
    })
    .await;
    let addr = app.url.trim_start_matches("http://").to_string();
    // Headers trickled in and never finished: the connection is closed after the timeout.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let t0 = std::time::Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "closed within 5 s");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "after about 500 ms: {:?}",
        t0.elapsed()
    );
    // A body trickled in: 408 request_timeout, as JSON.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"POST /v1/sessions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"engine\"").await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Header sections over the limits: 431 headers_too_large, as JSON.
    let big = "x".repeat(5000);
    let r = app
        .http
        .get(format!("{}/health", app.url))
        .header("x-big", &big)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 431);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "headers_too_large"
    );
    let mut req = app.http.get(format!("{}/health", app.url));
    for i in 0..20 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let r = req.send().await.expect("get");
    assert_eq!(r.status(), 431);
    // Far beyond: hyper refuses before any route runs (still a 431).
    let r = app
        .http
        .get(format!("{}/health", app.url))
        .header("x-huge", "y".repeat(20_000))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 431);
    healthy(&app).await;
}
