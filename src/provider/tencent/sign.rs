//! Tencent Cloud request signing, both schemes voxpoll needs:
//!
//! - the real-time ASR handshake URL: HMAC-SHA1 over the sorted, *decoded* query, Base64
//!   (doc 1093/48982 "签名生成"; shared/providers.md §1.3);
//! - API 3.0 `TC3-HMAC-SHA256` for `SentenceRecognition` (doc 1093/35646 and the "Signature v3"
//!   page; shared/providers.md §2.4).
//!
//! Pure functions with the documented worked examples as unit tests.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Characters left unescaped in URL values: RFC 3986 unreserved, as Python's
/// `urllib.parse.quote(v, safe='')` (the Python SDK) does.
const VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes one query value (UTF-8, every reserved byte escaped, `+`→`%2B`).
pub fn encode_value(v: &str) -> String {
    utf8_percent_encode(v, VALUE).to_string()
}

/// The string the real-time handshake signs: `host_path + "?" + k=v&…` with keys sorted
/// byte-wise, raw (decoded) values, empty values dropped. `host_path` has no scheme, e.g.
/// `asr.cloud.tencent.com/asr/v2/1259228442`.
pub fn realtime_sign_string(host_path: &str, params: &BTreeMap<String, String>) -> String {
    let query = params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    format!("{host_path}?{query}")
}

/// Base64 of HMAC-SHA1(secret_key, sign_string): 28 characters.
pub fn realtime_signature(secret_key: &str, sign_string: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret_key.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(sign_string.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The full handshake URL: `scheme://host_path?k=urlencode(v)&…&signature=urlencode(sig)`.
pub fn realtime_url(
    scheme: &str,
    host_path: &str,
    params: &BTreeMap<String, String>,
    secret_key: &str,
) -> String {
    let signature = realtime_signature(secret_key, &realtime_sign_string(host_path, params));
    let mut query: Vec<String> = params
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", encode_value(v)))
        .collect();
    query.push(format!("signature={}", encode_value(&signature)));
    format!("{scheme}://{host_path}?{}", query.join("&"))
}

fn hmac256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// Inputs of one TC3-HMAC-SHA256 signature.
#[derive(Debug, Clone, Copy)]
pub struct Tc3Request<'a> {
    /// `Host` header exactly as sent (`asr.tencentcloudapi.com`, or `127.0.0.1:PORT` in tests).
    pub host: &'a str,
    /// `Content-Type` header exactly as sent.
    pub content_type: &'a str,
    /// Request body bytes exactly as sent.
    pub payload: &'a [u8],
    /// Unix seconds, also sent as `X-TC-Timestamp`.
    pub timestamp: i64,
    /// Service name: the first label of the API host (`asr`).
    pub service: &'a str,
}

/// `(CanonicalRequest, StringToSign, Signature)` for a POST to `/` signing `content-type;host`.
pub fn tc3_sign(secret_key: &str, req: &Tc3Request<'_>) -> (String, String, String) {
    let date = utc_date(req.timestamp);
    let canonical = format!(
        "POST\n/\n\ncontent-type:{}\nhost:{}\n\ncontent-type;host\n{}",
        req.content_type.trim().to_ascii_lowercase(),
        req.host.trim().to_ascii_lowercase(),
        hex::encode(Sha256::digest(req.payload))
    );
    let scope = format!("{date}/{}/tc3_request", req.service);
    let to_sign = format!(
        "TC3-HMAC-SHA256\n{}\n{scope}\n{}",
        req.timestamp,
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac256(format!("TC3{secret_key}").as_bytes(), date.as_bytes());
    let k_service = hmac256(&k_date, req.service.as_bytes());
    let k_signing = hmac256(&k_service, b"tc3_request");
    let signature = hex::encode(hmac256(&k_signing, to_sign.as_bytes()));
    (canonical, to_sign, signature)
}

/// The `Authorization` header value for [`tc3_sign`].
pub fn tc3_authorization(secret_id: &str, secret_key: &str, req: &Tc3Request<'_>) -> String {
    let (_, _, signature) = tc3_sign(secret_key, req);
    format!(
        "TC3-HMAC-SHA256 Credential={secret_id}/{}/{}/tc3_request, SignedHeaders=content-type;host, Signature={signature}",
        utc_date(req.timestamp),
        req.service
    )
}

/// `YYYY-MM-DD` of a Unix time in UTC (civil-from-days, H. Hinnant's algorithm).
pub fn utc_date(unix_s: i64) -> String {
    let days = unix_s.div_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    /// shared/providers.md §1.3, worked example 1 (the official doc's own example).
    #[test]
    fn realtime_official_example() {
        let p = params(&[
            ("engine_model_type", "16k_zh"),
            ("expired", "1592380492"),
            ("filter_dirty", "1"),
            ("filter_modal", "1"),
            ("filter_punc", "1"),
            ("needvad", "1"),
            ("nonce", "1592294092123"),
            ("secretid", "AKIDoQq1zhZMN8dv0psmvud6OUKuGPO7pu0r"),
            ("timestamp", "1592294092"),
            ("voice_format", "1"),
            ("voice_id", "RnKu9FODFHK5FPpsrN"),
        ]);
        let host_path = "asr.cloud.tencent.com/asr/v2/1259228442";
        let key = "kFpwoX5RYQ2SkqpeHgqmSzHK7h3A2fni";
        assert_eq!(
            realtime_signature(key, &realtime_sign_string(host_path, &p)),
            "HepdTRX6u155qIPKNKC+3U0j1N0="
        );
        assert_eq!(
            realtime_url("wss", host_path, &p, key),
            "wss://asr.cloud.tencent.com/asr/v2/1259228442?engine_model_type=16k_zh&expired=1592380492&filter_dirty=1&filter_modal=1&filter_punc=1&needvad=1&nonce=1592294092123&secretid=AKIDoQq1zhZMN8dv0psmvud6OUKuGPO7pu0r&timestamp=1592294092&voice_format=1&voice_id=RnKu9FODFHK5FPpsrN&signature=HepdTRX6u155qIPKNKC%2B3U0j1N0%3D"
        );
    }

    /// shared/providers.md §1.3, worked example 2 (non-ASCII hot words: signed raw, sent encoded).
    #[test]
    fn realtime_non_ascii_example() {
        let p = params(&[
            ("convert_num_mode", "1"),
            ("engine_model_type", "16k_zh"),
            ("expired", "1700086400"),
            ("filter_punc", "0"),
            ("hotword_list", "腾讯云|10,ASR|11"),
            ("needvad", "1"),
            ("nonce", "1700000000"),
            ("secretid", "AKIDEXAMPLE"),
            ("timestamp", "1700000000"),
            ("voice_format", "1"),
            ("voice_id", "c64385ee-3e5c-4fc5-bbfd-7c71addb35b0"),
            ("word_info", "1"),
        ]);
        let url = realtime_url(
            "wss",
            "asr.cloud.tencent.com/asr/v2/1259228442",
            &p,
            "kFpwoX5RYQ2SkqpeHgqmSzHK7h3A2fni",
        );
        assert_eq!(url, "wss://asr.cloud.tencent.com/asr/v2/1259228442?convert_num_mode=1&engine_model_type=16k_zh&expired=1700086400&filter_punc=0&hotword_list=%E8%85%BE%E8%AE%AF%E4%BA%91%7C10%2CASR%7C11&needvad=1&nonce=1700000000&secretid=AKIDEXAMPLE&timestamp=1700000000&voice_format=1&voice_id=c64385ee-3e5c-4fc5-bbfd-7c71addb35b0&word_info=1&signature=PbFnHWZcwSKkf9XBX1uWHiBK1Yg%3D");
    }

    /// shared/providers.md §2.4, official vector A (CVM example of the TC3 doc).
    #[test]
    fn tc3_official_vector() {
        let payload = br#"{"Limit": 1, "Filters": [{"Values": ["\u672a\u547d\u540d"], "Name": "instance-name"}]}"#;
        let req = Tc3Request {
            host: "cvm.tencentcloudapi.com",
            content_type: "application/json; charset=utf-8",
            payload,
            timestamp: 1_551_113_065,
            service: "cvm",
        };
        let (canonical, to_sign, sig) = tc3_sign("Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", &req);
        assert!(
            canonical.ends_with("35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064")
        );
        assert!(to_sign.ends_with(
            "2019-02-25/cvm/tc3_request\n5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
        ));
        assert_eq!(
            sig,
            "72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
        );
    }

    /// shared/providers.md §2.4, the computed ASR vector.
    #[test]
    fn tc3_asr_vector() {
        let req = Tc3Request {
            host: "asr.tencentcloudapi.com",
            content_type: "application/json; charset=utf-8",
            payload: br#"{"EngSerViceType":"16k_zh","SourceType":1,"VoiceFormat":"wav","Data":"UklGRg==","DataLen":4}"#,
            timestamp: 1_700_000_000,
            service: "asr",
        };
        assert_eq!(
            tc3_authorization("AKIDEXAMPLE", "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE", &req),
            "TC3-HMAC-SHA256 Credential=AKIDEXAMPLE/2023-11-14/asr/tc3_request, SignedHeaders=content-type;host, Signature=d97fc9220159f2e950f1522a450781b35836f07fc74a3dc0a75d694b2fab554e"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(1_551_113_065), "2019-02-25");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14");
    }
}
