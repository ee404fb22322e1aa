//! One-shot recognition through both routes on real speech with the embedded engine, every
//! upload format, and each bad-input class.

use crate::helpers::*;
use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

const EXPECTED: &str = "今天天气很好，我们去公园散步吧。";

async fn post_seeds(app: &TestApp, form: Form) -> (StatusCode, Value) {
    let r = app
        .http
        .post(format!("{}/api/realtime-voice/recognize", app.url))
        .multipart(form)
        .send()
        .await
        .expect("post");
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn raw_wav_is_recognised_and_recorded() {
    let app = spawn_app().await;
    let (s, body) = app.recognize("", "audio/wav", fixture("zh/01.wav")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let text = body["text"].as_str().unwrap();
    assert!(zh_cer(EXPECTED, text) <= 0.2, "{text}");
    assert_eq!(body["provider"], "embedded");
    assert_eq!(body["engine"], "16k_zh");
    let dur = body["duration_ms"].as_u64().unwrap();
    assert!((2000..6000).contains(&dur), "{dur}");
    let sentences = body["sentences"].as_array().unwrap();
    assert!(!sentences.is_empty());
    assert!(sentences
        .iter()
        .all(|s| s["end_ms"].as_u64() <= Some(dur + 100)));
    // Recorded in history.
    let id = body["id"].as_str().unwrap();
    let h: Value = app.get_path(&format!("/v1/history/{id}")).await.1;
    assert_eq!(h["kind"], "recognition");
    assert_eq!(h["text"], body["text"]);
}

#[tokio::test]
async fn seeds_route_takes_every_recorder_format() {
    let app = spawn_app().await;
    for (file, mime) in [
        ("zh/01.wav", "audio/wav"),
        ("compressed/01-16k.mp3", "audio/mpeg"),
        ("compressed/01-44k-stereo.mp3", "audio/mpeg"),
        ("compressed/01-16k.aac", "audio/aac"),
        ("compressed/01-16k.m4a", "audio/mp4"),
    ] {
        let name = file.rsplit('/').next().unwrap().to_string();
        let form = Form::new()
            .part(
                "audio",
                Part::bytes(fixture(file))
                    .file_name(name)
                    .mime_str(mime)
                    .unwrap(),
            )
            .text("engineType", "16k_zh")
            .text("filterDirty", "1")
            .text("filterModal", "0")
            .text("convertNumMode", "1")
            .text("wordInfo", "0");
        let (s, body) = post_seeds(&app, form).await;
        assert_eq!(s, StatusCode::OK, "{file}: {body}");
        assert_eq!(body["code"], 0, "{file}: {body}");
        assert_eq!(body["message"], "ok");
        let text = body["data"]["text"].as_str().unwrap();
        let c = zh_cer(EXPECTED, text);
        eprintln!("{file}: {text} (CER {c:.2})");
        assert!(c <= 0.2, "{file}: {text}");
    }
}

#[tokio::test]
async fn raw_uploads_detect_or_take_the_declared_format() {
    let app = spawn_app().await;
    // Octet-stream: the container is sniffed.
    let (s, body) = app
        .recognize(
            "",
            "application/octet-stream",
            fixture("compressed/01-16k.mp3"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(zh_cer(EXPECTED, body["text"].as_str().unwrap()) <= 0.2);
    // Raw PCM needs format=pcm (and its rate).
    let pcm = pcm_bytes(&read_wav(&root().join("tests/fixtures/zh/01.wav")));
    let (s, body) = app
        .recognize(
            "?format=pcm&sample_rate=16000",
            "application/octet-stream",
            pcm,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert!(zh_cer(EXPECTED, body["text"].as_str().unwrap()) <= 0.2);
    // Multipart on the v1 route with the `file` field and API option names.
    let form = Form::new()
        .part(
            "file",
            Part::bytes(fixture("compressed/01-16k.m4a")).file_name("a.m4a"),
        )
        .text("engine", "16k_zh")
        .text("provider", "embedded");
    let r = app
        .http
        .post(format!("{}/v1/recognize", app.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn bad_uploads_get_clear_errors_and_the_server_stays_healthy() {
    let app = spawn_app_with(|c| {
        c.max_upload_bytes = 200_000;
        c.max_recognize_audio_ms = 5_000;
    })
    .await;
    let (s, body) = app
        .recognize(
            "",
            "application/octet-stream",
            b"this is not audio at all".to_vec(),
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Some("unsupported_audio")
        ),
        "{body}"
    );
    let (s, body) = app.recognize("", "text/plain", b"hello".to_vec()).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    // Truncated MP3 header / garbage after a valid-looking WAV header.
    let mut wav = fixture("zh/01.wav");
    wav.truncate(30);
    let (s, body) = app.recognize("", "audio/wav", wav).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    let form = Form::new().part("audio", Part::bytes(Vec::new()).file_name("empty.wav"));
    let (s, body) = post_seeds(&app, form).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE, "empty audio: {body}");
    // Size limit: at the edge passes the size check, one byte over fails.
    let (s, body) = app
        .recognize(
            "?format=pcm",
            "application/octet-stream",
            vec![0u8; 200_001],
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("audio_too_large")),
        "{body}"
    );
    let (s, body) = app
        .recognize(
            "?format=pcm",
            "application/octet-stream",
            vec![0u8; 160_000],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "5000 ms exactly is allowed: {body}");
    let (s, body) = app
        .recognize(
            "?format=pcm",
            "application/octet-stream",
            vec![0u8; 160_032],
        )
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("audio_too_long")),
        "{body}"
    );
    // Options.
    let (s, body) = app
        .recognize("?provider=nope", "audio/wav", fixture("zh/02.wav"))
        .await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_option")),
        "{body}"
    );
    let (s, body) = app
        .recognize("?word_info=7", "audio/wav", fixture("zh/02.wav"))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    // Seeds route: envelope with the status as non-zero code.
    let (s, body) = post_seeds(&app, Form::new().text("engineType", "16k_zh")).await;
    assert_eq!(
        (s, &body["code"], body["error"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            &Value::from(400),
            Some("missing_audio")
        ),
        "{body}"
    );
    let form = Form::new().part(
        "audio",
        Part::bytes(b"garbage!".to_vec()).file_name("x.mp3"),
    );
    let (s, body) = post_seeds(&app, form).await;
    assert_eq!(
        (s, &body["code"]),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, &Value::from(415)),
        "{body}"
    );
    let form = Form::new()
        .part(
            "audio",
            Part::bytes(fixture("zh/02.wav")).file_name("a.wav"),
        )
        .text("wordInfo", "x");
    let (s, body) = post_seeds(&app, form).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    let r = app
        .http
        .post(format!("{}/api/realtime-voice/recognize", app.url))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Still healthy and still recognising.
    let (s, _) = app.recognize("", "audio/wav", fixture("zh/02.wav")).await;
    assert_eq!(s, StatusCode::OK);
}

/// `POST /v1/audio/transcriptions` with `stream=true`: a `text/event-stream` whose deltas arrive
/// one per final in order and concatenate to the `done` text; a file that does not decode is
/// still an ordinary JSON error (the stream only begins once recognition has).
#[tokio::test]
async fn openai_streaming_sends_a_delta_per_final_then_done() {
    let app = spawn_app().await;
    let post = |file: Vec<u8>| {
        let form = Form::new()
            .part("file", Part::bytes(file).file_name("a.wav"))
            .text("model", "echo")
            .text("language", "en")
            .text("stream", "true");
        app.http
            .post(format!("{}/v1/audio/transcriptions", app.url))
            .multipart(form)
            .send()
    };
    let r = post(fixture("zh/01.wav")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = r.text().await.unwrap();
    let events: Vec<Value> = body
        .split("\n\n")
        .filter_map(|block| block.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).expect("event json"))
        .collect();
    let deltas: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "transcript.text.delta")
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    // The echo provider answers each 3200-sample piece with "3200 samples".
    assert!(deltas.len() > 5, "{body}");
    assert_eq!(deltas[0], "3200 samples");
    assert!(deltas[1..].iter().all(|d| d.starts_with(' ')), "{deltas:?}");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "transcript.text.done", "{body}");
    assert_eq!(done["text"].as_str().unwrap(), deltas.concat());

    let r = post(b"definitely not audio".to_vec()).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_audio", "{v}");
}
