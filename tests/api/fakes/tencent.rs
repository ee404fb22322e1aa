//! Fake Tencent real-time ASR (`/asr/v2/{appid}`, doc 1093/48982; shared/providers.md §1.11):
//! verifies the HMAC-SHA1 signature over the decoded query, answers the handshake verdict,
//! enforces ≤ 3× real-time pacing (4000) and the no-audio limit (4008), scripts results from the
//! audio, and honours `{"type":"end"}` with a last `slice_type: 2` and `final: 1`.

use super::{samples, Out, Scripter};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use voxpoll::provider::tencent::sign::{realtime_sign_string, realtime_signature};

pub const APP_ID: &str = "1259228442";
pub const SECRET_ID: &str = "AKIDfakeSecretId";
pub const SECRET_KEY: &str = "fakeSecretKeyThatMustNeverLeak";

/// How the fake behaves.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Most audio per wall-clock time, × real time, before 4000.
    pub max_speed: f64,
    /// No-audio limit before 4008.
    pub idle_limit: Duration,
    /// Connections allowed at once before 4006.
    pub max_connections: usize,
    /// Error code sent at the handshake instead of success.
    pub handshake_error: Option<i64>,
    /// `(after this much audio in ms, code)`: a mid-stream error.
    pub fail_after: Option<(u64, i64)>,
    /// `fail_after` applies to connections with an index below this (all by default).
    pub fail_conns: usize,
    /// Ends every partial and final text with `@<unix µs>` of its sending (the gateway
    /// benchmark's S6 measures what voxpoll adds after that instant).
    pub stamp_texts: bool,
    /// Keeps every binary frame in [`Conn::raw`] (off for long benchmark runs).
    pub keep_raw: bool,
    /// Pads every result message with a `"pad"` field of this many bytes (the protocol has no
    /// such field: a client must ignore it), to probe a client's message size limit.
    pub pad_results: usize,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            max_speed: 3.0,
            idle_limit: Duration::from_secs(15),
            max_connections: 100,
            handshake_error: None,
            fail_after: None,
            fail_conns: usize::MAX,
            stamp_texts: false,
            keep_raw: true,
            pad_results: 0,
        }
    }
}

/// What one connection did.
#[derive(Clone, Debug, Default)]
pub struct Conn {
    pub params: BTreeMap<String, String>,
    /// Audio bytes received.
    pub audio_bytes: usize,
    /// Every binary frame's bytes, concatenated (for pass-through checks).
    pub raw: Vec<u8>,
    /// Binary frames received.
    pub frames: usize,
    /// Bytes in frames that were entirely zero (bridging silence).
    pub zero_bytes: usize,
    pub end_received: bool,
    /// Errors the fake raised (code, reason).
    pub errors: Vec<(i64, String)>,
    /// Highest audio/elapsed ratio seen after the first second.
    pub peak_speed: f64,
    /// Longest gap between audio frames, ms.
    pub max_gap_ms: u64,
    pub token_header: Option<String>,
}

#[derive(Default)]
pub struct Log {
    pub conns: Vec<Conn>,
    open: usize,
}

pub struct FakeTencent {
    /// `ws://127.0.0.1:PORT/asr/v2` (the provider appends the AppID).
    pub url: String,
    pub log: Arc<Mutex<Log>>,
}

impl FakeTencent {
    pub async fn start(b: Behavior) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let l2 = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (b, log) = (b.clone(), Arc::clone(&l2));
                tokio::spawn(async move { serve(tcp, b, log).await });
            }
        });
        Self {
            url: format!("ws://{addr}/asr/v2"),
            log,
        }
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.log.lock().unwrap().conns.clone()
    }
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Unix time, µs.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[allow(clippy::result_large_err)] // tungstenite's callback signature
async fn serve(tcp: tokio::net::TcpStream, b: Behavior, log: Arc<Mutex<Log>>) {
    let mut uri = String::new();
    let mut host = String::new();
    let mut token = None;
    let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, resp: Response| {
        uri = req.uri().to_string();
        host = req
            .headers()
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        token = req
            .headers()
            .get("x-tc-token")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        Ok(resp)
    })
    .await;
    let Ok(ws) = ws else { return };
    let (mut tx, mut rx) = ws.split();
    let (path, query) = uri.split_once('?').unwrap_or((&uri, ""));
    let mut params = BTreeMap::new();
    let mut signature = String::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "signature" {
            signature = decode(v);
        } else {
            params.insert(decode(k), decode(v));
        }
    }
    let voice_id = params.get("voice_id").cloned().unwrap_or_default();
    let idx = {
        let mut l = log.lock().unwrap();
        l.open += 1;
        l.conns.push(Conn {
            params: params.clone(),
            token_header: token,
            ..Conn::default()
        });
        l.conns.len() - 1
    };
    let record = |code: i64, why: &str| {
        log.lock().unwrap().conns[idx]
            .errors
            .push((code, why.to_string()));
    };
    let msg = |code: i64, message: &str| {
        json!({"code": code, "message": message, "voice_id": voice_id, "message_id": format!("{voice_id}_{}", rand_id())}).to_string()
    };
    // §1.11 step 2: required params, signature over the decoded query, clock window.
    let verdict = (|| {
        for k in [
            "secretid",
            "timestamp",
            "expired",
            "nonce",
            "engine_model_type",
            "voice_id",
            "voice_format",
        ] {
            if !params.contains_key(k) {
                return Err((4001, format!("missing parameter {k}")));
            }
        }
        let expected = realtime_signature(
            SECRET_KEY,
            &realtime_sign_string(&format!("{host}{path}"), &params),
        );
        if params["secretid"] != SECRET_ID
            || expected != signature
            || path != format!("/asr/v2/{APP_ID}")
        {
            return Err((4002, "鉴权失败".to_string()));
        }
        let ts: u64 = params["timestamp"].parse().unwrap_or(0);
        let exp: u64 = params["expired"].parse().unwrap_or(0);
        if now_s().abs_diff(ts) > 300 || exp <= now_s() {
            return Err((4002, "签名过期".to_string()));
        }
        // 1 = pcm, 8 = mp3, 16 = aac (providers.md §1.2); others are not scripted here.
        if !["1", "8", "16"].contains(&params["voice_format"].as_str()) {
            return Err((4001, "voice_format".to_string()));
        }
        Ok(())
    })();
    let busy = log.lock().unwrap().open > b.max_connections;
    let verdict = match (verdict, busy, b.handshake_error) {
        (Err(e), _, _) => Err(e),
        (Ok(()), true, _) => Err((4006, "并发超限".to_string())),
        (Ok(()), false, Some(code)) => Err((code, "injected".to_string())),
        (Ok(()), false, None) => Ok(()),
    };
    if let Err((code, why)) = verdict {
        record(code, &why);
        let _ = tx.send(Message::text(msg(code, &why))).await;
        let _ = tx.close().await;
        log.lock().unwrap().open -= 1;
        return;
    }
    let _ = tx.send(Message::text(msg(0, "success"))).await;

    let mut scripter = Scripter::new();
    // Compressed formats are decoded to drive the script; 4007 when the bytes are not that codec.
    let mut codec = match params["voice_format"].as_str() {
        "8" => Some(voxpoll::audio::compressed::FrameDecoder::new(
            voxpoll::audio::compressed::Framing::Mp3,
        )),
        "16" => Some(voxpoll::audio::compressed::FrameDecoder::new(
            voxpoll::audio::compressed::Framing::Adts,
        )),
        _ => None,
    };
    let mut first_audio: Option<Instant> = None;
    let mut last_audio = Instant::now();
    let mut audio_ms_total = 0u64;
    let result = |r: &Out| -> Value {
        let (slice, index, start, end, text) = match r {
            Out::Begin { index, start_ms } => (0, *index, *start_ms, *start_ms, String::new()),
            Out::Partial {
                index,
                start_ms,
                end_ms,
                text,
            } => (1, *index, *start_ms, *end_ms, text.clone()),
            Out::Final {
                index,
                start_ms,
                end_ms,
                text,
            } => (2, *index, *start_ms, *end_ms, text.clone()),
        };
        let text = if b.stamp_texts && !text.is_empty() {
            format!("{text}@{}", now_us())
        } else {
            text
        };
        let mut v = json!({"code": 0, "message": "success", "voice_id": voice_id, "message_id": format!("{voice_id}_{}", rand_id()),
               "result": {"slice_type": slice, "index": index, "start_time": start, "end_time": end,
                          "voice_text_str": text, "word_size": 1,
                          "word_list": [{"word": "词", "start_time": start, "end_time": end, "stable_flag": 1}]}});
        if b.pad_results > 0 {
            v["pad"] = json!("x".repeat(b.pad_results));
        }
        v
    };
    let outcome: Result<(), (i64, String)> = async {
        loop {
            let next = tokio::time::timeout_at((last_audio + b.idle_limit).into(), rx.next()).await;
            let m = match next {
                Err(_) => return Err((4008, "后台识别服务器音频分片等待超时".to_string())),
                Ok(None) | Ok(Some(Err(_))) => return Ok(()),
                Ok(Some(Ok(m))) => m,
            };
            match m {
                Message::Binary(bytes) => {
                    let now = Instant::now();
                    let gap = now.duration_since(last_audio).as_millis() as u64;
                    last_audio = now;
                    let t0 = *first_audio.get_or_insert(now);
                    let pcm = match codec.as_mut() {
                        None => samples(&bytes),
                        Some(c) => {
                            let pcm = c.push(&bytes).map_err(|e| (4007, format!("音频解码失败: {e}")))?;
                            if c.pending() > 0 {
                                return Err((4007, "a binary frame ended inside a codec frame".to_string()));
                            }
                            pcm
                        }
                    };
                    audio_ms_total += pcm.len() as u64 / 16;
                    {
                        let mut l = log.lock().unwrap();
                        let c = &mut l.conns[idx];
                        c.audio_bytes += bytes.len();
                        if b.keep_raw {
                            c.raw.extend_from_slice(&bytes);
                        }
                        c.frames += 1;
                        if pcm.iter().all(|&s| s == 0) {
                            c.zero_bytes += bytes.len();
                        }
                        if first_audio != Some(now) {
                            c.max_gap_ms = c.max_gap_ms.max(gap);
                        }
                        let elapsed_ms = now.duration_since(t0).as_millis() as u64;
                        if elapsed_ms >= 1000 {
                            c.peak_speed = c.peak_speed.max(audio_ms_total as f64 / elapsed_ms as f64);
                        }
                        // "at most 3 seconds of audio per 1 second", with one frame of slack.
                        if audio_ms_total as f64 > b.max_speed * elapsed_ms as f64 + 1000.0 {
                            return Err((4000, format!("audio too fast: {audio_ms_total} ms in {elapsed_ms} ms")));
                        }
                    }
                    if let Some((after, code)) = b.fail_after.filter(|_| idx < b.fail_conns) {
                        if audio_ms_total >= after {
                            return Err((code, "injected failure".to_string()));
                        }
                    }
                    for r in scripter.push(&pcm) {
                        tx.send(Message::text(result(&r).to_string())).await.map_err(|e| (-1, e.to_string()))?;
                    }
                }
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["type"] != "end" {
                        return Err((4010, format!("unknown text message {t}")));
                    }
                    log.lock().unwrap().conns[idx].end_received = true;
                    for r in scripter.finish() {
                        tx.send(Message::text(result(&r).to_string())).await.map_err(|e| (-1, e.to_string()))?;
                    }
                    let fin = json!({"code": 0, "message": "success", "voice_id": voice_id,
                                     "message_id": format!("{voice_id}_{}", rand_id()), "final": 1});
                    tx.send(Message::text(fin.to_string())).await.map_err(|e| (-1, e.to_string()))?;
                    let _ = tx.close().await;
                    return Ok(());
                }
                Message::Close(_) => return Ok(()),
                _ => {}
            }
        }
    }
    .await;
    if let Err((code, why)) = outcome {
        record(code, &why);
        let _ = tx.send(Message::text(msg(code, &why))).await;
        let _ = tx.close().await;
    }
    log.lock().unwrap().open -= 1;
}

fn rand_id() -> u32 {
    rand::random::<u32>() % 100_000
}
