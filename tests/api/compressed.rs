//! MP3 and AAC (ADTS) sessions, RecorderManager's frame formats: chunks split at arbitrary byte
//! offsets are decoded incrementally and recognised like PCM.

use crate::helpers::*;
use serde_json::{json, Value};
use std::time::Duration;

const EXPECTED: &str = "今天天气很好，我们去公园散步吧。";

/// A new session of `format` with `bytes` streamed in `chunk`-byte pieces; every event.
async fn stream(app: &TestApp, format: &str, bytes: &[u8], chunk: usize) -> Vec<Value> {
    let s = app
        .create(json!({"format": format, "engine": "16k_zh"}))
        .await;
    app.stream_bytes(&s, bytes, chunk).await
}

fn end(events: &[Value]) -> &Value {
    events.last().expect("events")
}

#[tokio::test]
async fn mp3_and_aac_sessions_split_at_odd_offsets_are_recognised() {
    let app = spawn_app().await;
    for (file, format, chunk) in [
        ("compressed/01-16k.mp3", "mp3", 777),
        ("compressed/01-44k-stereo.mp3", "mp3", 1000),
        ("compressed/01-16k.aac", "aac", 333),
    ] {
        let events = stream(&app, format, &fixture(file), chunk).await;
        let end = end(&events);
        assert_eq!(end["reason"], "finished", "{file}: {end}");
        let text = end["transcript"].as_str().expect("transcript");
        let cer = zh_cer(EXPECTED, text);
        assert!(cer <= 0.2, "{file}: CER {cer:.2} for {text:?}");
        // Times are in stream time of the decoded audio (≈ 4.1 s of speech).
        let last_final = events
            .iter()
            .rev()
            .find(|e| e["type"] == "final")
            .expect("a final");
        let end_ms = last_final["end_ms"].as_u64().expect("end_ms");
        assert!(
            (3000..=5000).contains(&end_ms),
            "{file}: final ends at {end_ms} ms"
        );
    }
}

#[tokio::test]
async fn an_id3_tag_and_a_chunk_boundary_inside_a_frame_header_are_fine() {
    let app = spawn_app().await;
    let mp3 = fixture("compressed/01-16k.mp3");
    // A 30-byte ID3v2.3 tag in front (syncsafe size 20), then chunks of 3 bytes for the first
    // 60 bytes so frame headers straddle chunks, then the rest in one piece.
    let mut tagged = b"ID3\x03\x00\x00\x00\x00\x00\x14".to_vec();
    tagged.extend_from_slice(&[0u8; 20]);
    tagged.extend_from_slice(&mp3);
    let s = app
        .create(json!({"format": "mp3", "engine": "16k_zh"}))
        .await;
    let mut seq = 0;
    for piece in tagged[..60].chunks(3) {
        let (st, _) = app.upload(&s, &format!("seq={seq}"), piece.to_vec()).await;
        assert_eq!(st, 200);
        seq += 1;
    }
    let (st, _) = app
        .upload(&s, &format!("seq={seq}&last=1"), tagged[60..].to_vec())
        .await;
    assert_eq!(st, 200);
    let events = app.collect_until_end(&s, Duration::from_secs(60)).await;
    let text = end(&events)["transcript"]
        .as_str()
        .expect("transcript")
        .to_string();
    assert!(zh_cer(EXPECTED, &text) <= 0.2, "{text:?}");
}

#[tokio::test]
async fn garbage_in_an_mp3_session_fails_it_with_a_clear_error() {
    let app = spawn_app().await;
    // 70 KB without a single frame header: no sync within the 64 KiB search.
    let garbage: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 200) as u8).collect();
    let events = stream(&app, "mp3", &garbage, 10_000).await;
    let err = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("an error event");
    assert_eq!(err["code"], "unsupported_audio", "{err}");
    assert!(
        err["message"].as_str().expect("msg").contains("MP3"),
        "{err}"
    );
    assert_eq!(end(&events)["reason"], "failed");
    // The server stays healthy.
    let (st, _) = app.get_path("/health").await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn streaming_formats_that_cannot_be_chunked_are_refused_at_creation() {
    let app = spawn_app().await;
    for format in ["m4a", "opus", "flac"] {
        let r = app
            .http
            .post(format!("{}/v1/sessions", app.url))
            .json(&json!({"format": format}))
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), 415, "{format}");
    }
}
