//! Hostile clients against the real server: bodies over their limits however they are framed,
//! concurrent creates against the session budgets, acknowledgements that must mean "stored".

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends a chunked (no Content-Length) POST of up to `total` bytes in 64 KiB pieces and
/// returns the answer's status line and body, and how many body bytes had been written when
/// the answer came (the server may read a little more than its limit, never the whole body).
async fn chunked_post(url: &str, path: &str, total: usize) -> (String, usize) {
    let addr = url.trim_start_matches("http://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = tcp.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
    );
    wr.write_all(head.as_bytes()).await.expect("head");
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let writer = tokio::spawn(async move {
        let piece = vec![0u8; 64 * 1024];
        let frame = [
            format!("{:x}\r\n", piece.len()).into_bytes(),
            piece,
            b"\r\n".to_vec(),
        ]
        .concat();
        while counter.load(std::sync::atomic::Ordering::Relaxed) < total {
            if wr.write_all(&frame).await.is_err() {
                return;
            }
            counter.fetch_add(64 * 1024, std::sync::atomic::Ordering::Relaxed);
        }
        let _ = wr.write_all(b"0\r\n\r\n").await;
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let at = sent.load(std::sync::atomic::Ordering::Relaxed);
    writer.abort();
    assert!(read.is_ok(), "no answer within 30 s (sent {at} bytes)");
    (String::from_utf8_lossy(&answer).into_owned(), at)
}

#[tokio::test]
async fn chunked_bodies_over_the_limit_are_refused_while_reading() {
    let app = spawn_app().await;
    let unknown = uuid_like();
    let cases = [
        (
            format!("/v1/sessions/{unknown}/audio?seq=0"),
            "chunk_too_large",
        ),
        ("/v1/sessions".to_string(), "body_too_large"),
        ("/v1/recognize".to_string(), "audio_too_large"),
    ];
    for (path, code) in cases {
        // 1 GiB offered; the answer must come long before it is all sent.
        let (answer, sent) = chunked_post(&app.url, &path, 1 << 30).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains(code), "{path}: {answer}");
        assert!(
            sent < 64 << 20,
            "{path}: {sent} bytes went in before the 413"
        );
    }
    let r = app
        .http
        .get(format!("{}/health", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

fn uuid_like() -> String {
    "0b9f6d52-3c1e-4f6e-9a57-2f5e8c0d1a11".into()
}

/// Fires `n` session creates at once; returns how many got 201 and that every other one got
/// 429 `too_many_sessions`.
async fn concurrent_creates(app: &TestApp, n: usize, api_key: Option<&str>) -> usize {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut req = app
            .http
            .post(format!("{}/v1/sessions", app.url))
            .json(&json!({"provider": "echo"}));
        if let Some(k) = api_key {
            req = req.header("x-api-key", k);
        }
        tasks.push(tokio::spawn(async move {
            let r = req.send().await.expect("create");
            let status = r.status();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, body)
        }));
    }
    let mut created = 0;
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(body["error"]["code"], "too_many_sessions", "{body}")
            }
            other => panic!("{other}: {body}"),
        }
    }
    created
}

#[tokio::test]
async fn concurrent_creates_cannot_pass_the_session_budgets_together() {
    let app = spawn_app_with(|c| c.max_sessions = 8).await;
    assert_eq!(concurrent_creates(&app, 60, None).await, 8);

    const KEY: &str = "hostile-key-0123456789abcdef";
    let app = spawn_app_with(|c| {
        c.api_keys = Some(format!("mallory:{KEY}").parse().expect("keys"));
        c.max_sessions_per_user = 4;
    })
    .await;
    assert_eq!(concurrent_creates(&app, 30, Some(KEY)).await, 4);
}

/// A chunk store that fails (here the session's chunk file cannot be written: a directory
/// stands in its place) answers 503 `store_unavailable` and acknowledges nothing; once it works
/// again the same chunk is stored once.
#[tokio::test]
async fn a_chunk_is_acknowledged_only_once_it_is_stored() {
    let app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    let mut blocker = app.db_path().into_os_string();
    blocker.push(".chunks");
    let blocker = std::path::PathBuf::from(blocker).join(&s.id);
    std::fs::create_dir_all(&blocker).expect("block the chunk file");
    let chunk = vec![7u8; 640];
    let (st, body) = app.upload(&s, "seq=0", chunk.clone()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    // Its retry is not "already received" while nothing is stored.
    let (st, body) = app.upload(&s, "seq=0", chunk.clone()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    std::fs::remove_dir(&blocker).expect("unblock");
    let (st, body) = app.upload(&s, "seq=0", chunk.clone()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate"], true);
    let store = voxpoll::store::sqlite::Db::open(&app.db_path())
        .await
        .expect("open the store");
    let stored = voxpoll::store::SessionStore::chunks(&store, &s.id)
        .await
        .expect("read chunks");
    assert_eq!(
        stored
            .iter()
            .map(|c| (c.seq, c.data.len()))
            .collect::<Vec<_>>(),
        [(0, 640)],
        "the acknowledged chunk is stored once"
    );
}

/// A FLAC file of `frames` × 65535 samples of silence at 16 kHz mono: every frame one CONSTANT
/// subframe (FLAC format spec, "FRAME_HEADER", "SUBFRAME_CONSTANT"), about 14 bytes per 4 s.
fn flac_bomb(frames: u32) -> Vec<u8> {
    fn crc8(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |mut c, &b| {
            c ^= b;
            for _ in 0..8 {
                c = if c & 0x80 != 0 {
                    (c << 1) ^ 0x07
                } else {
                    c << 1
                };
            }
            c
        })
    }
    fn crc16(data: &[u8]) -> u16 {
        data.iter().fold(0u16, |mut c, &b| {
            c ^= u16::from(b) << 8;
            for _ in 0..8 {
                c = if c & 0x8000 != 0 {
                    (c << 1) ^ 0x8005
                } else {
                    c << 1
                };
            }
            c
        })
    }
    const BLOCK: u64 = 65_535;
    let total = BLOCK * u64::from(frames);
    let mut out = b"fLaC".to_vec();
    out.extend([0x80, 0, 0, 34]); // last metadata block: STREAMINFO, 34 bytes
    out.extend((BLOCK as u16).to_be_bytes()); // min block size
    out.extend((BLOCK as u16).to_be_bytes()); // max block size
    out.extend([0; 6]); // min/max frame size unknown
    let packed: u64 = (16_000u64 << 44) | (15u64 << 36) | total; // rate, mono, 16 bit, samples
    out.extend(packed.to_be_bytes());
    out.extend([0; 16]); // no MD5
    for n in 0..frames {
        // Sync, fixed blocking; block size from the end of the header (0111), 16 kHz (0101);
        // mono, 16 bit; the frame number UTF-8 coded.
        let mut f = vec![0xFF, 0xF8, 0x75, 0x08];
        match n {
            0..=0x7F => f.push(n as u8),
            0x80..=0x7FF => f.extend([0xC0 | (n >> 6) as u8, 0x80 | (n & 0x3F) as u8]),
            _ => f.extend([
                0xE0 | (n >> 12) as u8,
                0x80 | ((n >> 6) & 0x3F) as u8,
                0x80 | (n & 0x3F) as u8,
            ]),
        }
        f.extend(((BLOCK - 1) as u16).to_be_bytes());
        f.push(crc8(&f));
        f.extend([0x00, 0x00, 0x00]); // CONSTANT subframe, value 0
        f.extend(crc16(&f).to_be_bytes());
        out.extend(f);
    }
    out
}

#[tokio::test]
async fn a_compressed_file_declaring_hours_is_refused_once_its_limit_is_decoded() {
    let app = spawn_app_with(|c| c.max_recognize_audio_ms = 60_000).await;
    // Two hours of audio in about 25 KB.
    let bomb = flac_bomb(1_800);
    assert!(bomb.len() < 32 * 1024, "{} bytes", bomb.len());
    let r = app
        .http
        .post(format!("{}/v1/recognize", app.url))
        .header("content-type", "audio/flac")
        .body(bomb)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "audio_too_long", "{body}");
    // Decoding stopped just past the limit, not at the two hours the file declares.
    let msg = body["error"]["message"].as_str().unwrap();
    let ms: u64 = msg
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a duration in the message");
    assert!((60_000..70_000).contains(&ms), "{msg}");
    // A short file of the same kind is decoded whole.
    let r = app
        .http
        .post(format!("{}/v1/recognize?provider=echo", app.url))
        .header("content-type", "audio/flac")
        .body(flac_bomb(2))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{:?}", r.text().await);
}

#[tokio::test]
async fn doctor_narrows_down_a_body_cap_below_its_first_probe() {
    // The echo probe refuses bodies over 10 KiB: below doctor's first size (16 KiB).
    let app = spawn_app_with(|c| c.probe_max_body_bytes = 10 * 1024).await;
    let args = voxpoll::doctor::DoctorArgs {
        url: app.url.clone(),
        json: true,
        max_hold_s: 1,
        max_body_bytes: 1 << 20,
        timeout_s: 5,
        api_key: None,
        token: None,
    };
    let report = voxpoll::doctor::diagnose(&args).await.expect("diagnose");
    assert_eq!(report.body.largest_ok, Some(10 * 1024), "{:?}", report.body);
    assert_eq!(report.verdict.max_chunk_bytes, 10 * 1024);
}

#[tokio::test]
async fn a_huge_engine_name_is_refused_without_being_echoed() {
    let app = spawn_app().await;
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&json!({"engine": "e".repeat(60_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_option");
    assert!(
        body["error"]["message"].as_str().unwrap().len() < 300,
        "{body}"
    );
}

#[tokio::test]
async fn an_id3_tag_declaring_256_mib_fails_the_session_at_once() {
    let app = spawn_app().await;
    let s = app
        .create(json!({"provider": "echo", "format": "mp3"}))
        .await;
    // ID3v2.4 header with the largest syncsafe size (256 MiB), then filler.
    let mut chunk = b"ID3\x04\x00\x00\x7f\x7f\x7f\x7f".to_vec();
    chunk.extend(vec![0u8; 8 * 1024]);
    let (st, body) = app.upload(&s, "seq=0", chunk).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let events = app.collect_until_end(&s, Duration::from_secs(10)).await;
    assert!(
        events
            .iter()
            .any(|e| e["code"] == "unsupported_audio"
                && e["message"].as_str().unwrap().contains("ID3")),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["reason"], "failed");
    let (st, _) = app.upload(&s, "seq=1", vec![0u8; 8 * 1024]).await;
    assert_eq!(st, StatusCode::GONE, "no more bytes are taken");
}

#[tokio::test]
async fn an_oversized_websocket_frame_closes_with_1009() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app_with(|c| c.max_chunk_bytes = 1000).await;
    let s = app.create(json!({"provider": "echo"})).await;
    let url = format!("{}/v1/sessions/{}/ws", app.url.replace("http", "ws"), s.id);
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-session-token", s.token.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let mut frame = 0u32.to_be_bytes().to_vec();
    frame.push(0);
    frame.extend(vec![0u8; 2_100]);
    ws.send(Message::binary(frame)).await.expect("send");
    let code = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Close(Some(c))) => return Some(u16::from(c.code)),
                Ok(Message::Close(None)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        None
    })
    .await
    .expect("the socket ends");
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_instance() {
    let app = spawn_app_with(|c| c.max_creates_per_s = 5).await;
    let (mut created, mut limited) = (0, 0);
    for _ in 0..30 {
        let r = app
            .http
            .post(format!("{}/v1/sessions", app.url))
            .json(&json!({"provider": "echo"}))
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert_eq!(r.headers()["retry-after"], "1");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["code"], "rate_limited", "{v}");
                limited += 1;
            }
            other => panic!("{other}"),
        }
    }
    // A burst of twice the rate, plus what refills while the loop runs.
    assert!((10..20).contains(&created), "{created} created");
    assert_eq!(created + limited, 30);
}

/// Reads what the server sends on `tcp` until it closes (or `limit` passes): (bytes, closed).
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(limit, tcp.read_to_end(&mut buf))
        .await
        .is_ok();
    (buf, closed)
}

#[tokio::test]
async fn silent_sockets_and_http2_prior_knowledge_are_not_held() {
    let app = spawn_app_with(|c| c.header_read_timeout_ms = 400).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    // 40 sockets that never send a byte: all closed by the server after the timeout.
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect"),
        );
    }
    let t0 = std::time::Instant::now();
    for tcp in &mut silent {
        let (bytes, closed) = read_until_closed(tcp, Duration::from_secs(5)).await;
        assert!(
            closed && bytes.is_empty(),
            "a silent socket was closed, silently"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    // An HTTP/2 prior-knowledge preface gets no SETTINGS frame: the connection is not HTTP/2.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let (bytes, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    assert!(closed, "h2c connection closed");
    let settings = bytes.len() >= 9 && bytes[3] == 0x04;
    assert!(!settings, "answered as HTTP/2: {bytes:?}");
    // The server still answers.
    assert_eq!(app.get_path("/health").await.0, StatusCode::OK);
}

#[tokio::test]
async fn connections_past_max_connections_get_503_json() {
    let app = spawn_app_with(|c| c.max_connections = 8).await;
    let addr = app.url.trim_start_matches("http://").to_string();
    // Eight connections inside one request each (headers sent, body pending) hold the slots.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .expect("connect");
        tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 512];
        let n = tcp.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "slot answered");
        held.push(tcp);
    }
    // The ninth: 503 too_many_connections with Retry-After, then closed.
    let mut tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let (bytes, closed) = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&bytes);
    assert!(closed);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    let body: Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["error"]["code"], "too_many_connections");
    // A slot freed is a slot served again.
    drop(held.pop());
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = app.http.get(format!("{}/health", app.url)).send().await {
            if r.status() == StatusCode::OK {
                ok = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "served once a slot is free");
}
