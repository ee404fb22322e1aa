//! `POST /v1/audio/transcriptions` in the shape of OpenAI's Audio API ("Create transcription",
//! platform.openai.com/docs/api-reference/audio/createTranscription), so OpenAI SDKs and tools
//! can point their base URL at voxpoll. It runs the same one-shot recognition as
//! `POST /v1/recognize` (same limits, recorded in history).
//!
//! Multipart fields: `file` (required), `model`, `language` (ISO-639-1), `prompt` (its terms
//! become hot words), `response_format` (`json` | `text` | `verbose_json` | `srt` | `vtt`),
//! `temperature` (accepted, unused), `stream` (`true`: a `text/event-stream` of
//! `{"type":"transcript.text.delta","delta"}` events as finals arrive, then
//! `{"type":"transcript.text.done","text"}`, as OpenAI's "Stream transcription" section
//! defines them; deltas concatenate to the done text; a failure after the stream began is an
//! `{"type":"error","error":{"code","message"}}` event). `model` maps to a provider and engine
//! (see [`route_model`]).
//! Errors keep voxpoll's `{"error": {"code", "message"}}` and add OpenAI's `type` and `param`.

use super::{with_state, AppState};
use crate::error::ApiError;
use crate::oneshot::Recognized;
use crate::session::CreateOptions;
use bytes::Bytes;
use serde_json::json;
use std::fmt::Write as _;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Models that mean "the default provider" (OpenAI's own model names).
const OPENAI_MODELS: [&str; 3] = ["whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"];

pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let limit = super::BodyLimit {
        max: state.config.max_upload_bytes + 64 * 1024,
        code: "audio_too_large",
        name: "max_upload_bytes",
    };
    warp::path!("v1" / "audio" / "transcriptions")
        .and(warp::post())
        .and(super::caller(&state))
        .and(warp::header::optional::<String>("content-type"))
        .and(super::body(&state, limit))
        .and(with_state(state))
        .then(
            |user: Option<String>, ct: Option<String>, body: Bytes, state: AppState| async move {
                match transcribe(user, ct, body, state).await {
                    Ok(r) => r,
                    Err((e, param)) => openai_error(&e, param),
                }
            },
        )
}

/// The OpenAI form fields voxpoll reads beside the file.
#[derive(Debug, Default)]
struct Fields {
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    response_format: Option<String>,
    stream: Option<String>,
}

async fn transcribe(
    user: Option<String>,
    ct: Option<String>,
    body: Bytes,
    state: AppState,
) -> Result<Response, (ApiError, Option<&'static str>)> {
    let ct = ct.unwrap_or_default();
    if !ct.starts_with("multipart/form-data") {
        return Err((
            ApiError::bad_request(
                "invalid_multipart",
                "send multipart/form-data with the audio in the `file` field",
            ),
            Some("file"),
        ));
    }
    let fields = read_fields(&ct, body.clone())
        .await
        .map_err(|e| (e, None))?;
    let format = fields.response_format.as_deref().unwrap_or("json");
    if !["json", "text", "verbose_json", "srt", "vtt"].contains(&format) {
        return Err((
            ApiError::bad_request(
                "invalid_option",
                format!("response_format {format:?}: use json, text, verbose_json, srt or vtt"),
            ),
            Some("response_format"),
        ));
    }
    let (provider, engine) = route_model(fields.model.as_deref(), fields.language.as_deref())
        .map_err(|e| (e, Some("model")))?;
    let opts = CreateOptions {
        provider,
        engine,
        hotword_list: fields.prompt.as_deref().and_then(hotwords_from_prompt),
        ..CreateOptions::default()
    };
    let joiner = crate::session::sentence_joiner(&opts.engine());
    let upload = super::recognize::parse_upload(&state, opts, Some(&ct), body)
        .await
        .map_err(|e| (e, Some("file")))?;
    if fields.stream.as_deref() == Some("true") {
        return streamed(state, upload, user, joiner).await;
    }
    let r = state
        .recognizer
        .recognize(upload, user)
        .await
        .map_err(|e| {
            let e = ApiError::from(e);
            // The only options set here are the provider and engine `model` named.
            let param = (e.code() == "invalid_option").then_some("model");
            (e, param)
        })?;
    Ok(render(&r, format, fields.language.as_deref()))
}

/// `stream=true`: errors before the audio decoded and the provider stream opened are answered
/// as usual; from then on the answer is a `text/event-stream`.
async fn streamed(
    state: AppState,
    upload: crate::oneshot::Upload,
    user: Option<String>,
    joiner: &'static str,
) -> Result<Response, (ApiError, Option<&'static str>)> {
    use crate::oneshot::Progress;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let recognizer = state.recognizer.clone();
    let task = tokio::spawn(async move { recognizer.recognize_with(upload, user, Some(tx)).await });
    if rx.recv().await != Some(Progress::Started) {
        let e = match task.await {
            Ok(Err(e)) => ApiError::from(e),
            _ => ApiError::Internal(anyhow::anyhow!(
                "the recognition task ended without a result"
            )),
        };
        let param = (e.code() == "invalid_option").then_some("model");
        return Err((e, param));
    }
    let event = |v: serde_json::Value| {
        Ok::<_, std::convert::Infallible>(warp::sse::Event::default().data(v.to_string()))
    };
    let events = futures_util::stream::unfold(Some((rx, task, true)), move |st| async move {
        let (mut rx, task, first) = st?;
        match rx.recv().await {
            Some(Progress::Final(text)) => {
                let delta = if first {
                    text
                } else {
                    format!("{joiner}{text}")
                };
                let ev = event(json!({"type": "transcript.text.delta", "delta": delta}));
                Some((ev, Some((rx, task, false))))
            }
            Some(Progress::Started) => {
                Some((event(json!({"type": "ping"})), Some((rx, task, first))))
            }
            None => {
                let done = match task.await {
                    Ok(Ok(r)) => json!({"type": "transcript.text.done", "text": r.text}),
                    Ok(Err(e)) => {
                        let e = ApiError::from(e);
                        json!({"type": "error", "error": {"code": e.code(), "message": e.to_string()}})
                    }
                    Err(_) => {
                        json!({"type": "error", "error": {"code": "internal", "message": "the recognition task failed"}})
                    }
                };
                Some((event(done), None))
            }
        }
    });
    Ok(warp::sse::reply(events).into_response())
}

/// Reads the non-file fields of the form.
async fn read_fields(ct: &str, body: Bytes) -> Result<Fields, ApiError> {
    let bad = |e: multer::Error| {
        ApiError::bad_request(
            "invalid_multipart",
            format!("malformed multipart body: {e}"),
        )
    };
    let boundary = multer::parse_boundary(ct).map_err(bad)?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut f = Fields::default();
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let slot = match field.name().unwrap_or_default() {
            "model" => &mut f.model,
            "language" => &mut f.language,
            "prompt" => &mut f.prompt,
            "response_format" => &mut f.response_format,
            "stream" => &mut f.stream,
            _ => continue,
        };
        let text = field.text().await.map_err(bad)?;
        *slot = Some(text.trim().to_string()).filter(|t| !t.is_empty());
    }
    Ok(f)
}

/// Maps OpenAI's `model` (and `language`) to voxpoll's (provider, engine):
///
/// | `model` | provider | engine |
/// |---|---|---|
/// | absent, `whisper-1`, `gpt-4o-transcribe`, `gpt-4o-mini-transcribe` | the default | `16k_<language>`, else the default |
/// | `<provider>` (e.g. `tencent`) | that one | `16k_<language>`, else the default |
/// | `<provider>/<engine>` (e.g. `embedded/16k_en`) | that one | that one |
///
/// Unknown providers and engines are refused later by the same checks as sessions (400
/// `invalid_option`); a language that is not 2–3 ASCII letters is refused here.
fn route_model(
    model: Option<&str>,
    language: Option<&str>,
) -> Result<(Option<String>, Option<String>), ApiError> {
    let lang_engine = match language {
        None => None,
        Some(l) if (2..=3).contains(&l.len()) && l.chars().all(|c| c.is_ascii_alphabetic()) => {
            Some(format!("16k_{}", l.to_ascii_lowercase()))
        }
        Some(l) => {
            let short: String = l.chars().take(16).collect();
            return Err(ApiError::bad_request(
                "invalid_option",
                format!("language {short:?} is not an ISO-639-1 code (zh, en, ja, ...)"),
            ));
        }
    };
    Ok(match model {
        None => (None, lang_engine),
        Some(m) if OPENAI_MODELS.contains(&m) => (None, lang_engine),
        Some(m) => match m.split_once('/') {
            Some((p, e)) => (Some(p.to_string()), Some(e.to_string())),
            None => (Some(m.to_string()), lang_engine),
        },
    })
}

/// Hot words from a free-text prompt: its terms (split on commas, spaces and CJK list marks),
/// 1–30 characters, weight 10, at most 128.
fn hotwords_from_prompt(prompt: &str) -> Option<String> {
    let terms: Vec<String> = prompt
        .split(|c: char| c.is_whitespace() || ",，、;；:：".contains(c))
        .map(|t| t.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|t| (1..=30).contains(&t.chars().count()) && !t.contains('|'))
        .take(128)
        .map(|t| format!("{t}|10"))
        .collect();
    (!terms.is_empty()).then(|| terms.join(","))
}

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (WebVTT).
fn timestamp(ms: u64, sep: char) -> String {
    let (h, m, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{h:02}:{m:02}:{s:02}{sep}{milli:03}")
}

/// The answer in the requested `response_format`.
fn render(r: &Recognized, format: &str, language: Option<&str>) -> Response {
    let plain = |text: String, ct: &'static str| {
        warp::reply::with_header(text, "content-type", ct).into_response()
    };
    let spoken = r.sentences.iter().filter(|s| !s.text.is_empty());
    match format {
        "text" => plain(format!("{}\n", r.text), "text/plain; charset=utf-8"),
        "srt" => {
            let mut out = String::new();
            for (i, s) in spoken.enumerate() {
                let (a, b) = (timestamp(s.start_ms, ','), timestamp(s.end_ms, ','));
                let _ = write!(out, "{}\n{a} --> {b}\n{}\n\n", i + 1, s.text);
            }
            plain(out, "application/x-subrip; charset=utf-8")
        }
        "vtt" => {
            let mut out = String::from("WEBVTT\n\n");
            for s in spoken {
                let (a, b) = (timestamp(s.start_ms, '.'), timestamp(s.end_ms, '.'));
                let _ = write!(out, "{a} --> {b}\n{}\n\n", s.text);
            }
            plain(out, "text/vtt; charset=utf-8")
        }
        "verbose_json" => {
            let segments: Vec<_> = spoken
                .enumerate()
                .map(|(i, s)| {
                    json!({
                        "id": i,
                        "start": s.start_ms as f64 / 1000.0,
                        "end": s.end_ms as f64 / 1000.0,
                        "text": s.text,
                    })
                })
                .collect();
            let language = language.map_or_else(
                || r.engine.split_once('_').map_or("", |(_, l)| l).to_string(),
                str::to_string,
            );
            warp::reply::json(&json!({
                "task": "transcribe",
                "language": language,
                "duration": r.duration_ms as f64 / 1000.0,
                "text": r.text,
                "segments": segments,
                "id": r.id,
            }))
            .into_response()
        }
        _ => warp::reply::json(&json!({ "text": r.text })).into_response(),
    }
}

/// voxpoll's error body plus OpenAI's `type` and `param` (OpenAI SDKs read `error.message`).
fn openai_error(e: &ApiError, param: Option<&str>) -> Response {
    let status = e.status();
    let kind = match status {
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
        s if s.is_server_error() => "server_error",
        _ => "invalid_request_error",
    };
    let body = json!({ "error": {
        "code": e.code(),
        "message": e.to_string(),
        "type": kind,
        "param": param,
    }});
    e.reply_with(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_map_to_providers_and_engines() {
        let r = |m, l| route_model(m, l).unwrap();
        assert_eq!(r(None, None), (None, None));
        assert_eq!(
            r(Some("whisper-1"), Some("en")),
            (None, Some("16k_en".into()))
        );
        assert_eq!(
            r(Some("tencent"), Some("ZH")),
            (Some("tencent".into()), Some("16k_zh".into()))
        );
        assert_eq!(
            r(Some("embedded/16k_en"), Some("zh")),
            (Some("embedded".into()), Some("16k_en".into()))
        );
        assert!(route_model(None, Some("english!")).is_err());
    }

    #[test]
    fn prompt_terms_become_hot_words() {
        assert_eq!(
            hotwords_from_prompt("Vocabulary: Dashwood, Norland 腾讯云、小程序").as_deref(),
            Some("Vocabulary|10,Dashwood|10,Norland|10,腾讯云|10,小程序|10")
        );
        assert_eq!(hotwords_from_prompt(" , "), None);
        let list = hotwords_from_prompt(&"a ".repeat(500)).unwrap();
        crate::session::check_hotwords(&list).unwrap();
    }

    #[test]
    fn subtitle_timestamps() {
        assert_eq!(timestamp(3_723_045, ','), "01:02:03,045");
        assert_eq!(timestamp(999, '.'), "00:00:00.999");
    }
}
