//! Fake OpenAI-compatible transcription server (shared/providers.md §3.7): multipart with `file`
//! and `model` required, bearer key checked, `json` / `verbose_json` answers, `stream=true` as
//! `data:` SSE lines (`transcript.text.delta` then `transcript.text.done`), OpenAI error JSON;
//! and a whisper.cpp mode (`POST /inference`, `{"error": "…"}`).
//! The transcript of a file is computed from its audio (see [`super::Scripter`]).

use super::{samples, Out, Scripter};
use bytes::Buf;
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use warp::Filter;

pub const API_KEY: &str = "sk-fake-key";

#[derive(Clone, Debug, Default)]
pub struct Behavior {
    pub whisper_cpp: bool,
    /// Answer the first N requests with this status (then succeed).
    pub fail_first: Option<(usize, u16)>,
}

#[derive(Clone, Debug)]
pub struct Call {
    pub fields: HashMap<String, String>,
    pub file_name: String,
    pub file_bytes: usize,
    pub status: u16,
}

pub struct FakeOpenAi {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

fn transcript_of(file: &[u8]) -> (String, Vec<(f64, f64, String)>, f64) {
    let pcm = match hound::WavReader::new(std::io::Cursor::new(file)) {
        Ok(r) => r
            .into_samples::<i16>()
            .filter_map(Result::ok)
            .collect::<Vec<_>>(),
        Err(_) => samples(file),
    };
    let mut sc = Scripter::new();
    let mut outs = sc.push(&pcm);
    outs.extend(sc.finish());
    let segs: Vec<(f64, f64, String)> = outs
        .into_iter()
        .filter_map(|o| match o {
            Out::Final {
                start_ms,
                end_ms,
                text,
                ..
            } => Some((start_ms as f64 / 1000.0, end_ms as f64 / 1000.0, text)),
            _ => None,
        })
        .collect();
    let text = segs
        .iter()
        .map(|s| s.2.as_str())
        .collect::<Vec<_>>()
        .join("");
    (text, segs, pcm.len() as f64 / 16_000.0)
}

impl FakeOpenAi {
    pub async fn start(b: Behavior) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let c2 = Arc::clone(&calls);
        let path = if b.whisper_cpp {
            "inference"
        } else {
            "transcriptions"
        };
        let route = warp::post()
            .and(warp::path::tail())
            .and(warp::header::optional::<String>("authorization"))
            .and(warp::multipart::form().max_length(50 * 1024 * 1024))
            .and_then(move |tail: warp::path::Tail, auth: Option<String>, form: warp::multipart::FormData| {
                let (b, calls, count) = (b.clone(), Arc::clone(&c2), Arc::clone(&count));
                let tail = tail.as_str().to_string();
                async move {
                    let parts: Vec<(String, Option<String>, Vec<u8>)> = form
                        .and_then(|mut p| async move {
                            let name = p.name().to_string();
                            let fname = p.filename().map(str::to_string);
                            let mut data = Vec::new();
                            while let Some(chunk) = p.data().await {
                                let mut c = chunk?;
                                while c.has_remaining() {
                                    let n = c.chunk().len();
                                    data.extend_from_slice(c.chunk());
                                    c.advance(n);
                                }
                            }
                            Ok((name, fname, data))
                        })
                        .try_collect()
                        .await
                        .map_err(|_| warp::reject())?;
                    let mut fields = HashMap::new();
                    let mut file: Option<(String, Vec<u8>)> = None;
                    for (name, fname, data) in parts {
                        if name == "file" {
                            file = Some((fname.unwrap_or_default(), data));
                        } else {
                            fields.insert(name, String::from_utf8_lossy(&data).into_owned());
                        }
                    }
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    let err = |status: u16, msg: &str| {
                        let body = if b.whisper_cpp {
                            json!({"error": msg})
                        } else {
                            json!({"error": {"message": msg, "type": "invalid_request_error", "param": null, "code": null}})
                        };
                        (status, body.to_string(), "application/json")
                    };
                    let mut sse: Option<Vec<String>> = None;
                    let (status, body, ctype) = if !tail.ends_with(path) {
                        err(404, "no such path")
                    } else if !b.whisper_cpp && auth.as_deref() != Some(&format!("Bearer {API_KEY}")) {
                        err(401, "Incorrect API key provided")
                    } else if let Some((k, st)) = b.fail_first.filter(|(k, _)| n < *k) {
                        let _ = k;
                        err(st, "injected failure")
                    } else if file.is_none() {
                        err(400, "no 'file' field in the request")
                    } else if !b.whisper_cpp && !fields.contains_key("model") {
                        err(400, "you must provide a model parameter")
                    } else {
                        let (text, segs, dur) = transcript_of(file.as_ref().map_or(&[][..], |f| &f.1[..]));
                        let stream = !b.whisper_cpp && fields.get("stream").map(String::as_str) == Some("true");
                        if stream {
                            // Two deltas then done, 300 ms apart, like a server decoding as it goes.
                            let mid = text.char_indices().nth(text.chars().count() / 2).map_or(text.len(), |(i, _)| i);
                            sse = Some(vec![
                                json!({"type": "transcript.text.delta", "delta": &text[..mid]}).to_string(),
                                json!({"type": "transcript.text.delta", "delta": &text[mid..]}).to_string(),
                                json!({"type": "transcript.text.done", "text": text}).to_string(),
                            ]);
                            (200, String::new(), "text/event-stream")
                        } else if fields.get("response_format").map(String::as_str) == Some("verbose_json") {
                            let segments: Vec<Value> = segs.iter().enumerate().map(|(i, s)| json!({"id": i, "start": s.0, "end": s.1, "text": format!(" {}", s.2)})).collect();
                            (200, json!({"task": "transcribe", "language": "chinese", "duration": dur, "text": text, "segments": segments}).to_string(), "application/json")
                        } else {
                            (200, json!({"text": text, "usage": {"type": "duration", "seconds": dur.ceil()}}).to_string(), "application/json")
                        }
                    };
                    let (fname, fbytes) = file.map_or((String::new(), 0), |(n, d)| (n, d.len()));
                    calls.lock().unwrap().push(Call { fields, file_name: fname, file_bytes: fbytes, status });
                    if let Some(events) = sse {
                        let stream = futures_util::stream::unfold(events.into_iter(), |mut it| async move {
                            let data = it.next()?;
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                            Some((Ok::<_, std::convert::Infallible>(warp::sse::Event::default().data(data)), it))
                        });
                        return Ok(warp::reply::Reply::into_response(warp::sse::reply(stream)));
                    }
                    Ok::<_, warp::Rejection>(warp::http::Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(warp::hyper::body::Bytes::from(body).into())
                        .unwrap())
                }
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Self {
            base_url: format!("http://{addr}"),
            calls,
        }
    }
}
