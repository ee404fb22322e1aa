//! Fake Tencent API 3.0 endpoint for `SentenceRecognition` (doc 1093/35646; shared/providers.md
//! §2.5): rebuilds the TC3-HMAC-SHA256 signature from the headers actually received, checks the
//! clock window, `DataLen` and the base64 size, and answers HTTP 200 with `Response.Result` or
//! `Response.Error`.

use base64::Engine as _;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use voxpoll::provider::tencent::sign::{tc3_sign, Tc3Request};
use warp::Filter;

use super::tencent::{SECRET_ID, SECRET_KEY};

#[derive(Default, Clone, Debug)]
pub struct Call {
    pub body: Value,
    pub error: Option<String>,
}

pub struct FakeTc3 {
    /// `http://127.0.0.1:PORT/`.
    pub url: String,
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl FakeTc3 {
    /// `inject`: an error code returned to every valid request (e.g. `RequestLimitExceeded`).
    pub async fn start(inject: Option<&'static str>) -> Self {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c2 = Arc::clone(&calls);
        let route = warp::post()
            .and(warp::path::end())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .map(move |h: warp::http::HeaderMap, body: bytes::Bytes| {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let (resp, err) = match check(&h, &body, &v, inject) {
                    Ok(r) => (json!({"Response": {"Result": r.0, "AudioDuration": r.1, "WordSize": 0, "WordList": null, "RequestId": "fake"}}), None),
                    Err((code, m)) => (json!({"Response": {"Error": {"Code": code, "Message": m}, "RequestId": "fake"}}), Some(code)),
                };
                c2.lock().unwrap().push(Call { body: v, error: err });
                warp::reply::json(&resp)
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(warp::serve(route).incoming(listener).run());
        Self {
            url: format!("http://{addr}/"),
            calls,
        }
    }
}

fn check(
    h: &warp::http::HeaderMap,
    body: &[u8],
    v: &Value,
    inject: Option<&'static str>,
) -> Result<(String, u64), (String, String)> {
    let get = |k: &str| {
        h.get(k)
            .and_then(|x| x.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let auth = get("authorization");
    let fail = |c: &str, m: &str| Err((c.to_string(), m.to_string()));
    let Some(rest) = auth.strip_prefix("TC3-HMAC-SHA256 Credential=") else {
        return fail("AuthFailure.SignatureFailure", "no TC3 Authorization");
    };
    let (cred, rest) = rest.split_once(", SignedHeaders=").unwrap_or(("", ""));
    let (signed, sig) = rest.split_once(", Signature=").unwrap_or(("", ""));
    let parts: Vec<&str> = cred.split('/').collect();
    if parts.len() != 4 || parts[0] != SECRET_ID || parts[2] != "asr" || parts[3] != "tc3_request" {
        return fail("AuthFailure.SecretIdNotFound", "bad credential scope");
    }
    if signed != "content-type;host" {
        return fail("AuthFailure.SignatureFailure", "unexpected SignedHeaders");
    }
    let ts: i64 = get("x-tc-timestamp").parse().unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - ts).abs() > 300 {
        return fail("AuthFailure.SignatureExpire", "timestamp too far from now");
    }
    let host = get("host");
    let (_, _, expected) = tc3_sign(
        SECRET_KEY,
        &Tc3Request {
            host: &host,
            content_type: &get("content-type"),
            payload: body,
            timestamp: ts,
            service: "asr",
        },
    );
    if expected != sig || parts[1] != voxpoll::provider::tencent::sign::utc_date(ts) {
        return fail(
            "AuthFailure.SignatureFailure",
            "The provided credentials could not be validated.",
        );
    }
    if get("x-tc-action") != "SentenceRecognition" || get("x-tc-version") != "2019-06-14" {
        return fail("InvalidAction", "unknown action");
    }
    if let Some(code) = inject {
        return fail(code, "injected");
    }
    if v["EngSerViceType"].as_str().is_none()
        || v["SourceType"] != 1
        || v["VoiceFormat"].as_str().is_none()
    {
        return fail("InvalidParameter.ErrorParamsMissing", "missing parameters");
    }
    let data = v["Data"].as_str().unwrap_or("");
    if data.len() > 3 * 1024 * 1024 {
        return fail(
            "InvalidParameterValue.ErrorVoicedataTooLong",
            "data too long",
        );
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| {
            (
                "InvalidParameter.FileEncode".to_string(),
                "bad base64".to_string(),
            )
        })?;
    if v["DataLen"].as_u64() != Some(raw.len() as u64) {
        return fail(
            "InvalidParameterValue.ErrorInvalidVoicedata",
            "DataLen mismatch",
        );
    }
    Ok((
        format!(
            "一句话{}:{}",
            v["VoiceFormat"].as_str().unwrap_or(""),
            raw.len()
        ),
        1234,
    ))
}
