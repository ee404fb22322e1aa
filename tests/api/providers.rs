//! Each provider against its local fake upstream: signatures, option pass-through, result
//! mapping, pacing, stall bridging, the end handshake, every error class, concurrency limits —
//! and a conformance run of one scenario through every provider.

use crate::fakes::{self, funasr::FakeFunAsr, openai::FakeOpenAi, tc3::FakeTc3, tencent::*};
use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use voxpoll::provider::funasr::{FunAsrProvider, FunAsrSettings};
use voxpoll::provider::openai::{Flavor, OpenAiProvider, OpenAiSettings};
use voxpoll::provider::tencent::{TencentCredentials, TencentProvider, TencentSettings};
use voxpoll::provider::Provider;
use voxpoll::secret::Secret;

fn creds(key: &str) -> TencentCredentials {
    TencentCredentials {
        app_id: APP_ID.into(),
        secret_id: SECRET_ID.into(),
        secret_key: Secret::new(key),
        token: None,
    }
}

fn tencent(
    rt: &FakeTencent,
    api: Option<&FakeTc3>,
    tweak: impl FnOnce(&mut TencentSettings),
) -> Arc<dyn Provider> {
    let mut s = TencentSettings {
        realtime_url: rt.url.clone(),
        api_url: api.map_or("http://127.0.0.1:9/".into(), |a| a.url.clone()),
        credentials: Some(creds(SECRET_KEY)),
        bridge_after_ms: 500,
        ..TencentSettings::default()
    };
    tweak(&mut s);
    Arc::new(TencentProvider::new("tencent", s).expect("settings"))
}

fn openai(fake: &FakeOpenAi, tweak: impl FnOnce(&mut OpenAiSettings)) -> Arc<dyn Provider> {
    let mut s = OpenAiSettings {
        base_url: fake.base_url.clone(),
        model: "whisper-1".into(),
        api_key: Some(Secret::new(fakes::openai::API_KEY)),
        api_key_env: String::new(),
        ..OpenAiSettings::default()
    };
    tweak(&mut s);
    Arc::new(OpenAiProvider::new("openai", s).expect("settings"))
}

fn funasr(fake: &FakeFunAsr) -> Arc<dyn Provider> {
    Arc::new(
        FunAsrProvider::new(
            "funasr",
            FunAsrSettings {
                url: fake.url.clone(),
                ..FunAsrSettings::default()
            },
        )
        .expect("settings"),
    )
}

fn finals(events: &[Value]) -> Vec<&Value> {
    events.iter().filter(|e| e["type"] == "final").collect()
}

fn end_reason(events: &[Value]) -> &str {
    events
        .last()
        .and_then(|e| e["reason"].as_str())
        .unwrap_or("")
}

/// Streams chunks until the session refuses more (it may fail mid-stream), then collects events.
async fn stream_until_refused(app: &TestApp, s: &TestSession, pcm: &[i16]) -> Vec<Value> {
    let chunks: Vec<&[i16]> = pcm.chunks(3200).collect();
    for (i, c) in chunks.iter().enumerate() {
        let last = if i + 1 == chunks.len() { "&last=1" } else { "" };
        let (st, body) = app.upload(s, &format!("seq={i}{last}"), pcm_bytes(c)).await;
        if st == StatusCode::GONE {
            break;
        }
        assert_eq!(st, StatusCode::OK, "{body}");
    }
    app.collect_until_end(s, Duration::from_secs(30)).await
}

/// Speech, 800 ms of silence, speech: two sentences for every recogniser.
fn two_sentences() -> Vec<i16> {
    let mut pcm = read_wav(&root().join("tests/fixtures/zh/02.wav"));
    pcm.extend(vec![0i16; 16 * 800]);
    pcm.extend(read_wav(&root().join("tests/fixtures/zh/04.wav")));
    pcm
}

#[tokio::test]
async fn tencent_session_passes_options_maps_results_and_paces() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let s = app
        .create(json!({"provider": "tencent", "engine": "16k_zh", "word_info": 1, "filter_dirty": 1,
                       "filter_modal": 2, "convert_num_mode": 0, "hotword_list": "腾讯云|10,ASR|11", "vad_silence_ms": 800}))
        .await;
    let mut pcm = fakes::tone(2000);
    pcm.extend(vec![0i16; 16 * 600]);
    pcm.extend(fakes::tone(1500));
    let started = std::time::Instant::now();
    let events = app.stream_pcm(&s, &pcm, 200, false).await;
    let took = started.elapsed();
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let f = finals(&events);
    assert_eq!(f.len(), 2, "{events:?}");
    assert!(f[0]["text"].as_str().unwrap().starts_with("第0句"));
    assert!(f[1]["text"].as_str().unwrap().starts_with("第1句"));
    assert_eq!(f[1]["sentence"], 1);
    let start1 = f[1]["start_ms"].as_u64().unwrap();
    assert!(
        (2550..=2700).contains(&start1),
        "sentence 1 starts after 2.6 s of audio: {start1}"
    );
    assert!(
        f[0]["words"].as_array().is_some_and(|w| !w.is_empty()),
        "word_list mapped"
    );
    let partial_first = events
        .iter()
        .position(|e| e["type"] == "partial" && e["sentence"] == 0);
    let final_first = events
        .iter()
        .position(|e| e["type"] == "final" && e["sentence"] == 0);
    assert!(
        partial_first.is_some() && partial_first < final_first,
        "partials precede the final"
    );
    let end = events.last().unwrap();
    assert_eq!(
        end["transcript"].as_str().unwrap(),
        format!(
            "{}{}",
            f[0]["text"].as_str().unwrap(),
            f[1]["text"].as_str().unwrap()
        )
    );

    let conns = rt.conns();
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert!(c.errors.is_empty(), "{:?}", c.errors);
    assert!(c.end_received, "end handshake");
    assert_eq!(
        c.audio_bytes,
        pcm.len() * 2,
        "every byte delivered, none invented"
    );
    assert!(c.peak_speed <= 3.0, "peak {}", c.peak_speed);
    // 3.5 s of queued audio at ≤ 2× real time cannot take less than ~1.75 s.
    assert!(took >= Duration::from_millis(1_600), "{took:?}");
    for (k, v) in [
        ("engine_model_type", "16k_zh"),
        ("voice_format", "1"),
        ("needvad", "1"),
        ("word_info", "1"),
        ("filter_dirty", "1"),
        ("filter_modal", "2"),
        ("convert_num_mode", "0"),
        ("hotword_list", "腾讯云|10,ASR|11"),
        ("vad_silence_time", "800"),
    ] {
        assert_eq!(c.params.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(c.params["nonce"].len() <= 10);
}

/// A partial's `stable` is what it and the sentence's previous partial agree on: the fake's
/// partials are "第{n}句{voiced ms}" every 600 ms of voice, so the first of a sentence has "" and
/// every later one "第{n}句" (the numbers differ, and a number is not split).
#[tokio::test]
async fn partials_carry_the_prefix_two_guesses_agree_on() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let s = app
        .create(json!({"provider": "tencent", "engine": "16k_zh"}))
        .await;
    let seen = app.events_in_background(&s);
    let mut pcm = fakes::tone(2000);
    pcm.extend(vec![0i16; 16 * 1000]);
    pcm.extend(fakes::tone(2000));
    app.stream_pcm(&s, &pcm, 200, true).await;
    let events = seen.await.unwrap();
    let partials: Vec<_> = events.iter().filter(|e| e["type"] == "partial").collect();
    assert!(partials.len() >= 4, "{events:?}");
    for p in &partials {
        let (n, text) = (p["sentence"].as_u64().unwrap(), p["text"].as_str().unwrap());
        let expected = if text == format!("第{n}句600") {
            String::new()
        } else {
            format!("第{n}句")
        };
        assert_eq!(p["stable"], expected.as_str(), "{p}");
    }
    assert!(events
        .iter()
        .filter(|e| e["type"] != "partial")
        .all(|e| e.get("stable").is_none()));
}

/// Audio goes upstream the moment it arrives: each chunk of a real-time client is one message,
/// whether it sends 40 ms or 200 ms chunks (nothing waits for a timer tick or a full frame,
/// and nothing is cut into 40 ms frames).
#[tokio::test]
async fn tencent_sends_each_real_time_chunk_as_it_arrives() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let pcm = fakes::tone(2000);
    for chunk_ms in [40, 200] {
        let s = app
            .create(json!({"provider": "tencent", "engine": "16k_zh"}))
            .await;
        let events = app.stream_pcm(&s, &pcm, chunk_ms, true).await;
        assert_eq!(end_reason(&events), "finished", "{events:?}");
        let c = rt.conns().pop().expect("a connection");
        assert!(c.errors.is_empty(), "{:?}", c.errors);
        assert_eq!(c.audio_bytes, pcm.len() * 2, "{chunk_ms} ms chunks");
        // One message per chunk; a test thread stalled past the bucket's burst (400 ms) may
        // see two of its chunks merged, so a fifth less is allowed. Waiting for 200 ms frames
        // would give a fifth of the 40 ms chunks' count, 40 ms frames five times the 200 ms one.
        let chunks = 2000 / chunk_ms;
        assert!(
            (chunks * 4 / 5..=chunks).contains(&c.frames),
            "{chunk_ms} ms chunks: {} messages for {chunks} chunks",
            c.frames
        );
    }
}

#[tokio::test]
async fn tencent_bridges_client_stalls_and_keeps_client_times() {
    // The fake fails a stream with 4008 after 2 s without audio; the client stalls 3.5 s.
    let rt = FakeTencent::start(Behavior {
        idle_limit: Duration::from_secs(2),
        ..Behavior::default()
    })
    .await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let a = fakes::tone(1500);
    for (i, c) in a.chunks(3200).enumerate() {
        let (st, b) = app.upload(&s, &format!("seq={i}"), pcm_bytes(c)).await;
        assert_eq!(st, StatusCode::OK, "{b}");
    }
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let b = fakes::tone(1000);
    let (st, body) = app.upload(&s, "seq=8&last=1", pcm_bytes(&b)).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let events = app.collect_until_end(&s, Duration::from_secs(30)).await;
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let c = &rt.conns()[0];
    assert!(c.errors.is_empty(), "no 4008: {:?}", c.errors);
    assert!(
        c.zero_bytes > 0,
        "silence was sent while the client stalled"
    );
    assert_eq!(
        c.audio_bytes - c.zero_bytes,
        (a.len() + b.len()) * 2,
        "client audio delivered exactly"
    );
    let f = finals(&events);
    assert_eq!(f.len(), 2, "{events:?}");
    // Upstream, sentence 1 starts after 1.5 s of audio plus the bridged silence; the client
    // sees it at 1.5 s of its own audio.
    let start1 = f[1]["start_ms"].as_u64().unwrap();
    assert!((1_450..=1_600).contains(&start1), "start {start1}");
    let end1 = f[1]["end_ms"].as_u64().unwrap();
    assert!((2_400..=2_560).contains(&end1), "end {end1}");
}

#[tokio::test]
async fn tencent_answers_finalize_with_one_warning_and_goes_on() {
    // Tencent's real-time protocol cannot end a sentence on request (its `end` ends the
    // stream): the client hears so once, and the session is otherwise unchanged.
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let a = fakes::tone(1000);
    for (i, c) in a.chunks(3200).enumerate() {
        let (st, b) = app.upload(&s, &format!("seq={i}"), pcm_bytes(c)).await;
        assert_eq!(st, StatusCode::OK, "{b}");
        let r = app
            .http
            .post(format!("{}/v1/sessions/{}/finalize", app.url, s.id))
            .header("x-session-token", &s.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let (st, body) = app.upload(&s, "seq=5&last=1", Vec::new()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let events = app.collect_until_end(&s, Duration::from_secs(30)).await;
    let warnings: Vec<&Value> = events
        .iter()
        .filter(|e| e["code"] == "finalize_unsupported")
        .collect();
    assert_eq!(warnings.len(), 1, "{events:?}");
    assert_eq!(warnings[0]["type"], "warning");
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    assert_eq!(rt.conns().len(), 1, "one upstream stream throughout");
}

#[tokio::test]
async fn tencent_takes_mp3_and_aac_frames_as_recorded() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let mp3 = fixture("compressed/01-16k.mp3");
    let aac = fixture("compressed/01-16k.aac");
    // The ID3v2 tag in front of the first frame is the file's, not audio: syncsafe size + 10.
    let tag = 10
        + mp3[6..10]
            .iter()
            .fold(0usize, |a, &x| (a << 7) | usize::from(x & 0x7f));
    for (format, bytes, voice_format, audio) in [
        ("mp3", &mp3, "8", &mp3[tag..]),
        ("aac", &aac, "16", &aac[..]),
    ] {
        let s = app
            .create(json!({"provider": "tencent", "format": format, "sample_rate": 16000, "channels": 1}))
            .await;
        let events = app.stream_bytes(&s, bytes, 1000).await;
        assert_eq!(end_reason(&events), "finished", "{format}: {events:?}");
        assert!(
            !finals(&events).is_empty(),
            "{format}: results from the decoded frames"
        );
        let c = rt.conns().pop().expect("a connection");
        assert_eq!(c.params["voice_format"], voice_format, "{format}");
        assert!(c.errors.is_empty(), "{format}: {:?}", c.errors);
        assert_eq!(
            c.raw.len(),
            audio.len(),
            "{format}: every frame, nothing else"
        );
        assert!(c.raw == audio, "{format}: frames byte for byte as recorded");
        assert!(
            c.frames > 50,
            "{format}: one message per codec frame, paced ({} frames)",
            c.frames
        );
        assert!(c.peak_speed <= 3.0, "{format}: peak {}", c.peak_speed);
    }
}

#[tokio::test]
async fn tencent_decodes_compressed_audio_it_cannot_take_as_recorded() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let stereo = fixture("compressed/01-44k-stereo.mp3");
    // Declared as it is (44.1 kHz stereo): decoded, resampled, sent as PCM.
    let s = app
        .create(
            json!({"provider": "tencent", "format": "mp3", "sample_rate": 44100, "channels": 2}),
        )
        .await;
    let events = app.stream_bytes(&s, &stereo, 1000).await;
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let c = rt.conns().pop().expect("a connection");
    assert_eq!(c.params["voice_format"], "1");
    let ms = c.audio_bytes / 32;
    assert!(
        (3_900..=4_400).contains(&ms),
        "≈ 4.1 s of 16 kHz PCM, got {ms} ms"
    );
    // Declared 16 kHz mono but it is not: a clear error, not garbage upstream.
    let s = app
        .create(
            json!({"provider": "tencent", "format": "mp3", "sample_rate": 16000, "channels": 1}),
        )
        .await;
    for (i, piece) in stereo.chunks(1000).enumerate() {
        // The session fails at the first frame; later chunks get 410 session_closed.
        let (st, _) = app.upload(&s, &format!("seq={i}"), piece.to_vec()).await;
        if st == StatusCode::GONE {
            break;
        }
        assert_eq!(st, StatusCode::OK);
    }
    let events = app.collect_until_end(&s, Duration::from_secs(30)).await;
    let err = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(err["code"], "unsupported_audio");
    assert!(
        err["message"].as_str().unwrap().contains("44100 Hz"),
        "{err}"
    );
    assert_eq!(end_reason(&events), "failed");
}

/// (sentence, the fake's voiced duration, start, end) of each final: what a clean run and a run
/// with a provider fault must agree on (the fake numbers its sentences per connection, so its
/// `第N句` prefix differs after a reconnect).
fn final_shape(events: &[Value]) -> Vec<(u64, String, u64, u64)> {
    finals(events)
        .iter()
        .map(|f| {
            let text = f["text"].as_str().unwrap();
            let voiced = text.split_once('句').map_or(text, |(_, v)| v).to_string();
            (
                f["sentence"].as_u64().unwrap(),
                voiced,
                f["start_ms"].as_u64().unwrap(),
                f["end_ms"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_dropped_provider_stream_is_reopened_and_the_unfinished_utterance_replayed() {
    let pcm = two_sentences();
    let clean_fake = FakeTencent::start(Behavior::default()).await;
    let app = spawn_app_with_providers(vec![tencent(&clean_fake, None, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let clean = app.stream_pcm(&s, &pcm, 200, false).await;
    assert_eq!(end_reason(&clean), "finished");

    // The first connection fails with 5000 (internal error) 3.5 s into the audio, inside the
    // second sentence; the session reopens the stream and replays from the end of sentence 0.
    let fake = FakeTencent::start(Behavior {
        fail_after: Some((3_500, 5000)),
        fail_conns: 1,
        ..Behavior::default()
    })
    .await;
    let app = spawn_app_with_providers(vec![tencent(&fake, None, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let events = app.stream_pcm(&s, &pcm, 200, false).await;
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    assert_eq!(fake.conns().len(), 2, "one reopen");
    let warn = events
        .iter()
        .find(|e| e["type"] == "warning")
        .expect("a warning");
    assert_eq!(warn["code"], "provider_reconnected");
    assert!(!events.iter().any(|e| e["type"] == "error"), "{events:?}");
    assert_seqs_contiguous(&events, "no gaps, no repeats");
    let (a, b) = (final_shape(&clean), final_shape(&events));
    assert_eq!(
        a.len(),
        b.len(),
        "nothing lost or duplicated: {a:?} vs {b:?}"
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.0, &x.1), (y.0, &y.1), "same sentences and durations");
        assert!(
            x.2.abs_diff(y.2) <= 100 && x.3.abs_diff(y.3) <= 100,
            "same times: {x:?} vs {y:?}"
        );
    }
    // The second connection got only the audio from the end of sentence 0 on.
    let c = &fake.conns()[1];
    let sent_ms = (c.audio_bytes / 32) as u64;
    let from = a[0].3;
    let total = pcm.len() as u64 / 16;
    assert!(
        sent_ms.abs_diff(total - from) <= 100,
        "replayed {sent_ms} ms, expected ≈ {} ms",
        total - from
    );
}

#[tokio::test]
async fn a_provider_that_keeps_failing_ends_the_session_after_the_retries() {
    let fake = FakeTencent::start(Behavior {
        fail_after: Some((500, 5000)),
        ..Behavior::default()
    })
    .await;
    let app = spawn_app_with_providers(vec![tencent(&fake, None, |_| {})], |c| {
        c.provider_retries = 2;
        c.provider_backoff_ms = 50;
    })
    .await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let events = app.stream_pcm(&s, &two_sentences(), 200, false).await;
    assert_eq!(fake.conns().len(), 3, "the first stream and two reopens");
    let warnings = events
        .iter()
        .filter(|e| e["code"] == "provider_reconnected")
        .count();
    assert_eq!(warnings, 2);
    let err = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(
        (err["code"].as_str(), err["provider_code"].as_str()),
        (Some("provider_unavailable"), Some("5000"))
    );
    assert_eq!(end_reason(&events), "failed");
}

#[tokio::test]
async fn tencent_pacing_violations_are_caught_by_the_fake() {
    // A fake stricter than Tencent (1.5×) against our 2× catch-up: the fake must object.
    let rt = FakeTencent::start(Behavior {
        max_speed: 1.5,
        ..Behavior::default()
    })
    .await;
    let app = spawn_app_with_providers(vec![tencent(&rt, None, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let events = stream_until_refused(&app, &s, &fakes::tone(6000)).await;
    let err = events
        .iter()
        .find(|e| e["type"] == "error")
        .expect("error event");
    assert_eq!(
        (err["code"].as_str(), err["provider_code"].as_str()),
        (Some("provider_pacing"), Some("4000"))
    );
    assert_eq!(end_reason(&events), "failed");
}

/// Upstream answers are capped at 1 MiB per message (`provider::connect_upstream`): a result
/// just under it goes through, one just over it drops the stream (`provider_closed`).
#[tokio::test]
async fn tencent_answers_are_capped_at_one_mebibyte() {
    // The JSON around the pad is a few hundred bytes.
    for (pad, fits) in [((1 << 20) - 4096, true), ((1 << 20) + 1, false)] {
        let fake = FakeTencent::start(Behavior {
            pad_results: pad,
            ..Behavior::default()
        })
        .await;
        let app = spawn_app_with_providers(vec![tencent(&fake, None, |_| {})], |c| {
            c.provider_retries = 0;
        })
        .await;
        let s = app.create(json!({"provider": "tencent"})).await;
        let events = stream_until_refused(&app, &s, &fakes::tone(2000)).await;
        let err = events.iter().find(|e| e["type"] == "error");
        if fits {
            assert!(err.is_none(), "pad {pad}: {err:?}");
            assert!(events.iter().any(|e| e["type"] == "final"), "pad {pad}");
            assert_eq!(end_reason(&events), "finished");
        } else {
            assert_eq!(err.map(|e| &e["code"]), Some(&json!("provider_closed")));
            assert_eq!(end_reason(&events), "failed");
        }
    }
}

#[tokio::test]
async fn tencent_error_classes_become_error_events() {
    let cases: Vec<(Behavior, &str, &str, &str)> = vec![
        (
            Behavior::default(),
            "wrong-key",
            "provider_auth_failed",
            "4002",
        ),
        (
            Behavior {
                handshake_error: Some(4003),
                ..Behavior::default()
            },
            SECRET_KEY,
            "provider_account",
            "4003",
        ),
        (
            Behavior {
                handshake_error: Some(4005),
                ..Behavior::default()
            },
            SECRET_KEY,
            "provider_account",
            "4005",
        ),
        (
            Behavior {
                max_connections: 0,
                ..Behavior::default()
            },
            SECRET_KEY,
            "provider_busy",
            "4006",
        ),
        (
            Behavior {
                fail_after: Some((500, 5000)),
                ..Behavior::default()
            },
            SECRET_KEY,
            "provider_unavailable",
            "5000",
        ),
        (
            Behavior {
                fail_after: Some((500, 4007)),
                ..Behavior::default()
            },
            SECRET_KEY,
            "provider_audio_rejected",
            "4007",
        ),
    ];
    for (b, key, code, pcode) in cases {
        let rt = FakeTencent::start(b).await;
        let key = key.to_string();
        let app = spawn_app_with_providers(
            vec![tencent(&rt, None, |s| s.credentials = Some(creds(&key)))],
            |_| {},
        )
        .await;
        let s = app.create(json!({"provider": "tencent"})).await;
        let events = stream_until_refused(&app, &s, &fakes::tone(1200)).await;
        let err = events
            .iter()
            .find(|e| e["type"] == "error")
            .unwrap_or_else(|| panic!("{code}: {events:?}"));
        assert_eq!(
            (err["code"].as_str(), err["provider_code"].as_str()),
            (Some(code), Some(pcode)),
            "{err}"
        );
        assert_eq!(end_reason(&events), "failed", "{code}");
        assert!(!err.to_string().contains(SECRET_KEY));
    }
}

#[tokio::test]
async fn tencent_concurrency_limit_answers_429_at_creation() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let app =
        spawn_app_with_providers(vec![tencent(&rt, None, |s| s.max_concurrency = 1)], |_| {}).await;
    let a = app.create(json!({"provider": "tencent"})).await;
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&json!({"provider": "tencent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after").is_some());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_busy");
    let r = app
        .http
        .delete(format!("{}/v1/sessions/{}", app.url, a.id))
        .header("x-session-token", &a.token)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let mut ok = false;
    for _ in 0..40 {
        let r = app
            .http
            .post(format!("{}/v1/sessions", app.url))
            .json(&json!({"provider": "tencent"}))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::CREATED {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the slot is released when the session ends");
}

#[tokio::test]
async fn tencent_secrets_stay_server_side() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let sts = |s: &mut TencentSettings| {
        let mut c = creds(SECRET_KEY);
        c.token = Some(Secret::new("sts-session-token"));
        s.credentials = Some(c);
    };
    let app = spawn_app_with_providers(vec![tencent(&rt, None, sts)], |_| {}).await;
    let s = app.create(json!({"provider": "tencent"})).await;
    let events = app.stream_pcm(&s, &fakes::tone(800), 200, false).await;
    assert_eq!(end_reason(&events), "finished");
    assert_eq!(
        rt.conns()[0].token_header.as_deref(),
        Some("sts-session-token"),
        "X-TC-Token sent"
    );
    let ready = app
        .http
        .get(format!("{}/ready", app.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for text in [s.created.to_string(), json!(events).to_string(), ready] {
        assert!(
            !text.contains(SECRET_KEY) && !text.contains(SECRET_ID),
            "{text}"
        );
    }
    assert!(
        !format!("{:?}", creds(SECRET_KEY)).contains(SECRET_KEY),
        "Debug redacts the key"
    );
}

#[tokio::test]
async fn tencent_without_credentials_is_not_ready() {
    if std::env::var_os("TENCENT_SECRET_KEY").is_some() {
        return; // a developer's real credentials are in the environment
    }
    let rt = FakeTencent::start(Behavior::default()).await;
    let app =
        spawn_app_with_providers(vec![tencent(&rt, None, |s| s.credentials = None)], |_| {}).await;
    let ready: Value = app.get_path("/ready").await.1;
    assert_eq!(ready["providers"]["tencent"]["ready"], false, "{ready}");
    assert_eq!(
        ready["status"], "ready",
        "the default provider is still ready"
    );
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&json!({"provider": "tencent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn tencent_one_sentence_signs_and_passes_codecs_through() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let api = FakeTc3::start(None).await;
    let app = spawn_app_with_providers(vec![tencent(&rt, Some(&api), |_| {})], |_| {}).await;
    let fixture = |p: &str| std::fs::read(root().join("tests/fixtures").join(p)).unwrap();
    let post = |q: &'static str, ct: &'static str, body: Vec<u8>| {
        let (http, url) = (app.http.clone(), app.url.clone());
        async move {
            let r = http
                .post(format!("{url}/v1/recognize?provider=tencent{q}"))
                .header("content-type", ct)
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    // 16 kHz mono WAV and MP3 go as they are; 44.1 kHz stereo is converted to PCM first.
    let wav = fixture("zh/01.wav");
    let (s, b) = post("&word_info=1&filter_punc=2", "audio/wav", wav.clone()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["text"], format!("一句话wav:{}", wav.len()));
    let mp3 = fixture("compressed/01-16k.mp3");
    let (s, b) = post("", "audio/mpeg", mp3.clone()).await;
    assert_eq!(
        (s, b["text"].as_str()),
        (
            StatusCode::OK,
            Some(format!("一句话mp3:{}", mp3.len()).as_str())
        ),
        "{b}"
    );
    let (s, b) = post("", "audio/mpeg", fixture("compressed/01-44k-stereo.mp3")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b["text"].as_str().unwrap().starts_with("一句话pcm:"), "{b}");
    let calls = api.calls.lock().unwrap().clone();
    assert!(calls.iter().all(|c| c.error.is_none()), "{calls:?}");
    assert_eq!(calls[0].body["WordInfo"], 1);
    assert_eq!(calls[0].body["FilterPunc"], 2);
    assert_eq!(calls[0].body["EngSerViceType"], "16k_zh");
    // Over 60 s is refused before any call.
    let (s, b) = post(
        "&format=pcm",
        "application/octet-stream",
        vec![1u8; 16_000 * 2 * 61],
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("audio_rejected")),
        "{b}"
    );
    // Wrong key: the fake's signature check fails, the code is kept.
    let app2 = spawn_app_with_providers(
        vec![tencent(&rt, Some(&api), |s| {
            s.credentials = Some(creds("wrong"))
        })],
        |_| {},
    )
    .await;
    let r = app2
        .http
        .post(format!("{}/v1/recognize?provider=tencent", app2.url))
        .header("content-type", "audio/wav")
        .body(wav.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (
            b["error"]["code"].as_str(),
            b["error"]["provider_code"].as_str()
        ),
        (
            Some("provider_auth_failed"),
            Some("AuthFailure.SignatureFailure")
        )
    );
    // Rate limited upstream.
    let limited = FakeTc3::start(Some("RequestLimitExceeded")).await;
    let app3 = spawn_app_with_providers(vec![tencent(&rt, Some(&limited), |_| {})], |_| {}).await;
    let r = app3
        .http
        .post(format!("{}/v1/recognize?provider=tencent", app3.url))
        .header("content-type", "audio/wav")
        .body(wav)
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (
            b["error"]["code"].as_str(),
            b["error"]["provider_code"].as_str()
        ),
        (Some("provider_busy"), Some("RequestLimitExceeded"))
    );
}

#[tokio::test]
async fn openai_sessions_send_each_utterance_and_stream_partials() {
    let fake = FakeOpenAi::start(fakes::openai::Behavior::default()).await;
    let app = spawn_app_with_providers(vec![openai(&fake, |s| s.stream = true)], |_| {}).await;
    let s = app
        .create(json!({"provider": "openai", "engine": "16k_zh"}))
        .await;
    let saw_partial = app.first_event_in_background(&s, "partial");
    let events = app.stream_pcm(&s, &two_sentences(), 200, false).await;
    assert!(
        saw_partial.await.unwrap().is_some(),
        "a streamed partial reached the client"
    );
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let f = finals(&events);
    let calls = fake.calls.lock().unwrap().clone();
    assert!(f.len() >= 2, "{events:?}");
    assert_eq!(calls.len(), f.len(), "one request per utterance");
    for c in &calls {
        assert_eq!(c.status, 200);
        assert_eq!(c.file_name, "utterance.wav");
        assert_eq!(c.fields.get("model").map(String::as_str), Some("whisper-1"));
        assert_eq!(c.fields.get("language").map(String::as_str), Some("zh"));
        assert_eq!(c.fields.get("stream").map(String::as_str), Some("true"));
    }
    for fin in &f {
        assert!(fin["text"].as_str().unwrap().starts_with("第0句"), "{fin}");
    }
}

#[tokio::test]
async fn openai_retries_5xx_and_reports_auth_failures() {
    let fake = FakeOpenAi::start(fakes::openai::Behavior {
        fail_first: Some((1, 503)),
        ..Default::default()
    })
    .await;
    let app = spawn_app_with_providers(vec![openai(&fake, |_| {})], |_| {}).await;
    let s = app.create(json!({"provider": "openai"})).await;
    let events = app
        .stream_pcm(
            &s,
            &read_wav(&root().join("tests/fixtures/zh/02.wav")),
            200,
            false,
        )
        .await;
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let statuses: Vec<u16> = fake
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, vec![503, 200]);

    let fake = FakeOpenAi::start(fakes::openai::Behavior::default()).await;
    let app = spawn_app_with_providers(
        vec![openai(&fake, |s| s.api_key = Some(Secret::new("sk-wrong")))],
        |_| {},
    )
    .await;
    let s = app.create(json!({"provider": "openai"})).await;
    let events = stream_until_refused(
        &app,
        &s,
        &read_wav(&root().join("tests/fixtures/zh/02.wav")),
    )
    .await;
    let err = events.iter().find(|e| e["type"] == "error").expect("error");
    assert_eq!(
        (err["code"].as_str(), err["provider_code"].as_str()),
        (Some("provider_auth_failed"), Some("401"))
    );
    assert!(err["message"]
        .as_str()
        .unwrap()
        .contains("Incorrect API key"));
    assert_eq!(end_reason(&events), "failed");
}

#[tokio::test]
async fn openai_and_whisper_cpp_one_shot() {
    let fake = FakeOpenAi::start(fakes::openai::Behavior::default()).await;
    let cpp = FakeOpenAi::start(fakes::openai::Behavior {
        whisper_cpp: true,
        ..Default::default()
    })
    .await;
    let p_cpp: Arc<dyn Provider> = Arc::new(
        OpenAiProvider::new(
            "whispercpp",
            OpenAiSettings {
                base_url: cpp.base_url.clone(),
                flavor: Flavor::WhisperCpp,
                api_key_env: String::new(),
                ..OpenAiSettings::default()
            },
        )
        .unwrap(),
    );
    let app = spawn_app_with_providers(vec![openai(&fake, |_| {}), p_cpp], |_| {}).await;
    let wav = pcm_bytes(&two_sentences());
    for provider in ["openai", "whispercpp"] {
        let r = app
            .http
            .post(format!(
                "{}/v1/recognize?provider={provider}&format=pcm",
                app.url
            ))
            .body(wav.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{provider}");
        let b: Value = r.json().await.unwrap();
        let sentences = b["sentences"].as_array().unwrap();
        assert!(
            sentences.len() >= 2,
            "{provider}: verbose_json segments become sentences: {b}"
        );
        assert!(sentences[1]["start_ms"].as_u64().unwrap() > 1000, "{b}");
    }
    assert_eq!(cpp.calls.lock().unwrap()[0].file_name, "audio.wav");
    // MP3 passes through to OpenAI as is.
    let mp3 = std::fs::read(root().join("tests/fixtures/compressed/01-16k.mp3")).unwrap();
    let r = app
        .http
        .post(format!("{}/v1/recognize?provider=openai", app.url))
        .header("content-type", "audio/mpeg")
        .body(mp3.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let last = fake.calls.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (last.file_name.as_str(), last.file_bytes),
        ("audio.mp3", mp3.len())
    );
}

#[tokio::test]
async fn funasr_two_pass_partials_then_finals() {
    let fake = FakeFunAsr::start(None).await;
    let app = spawn_app_with_providers(vec![funasr(&fake)], |_| {}).await;
    let s = app
        .create(json!({"provider": "funasr", "hotword_list": "阿里巴巴|20"}))
        .await;
    let first_partial = app.first_event_in_background(&s, "partial");
    let events = app.stream_pcm(&s, &two_sentences(), 200, true).await;
    assert!(
        first_partial.await.unwrap().is_some(),
        "online partials reach a waiting poll"
    );
    assert_eq!(end_reason(&events), "finished", "{events:?}");
    let f = finals(&events);
    assert!(f.len() >= 2, "{events:?}");
    for (i, fin) in f.iter().enumerate() {
        assert_eq!(fin["sentence"], i as u64);
        assert!(
            fin["text"]
                .as_str()
                .unwrap()
                .starts_with(&format!("第{i}句")),
            "{fin}"
        );
    }
    for p in events.iter().filter(|e| e["type"] == "partial") {
        assert!(
            p["text"].as_str().unwrap().chars().all(|c| c == '在'),
            "online deltas appended: {p}"
        );
    }
    let c = &until("the fake FunASR server to see the stream end", || async {
        let conns = fake.conns();
        conns
            .first()
            .is_some_and(|c| c.end_received && c.client_closed)
            .then_some(conns)
    })
    .await[0];
    assert_eq!(c.config["mode"], "2pass");
    assert_eq!(c.config["chunk_size"], json!([5, 10, 5]));
    assert_eq!(
        c.config["hotwords"],
        json!(json!({"阿里巴巴": 20}).to_string())
    );
    assert!(c.end_received && c.client_closed, "{c:?}");
    assert_eq!(c.audio_bytes, two_sentences().len() * 2);
}

#[tokio::test]
async fn funasr_dropped_connection_ends_the_session_with_an_error() {
    let fake = FakeFunAsr::start(Some(1000)).await;
    let app = spawn_app_with_providers(vec![funasr(&fake)], |_| {}).await;
    let s = app.create(json!({"provider": "funasr"})).await;
    let events = stream_until_refused(&app, &s, &fakes::tone(3000)).await;
    let err = events.iter().find(|e| e["type"] == "error").expect("error");
    assert_eq!(err["code"], "provider_closed");
    assert_eq!(end_reason(&events), "failed");
}

/// The same realtime scenario through every provider: the client sees the same shape of event
/// stream — partials (optional) then one final per sentence, sentences counted from 0 in order,
/// times inside the audio and non-decreasing, a clean `end` whose transcript joins the finals.
#[tokio::test]
async fn conformance_every_provider_gives_the_same_event_stream_shape() {
    let rt = FakeTencent::start(Behavior::default()).await;
    let oa = FakeOpenAi::start(fakes::openai::Behavior::default()).await;
    let fa = FakeFunAsr::start(None).await;
    let app = spawn_app_with_providers(
        vec![
            tencent(&rt, None, |_| {}),
            openai(&oa, |s| s.stream = true),
            funasr(&fa),
        ],
        |_| {},
    )
    .await;
    let pcm = two_sentences();
    let audio_ms = pcm.len() as u64 / 16;
    for provider in ["embedded", "tencent", "openai", "funasr"] {
        let s = app
            .create(json!({"provider": provider, "engine": "16k_zh"}))
            .await;
        let events = app.stream_pcm(&s, &pcm, 200, false).await;
        let ctx = format!("{provider}: {events:?}");
        assert_eq!(end_reason(&events), "finished", "{ctx}");
        assert!(events.iter().all(|e| e["type"] != "error"), "{ctx}");
        assert_seqs_ascending(&events, &ctx);
        let f = finals(&events);
        assert!(f.len() >= 2, "two sentences at least: {ctx}");
        let mut last_end = 0;
        for (i, fin) in f.iter().enumerate() {
            assert_eq!(fin["sentence"], i as u64, "{ctx}");
            assert!(!fin["text"].as_str().unwrap().is_empty(), "{ctx}");
            let (st, en) = (
                fin["start_ms"].as_u64().unwrap(),
                fin["end_ms"].as_u64().unwrap(),
            );
            assert!(
                st <= en && en <= audio_ms + 200 && st + 200 >= last_end,
                "times {st}..{en}: {ctx}"
            );
            last_end = en;
        }
        // No partial after its sentence's final; each partial's stable prefix is its own.
        for (k, e) in events.iter().enumerate() {
            if e["type"] == "partial" {
                let (text, stable) = (e["text"].as_str().unwrap(), e["stable"].as_str());
                assert!(stable.is_some_and(|p| text.starts_with(p)), "{e}: {ctx}");
                assert!(
                    !events[..k]
                        .iter()
                        .any(|x| x["type"] == "final" && x["sentence"] == e["sentence"]),
                    "{ctx}"
                );
            }
        }
        let joined: String = f.iter().map(|x| x["text"].as_str().unwrap()).collect();
        assert_eq!(
            events.last().unwrap()["transcript"].as_str().unwrap(),
            joined,
            "{ctx}"
        );
    }
}

#[tokio::test]
async fn providers_file_configures_named_providers_and_the_default() {
    let fake = FakeFunAsr::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("providers.json");
    std::fs::write(
        &file,
        json!([{"name": "local-funasr", "kind": "funasr", "url": fake.url, "max_concurrency": 2}])
            .to_string(),
    )
    .unwrap();
    let app = spawn_app_with(|c| {
        c.providers = Some(file.clone());
        c.default_provider = "local-funasr".into();
    })
    .await;
    let ready: Value = app.get_path("/ready").await.1;
    assert_eq!(ready["default_provider"], "local-funasr", "{ready}");
    assert_eq!(ready["providers"]["local-funasr"]["ready"], true);
    assert_eq!(
        ready["providers"]["local-funasr"]["stats"]["max_concurrency"],
        2
    );
    let s = app.create(json!({})).await;
    let events = app.stream_pcm(&s, &two_sentences(), 200, false).await;
    assert_eq!(end_reason(&events), "finished");
    let (_, info) = app.get(&s).await;
    assert_eq!(info["provider"], "local-funasr");
    assert_eq!(fake.conns().len(), 1);
    // A default that names nothing configured is a start-up error.
    let mut cfg = voxpoll::config::Config::loopback(dir.path().join("x.db"));
    cfg.default_provider = "missing".into();
    let err = voxpoll::app::build_with_providers(
        cfg,
        Some(engine()),
        Vec::new(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await;
    assert!(err.is_err());
}
