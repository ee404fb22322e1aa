//! Tencent one-sentence recognition (`SentenceRecognition`, API 3.0, version 2019-06-14;
//! doc 1093/35646, shared/providers.md §2): one signed JSON POST with the audio inline as
//! base64. Limits from the doc: ≤ 60 s of audio, ≤ 3 MB of base64 `Data`.

use super::sign::{tc3_authorization, Tc3Request};
use super::TencentCredentials;
use crate::provider::{OneShotAudio, ProviderError, Recognition, StreamOptions, Word};
use base64::Engine as _;
use serde::Deserialize;

/// Longest audio the API takes, ms.
pub const MAX_AUDIO_MS: u64 = 60_000;
/// Largest base64 `Data`, bytes.
pub const MAX_DATA_B64: usize = 3 * 1024 * 1024;

const CONTENT_TYPE: &str = "application/json; charset=utf-8";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Envelope {
    response: ResponseBody,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ResponseBody {
    error: Option<ApiErrorBody>,
    #[serde(default)]
    result: String,
    #[serde(default)]
    audio_duration: Option<u64>,
    #[serde(default)]
    word_list: Option<Vec<WordBody>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ApiErrorBody {
    code: String,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WordBody {
    word: String,
    start_time: u64,
    end_time: u64,
}

/// Maps a TC3 error code (`AuthFailure.SignatureFailure`, …) to voxpoll's code.
pub fn error_code(code: &str) -> &'static str {
    let head = code.split('.').next().unwrap_or(code);
    match head {
        "AuthFailure" => "provider_auth_failed",
        "RequestLimitExceeded" | "LimitExceeded" => "provider_busy",
        "InvalidParameter" | "InvalidParameterValue" | "MissingParameter" | "UnknownParameter" => {
            "provider_invalid_parameter"
        }
        "InternalError" => "provider_unavailable",
        _ => "provider_error",
    }
}

/// The `VoiceFormat` to send and the bytes: the upload itself when Tencent decodes its codec and
/// it is mono at the engine's rate, else 16-bit PCM at that rate.
fn payload(audio: &OneShotAudio, rate: u32) -> Result<(String, Vec<u8>), ProviderError> {
    if let Some(orig) = &audio.original {
        let takes = matches!(orig.format.as_str(), "wav" | "mp3" | "m4a" | "aac");
        if takes && orig.rate == rate && orig.channels == 1 {
            return Ok((orig.format.clone(), orig.bytes.to_vec()));
        }
    }
    let mut conv = crate::audio::RateConverter::new(crate::audio::TARGET_RATE, rate)
        .map_err(|e| ProviderError::AudioRejected(e.0))?;
    let mut pcm = conv.process(&audio.pcm);
    pcm.extend(conv.flush());
    Ok(("pcm".into(), crate::audio::le_bytes(pcm.into_iter())))
}

/// Recognises `audio` with one `SentenceRecognition` call to `api_url`.
///
/// # Errors
/// [`ProviderError::AudioRejected`] past the API's limits, [`ProviderError::Upstream`] for
/// transport failures and `Response.Error` answers (their `Code` kept).
pub async fn recognize(
    http: &reqwest::Client,
    api_url: &str,
    creds: &TencentCredentials,
    audio: &OneShotAudio,
    opts: &StreamOptions,
) -> Result<Vec<Recognition>, ProviderError> {
    let rate = super::realtime::engine_rate(&opts.engine)?;
    if audio.duration_ms() > MAX_AUDIO_MS {
        return Err(ProviderError::AudioRejected(format!(
            "Tencent one-sentence recognition takes at most {MAX_AUDIO_MS} ms of audio; this is {} ms (use a session)",
            audio.duration_ms()
        )));
    }
    let (format, bytes) = payload(audio, rate)?;
    let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
    if data.len() > MAX_DATA_B64 {
        return Err(ProviderError::AudioRejected(format!(
            "the audio is {} bytes as base64; Tencent one-sentence recognition takes at most {MAX_DATA_B64}",
            data.len()
        )));
    }
    let mut body = serde_json::json!({
        "EngSerViceType": opts.engine,
        "SourceType": 1,
        "VoiceFormat": format,
        "Data": data,
        "DataLen": bytes.len(),
    });
    for (k, v) in [
        ("WordInfo", opts.word_info),
        ("FilterDirty", opts.filter_dirty),
        ("FilterModal", opts.filter_modal),
        ("FilterPunc", opts.filter_punc),
        ("ConvertNumMode", opts.convert_num_mode),
    ] {
        if let Some(v) = v {
            body[k] = v.into();
        }
    }
    if let Some(h) = &opts.hotword_list {
        body["HotwordList"] = h.clone().into();
    }
    let payload = serde_json::to_vec(&body).map_err(|e| upstream("provider_error", e))?;
    let url = reqwest::Url::parse(api_url).map_err(|e| upstream("provider_error", e))?;
    let host = match (url.host_str(), url.port()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        (None, _) => return Err(upstream("provider_error", "api_url has no host")),
    };
    let service = url
        .host_str()
        .and_then(|h| h.split('.').next())
        .filter(|s| s.chars().all(|c| c.is_ascii_alphabetic()))
        .unwrap_or("asr");
    let ts = crate::clock::now_s() as i64;
    let auth = tc3_authorization(
        &creds.secret_id,
        creds.secret_key.expose(),
        &Tc3Request {
            host: &host,
            content_type: CONTENT_TYPE,
            payload: &payload,
            timestamp: ts,
            service,
        },
    );
    let mut req = http
        .post(url)
        .header("Host", &host)
        .header("Content-Type", CONTENT_TYPE)
        .header("Authorization", auth)
        .header("X-TC-Action", "SentenceRecognition")
        .header("X-TC-Version", "2019-06-14")
        .header("X-TC-Timestamp", ts.to_string())
        .body(payload);
    if let Some(token) = &creds.token {
        req = req.header("X-TC-Token", token.expose());
    }
    let resp = req
        .send()
        .await
        .map_err(|e| upstream("provider_unavailable", e))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(upstream(
            "provider_unavailable",
            format!("Tencent API answered HTTP {status}"),
        ));
    }
    let env: Envelope = resp
        .json()
        .await
        .map_err(|e| upstream("provider_error", format!("unparseable Tencent answer: {e}")))?;
    let r = env.response;
    if let Some(err) = r.error {
        return Err(ProviderError::Upstream {
            code: error_code(&err.code).into(),
            provider_code: Some(err.code),
            message: err.message,
        });
    }
    if r.result.is_empty() {
        return Ok(Vec::new());
    }
    Ok(vec![Recognition {
        sentence: 0,
        text: r.result,
        start_ms: 0,
        end_ms: r.audio_duration.unwrap_or_else(|| audio.duration_ms()),
        words: r.word_list.filter(|w| !w.is_empty()).map(|ws| {
            ws.into_iter()
                .map(|w| Word {
                    word: w.word,
                    start_ms: w.start_time,
                    end_ms: w.end_time,
                })
                .collect()
        }),
    }])
}

fn upstream(code: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Upstream {
        code: code.into(),
        provider_code: None,
        message: e.to_string(),
    }
}
