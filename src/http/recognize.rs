//! One-shot routes (shared/api.md, "One-shot recognition"): `POST /v1/recognize` (raw body or
//! multipart) and the seeds' `POST /api/realtime-voice/recognize` (multipart `audio`, answers in
//! the seeds' `{"code": 0, "message": "ok", "data": …}` envelope).

use super::{respond, with_state, AppState};
use crate::audio::file::{format_from_filename, format_from_name};
use crate::error::ApiError;
use crate::oneshot::Upload;
use crate::session::CreateOptions;
use bytes::Bytes;
use serde_json::json;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Multipart overhead allowed beyond `max_upload_bytes` (boundaries, option fields), bytes.
const FORM_OVERHEAD: u64 = 64 * 1024;

pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let limit = super::BodyLimit {
        max: state.config.max_upload_bytes + FORM_OVERHEAD,
        code: "audio_too_large",
        name: "max_upload_bytes",
    };
    // POST /v1/recognize[?engine=…&format=…]
    let v1 = warp::path!("v1" / "recognize")
        .and(warp::post())
        .and(super::caller(&state))
        .and(warp::query::<CreateOptions>())
        .and(warp::header::optional::<String>("content-type"))
        .and(super::body(&state, limit))
        .and(with_state(state.clone()))
        .then(recognize_v1)
        .map(respond);
    // POST /api/realtime-voice/recognize (multipart: audio, engineType, filterDirty, …)
    let seeds = warp::path!("api" / "realtime-voice" / "recognize")
        .and(warp::post())
        .and(super::caller(&state))
        .and(warp::header::optional::<String>("content-type"))
        .and(super::body(&state, limit))
        .and(with_state(state))
        .then(|user: Option<String>, ct: Option<String>, body: Bytes, state: AppState| async move {
            let r = async {
                if !ct.as_deref().is_some_and(|c| c.starts_with("multipart/form-data")) {
                    return Err(ApiError::UnsupportedAudio(
                        "send multipart/form-data with the file in the `audio` field (wx.uploadFile name: 'audio')".into(),
                    ));
                }
                let upload = parse_upload(&state, CreateOptions::default(), ct.as_deref(), body).await?;
                Ok(state.recognizer.recognize(upload, user).await?)
            }
            .await;
            match r {
                Ok(r) => warp::reply::json(&json!({ "code": 0, "message": "ok", "data": r }))
                    .into_response(),
                Err(e) => seeds_error(&e),
            }
        });
    v1.or(seeds).unify()
}

async fn recognize_v1(
    user: Option<String>,
    q: CreateOptions,
    ct: Option<String>,
    body: Bytes,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    let upload = parse_upload(&state, q, ct.as_deref(), body).await?;
    let recognized = state.recognizer.recognize(upload, user).await?;
    Ok(warp::reply::json(&recognized))
}

/// The seeds' failure envelope: the HTTP status kept, `code` = that status (non-zero),
/// `error` = voxpoll's machine code.
fn seeds_error(e: &ApiError) -> Response {
    let status = e.status();
    e.reply_with(&json!({ "code": status.as_u16(), "message": e.to_string(), "error": e.code() }))
}

/// Sets an option from a form field, under its API name or the seeds' camelCase name.
/// Returns false for unknown fields (ignored, like unknown query parameters).
fn set_option(o: &mut CreateOptions, name: &str, v: &str) -> Result<bool, ApiError> {
    fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<Option<T>, ApiError> {
        if v.trim().is_empty() {
            return Ok(None);
        }
        v.trim().parse().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_option",
                format!("{name}={v:?} is not a valid number"),
            )
        })
    }
    match name {
        "engine" | "engineType" | "engine_model_type" => o.engine = Some(v.to_string()),
        "format" | "voiceFormat" => o.format = Some(v.to_string()),
        "sample_rate" | "sampleRate" => o.sample_rate = num(name, v)?,
        "channels" => o.channels = num(name, v)?,
        "provider" => o.provider = Some(v.to_string()),
        "filter_dirty" | "filterDirty" => o.filter_dirty = num(name, v)?,
        "filter_modal" | "filterModal" => o.filter_modal = num(name, v)?,
        "filter_punc" | "filterPunc" => o.filter_punc = num(name, v)?,
        "convert_num_mode" | "convertNumMode" => o.convert_num_mode = num(name, v)?,
        "word_info" | "wordInfo" => o.word_info = num(name, v)?,
        "hotword_list" | "hotwordList" => o.hotword_list = Some(v.to_string()),
        "vad_silence_ms" => o.vad_silence_ms = num(name, v)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// Reads a raw or multipart upload into an [`Upload`].
pub(super) async fn parse_upload(
    state: &AppState,
    mut opts: CreateOptions,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Upload, ApiError> {
    let max = state.config.max_upload_bytes;
    let too_large = |n: u64| ApiError::TooLarge {
        code: "audio_too_large",
        message: format!("the audio is {n} bytes; the limit is {max} bytes (max_upload_bytes)"),
    };
    let ct = content_type.unwrap_or("application/octet-stream");
    if !ct.starts_with("multipart/form-data") {
        if body.len() as u64 > max {
            return Err(too_large(body.len() as u64));
        }
        let format = match opts.format.clone() {
            Some(f) => Some(f),
            None if ct.starts_with("application/octet-stream") => None,
            None => Some(
                format_from_name(ct)
                    .ok_or_else(|| {
                        ApiError::UnsupportedAudio(format!(
                            "Content-Type {ct:?} is not an audio type voxpoll decodes; use audio/wav, audio/mpeg, audio/aac, audio/mp4, audio/ogg, audio/flac, or ?format=pcm"
                        ))
                    })?
                    .to_string(),
            ),
        };
        return Ok(Upload {
            bytes: body,
            format,
            options: opts,
        });
    }
    let boundary = multer::parse_boundary(ct).map_err(|e| {
        ApiError::bad_request(
            "invalid_multipart",
            format!("bad multipart Content-Type: {e}"),
        )
    })?;
    let stream = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
    let mut form = multer::Multipart::new(stream, boundary);
    let mut audio: Option<(Bytes, Option<String>)> = None;
    let bad = |e: multer::Error| {
        ApiError::bad_request(
            "invalid_multipart",
            format!("malformed multipart body: {e}"),
        )
    };
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "audio" || name == "file" {
            let hint = field
                .file_name()
                .and_then(format_from_filename)
                .or_else(|| {
                    field
                        .content_type()
                        .and_then(|m| format_from_name(m.essence_str()))
                })
                .map(str::to_string);
            let data = field.bytes().await.map_err(bad)?;
            if data.len() as u64 > max {
                return Err(too_large(data.len() as u64));
            }
            audio = Some((data, hint));
        } else {
            let text = field.text().await.map_err(bad)?;
            set_option(&mut opts, &name, &text)?;
        }
    }
    let (bytes, hint) = audio.ok_or_else(|| {
        ApiError::bad_request("missing_audio", "the form has no `audio` (or `file`) field")
    })?;
    Ok(Upload {
        bytes,
        // An explicit format wins; else the file name / part type; else detect from the bytes.
        format: opts.format.clone().or(hint.filter(|h| h != "pcm")),
        options: opts,
    })
}
