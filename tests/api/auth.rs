//! Caller authentication (JWT HS256/RS256, API keys), ownership of sessions and history, the
//! per-user session limit and the CORS allow-list.

use crate::helpers::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "test-hs256-secret-of-enough-length";
const ALICE_KEY: &str = "alice-key-0123456789abcdef";

fn now() -> i64 {
    voxpoll::clock::now_s() as i64
}

fn hs256(claims: Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

fn valid(sub: &str) -> String {
    hs256(
        json!({"sub": sub, "exp": now() + 600, "aud": "voxpoll"}),
        SECRET,
    )
}

async fn app_with_auth(tweak: impl FnOnce(&mut voxpoll::config::Config)) -> TestApp {
    spawn_app_with(|c| {
        c.jwt_hs256_secret = Some(SECRET.parse().expect("secret"));
        c.jwt_audience = Some("voxpoll".into());
        c.jwt_leeway_s = 60;
        c.api_keys = Some(format!("alice:{ALICE_KEY}").parse().expect("keys"));
        tweak(c);
    })
    .await
}

/// POST /v1/sessions with a bearer token; (status, body).
async fn create_as(
    app: &TestApp,
    bearer: Option<&str>,
    api_key: Option<&str>,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .json(&json!({"provider": "echo"}));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(k) = api_key {
        req = req.header("x-api-key", k);
    }
    let r = req.send().await.expect("post");
    let st = r.status();
    (st, r.json().await.unwrap_or(Value::Null))
}

async fn get_as(app: &TestApp, path: &str, bearer: &str) -> (StatusCode, Value) {
    let r = app
        .http
        .get(format!("{}{path}", app.url))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("get");
    let st = r.status();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_bad_credential_is_a_401_with_its_reason() {
    let app = app_with_auth(|_| {}).await;
    let other_secret = hs256(
        json!({"sub": "mallory", "exp": now() + 600, "aud": "voxpoll"}),
        "another-secret-entirely",
    );
    let none_alg = {
        // {"alg":"none"} header, a valid-looking payload, no signature.
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b.encode(format!(
                r#"{{"sub":"mallory","exp":{},"aud":"voxpoll"}}"#,
                now() + 600
            ))
        )
    };
    // (what, bearer token, API key, expected code, the message names)
    type Case<'a> = (&'a str, Option<String>, Option<&'a str>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("no credentials", None, None, "missing_credentials", ""),
        (
            "expired beyond the leeway",
            Some(hs256(
                json!({"sub": "a", "exp": now() - 120, "aud": "voxpoll"}),
                SECRET,
            )),
            None,
            "invalid_token",
            "expired",
        ),
        (
            "not valid yet",
            Some(hs256(
                json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300, "aud": "voxpoll"}),
                SECRET,
            )),
            None,
            "invalid_token",
            "nbf",
        ),
        (
            "wrong audience",
            Some(hs256(
                json!({"sub": "a", "exp": now() + 600, "aud": "elsewhere"}),
                SECRET,
            )),
            None,
            "invalid_token",
            "aud",
        ),
        (
            "no exp",
            Some(hs256(json!({"sub": "a", "aud": "voxpoll"}), SECRET)),
            None,
            "invalid_token",
            "exp",
        ),
        (
            "forged (another key)",
            Some(other_secret),
            None,
            "invalid_token",
            "signature",
        ),
        ("alg none", Some(none_alg), None, "invalid_token", ""),
        (
            "garbage",
            Some("not.a.jwt".into()),
            None,
            "invalid_token",
            "malformed",
        ),
        (
            "unknown API key",
            None,
            Some("mallory-key-0123456789"),
            "invalid_api_key",
            "",
        ),
    ];
    for (what, bearer, key, code, says) in cases {
        let (st, body) = create_as(&app, bearer.as_deref(), key).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or("")
                .contains(says),
            "{what}: {body}"
        );
    }
    // Inside the leeway: 30 s past exp still passes with 60 s of skew allowed.
    let (st, body) = create_as(
        &app,
        Some(&hs256(
            json!({"sub": "a", "exp": now() - 30, "aud": "voxpoll"}),
            SECRET,
        )),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    // The server stays healthy.
    let (st, _) = app.get_path("/health").await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn history_and_sessions_belong_to_their_user() {
    let app = app_with_auth(|_| {}).await;
    let (alice, bob) = (valid("alice"), valid("bob"));
    let (st, created) = create_as(&app, Some(&alice), None).await;
    assert_eq!(st, StatusCode::CREATED);
    let s = TestSession {
        id: created["session_id"].as_str().expect("id").into(),
        token: created["session_token"].as_str().expect("token").into(),
        created,
    };
    app.upload(&s, "seq=0&last=1", vec![0u8; 640]).await;
    app.collect_until_end(&s, Duration::from_secs(10)).await;

    let (st, mine) = get_as(&app, "/v1/history", &alice).await;
    assert_eq!(st, 200);
    assert_eq!(mine["items"].as_array().expect("items").len(), 1);
    // The API key authenticates as the same user.
    let r = app
        .http
        .get(format!("{}/v1/history", app.url))
        .header("x-api-key", ALICE_KEY)
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.json::<Value>().await.expect("json")["items"]
            .as_array()
            .expect("items")
            .len(),
        1
    );

    let (st, theirs) = get_as(&app, "/v1/history", &bob).await;
    assert_eq!(st, 200);
    assert_eq!(
        theirs["items"],
        json!([]),
        "bob sees none of alice's entries"
    );
    let (st, body) = get_as(&app, &format!("/v1/history/{}", s.id), &bob).await;
    assert_eq!(
        (st, body["error"]["code"].clone()),
        (StatusCode::NOT_FOUND, json!("history_not_found"))
    );
    let r = app
        .http
        .delete(format!("{}/v1/history/{}", app.url, s.id))
        .bearer_auth(&bob)
        .send()
        .await
        .expect("delete");
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "bob cannot delete alice's entry"
    );
    let (st, _) = get_as(&app, &format!("/v1/history/{}", s.id), &alice).await;
    assert_eq!(st, 200, "still there for alice");

    // A session's calls need that session's own token: bob's JWT opens nothing.
    let r = app
        .http
        .get(format!("{}/v1/sessions/{}", app.url, s.id))
        .bearer_auth(&bob)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (st2, other) = create_as(&app, Some(&bob), None).await;
    assert_eq!(st2, StatusCode::CREATED);
    let r = app
        .http
        .get(format!("{}/v1/sessions/{}", app.url, s.id))
        .header(
            "x-session-token",
            other["session_token"].as_str().expect("token"),
        )
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "bob's session token on alice's session"
    );
}

#[tokio::test]
async fn rs256_tokens_verify_with_the_public_key() {
    let dir = tempfile::tempdir().expect("dir");
    let key = |name: &str| {
        let private = dir.path().join(format!("{name}.pem"));
        let public = dir.path().join(format!("{name}.pub.pem"));
        let ok = std::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&private)
            .arg("2048")
            .output()
            .expect("openssl")
            .status
            .success()
            && std::process::Command::new("openssl")
                .args(["rsa", "-pubout", "-in"])
                .arg(&private)
                .arg("-out")
                .arg(&public)
                .output()
                .expect("openssl")
                .status
                .success();
        assert!(ok, "openssl key generation");
        (std::fs::read(private).expect("pem"), public)
    };
    let (good_private, good_public) = key("good");
    let (bad_private, _) = key("bad");
    let app = spawn_app_with(|c| c.jwt_rs256_public_key = Some(good_public)).await;
    let sign = |pem: &[u8]| {
        encode(
            &Header::new(Algorithm::RS256),
            &json!({"sub": "carol", "exp": now() + 600}),
            &EncodingKey::from_rsa_pem(pem).expect("key"),
        )
        .expect("sign")
    };
    let (st, body) = create_as(&app, Some(&sign(&good_private)), None).await;
    assert_eq!(st, StatusCode::CREATED, "{body}");
    let (st, body) = create_as(&app, Some(&sign(&bad_private)), None).await;
    assert_eq!(
        (st, body["error"]["code"].clone()),
        (StatusCode::UNAUTHORIZED, json!("invalid_token"))
    );
    // An HS256 token is not accepted where only RS256 is configured (no algorithm confusion).
    let (st, _) = create_as(&app, Some(&valid("carol")), None).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn each_user_has_a_session_budget() {
    let app = app_with_auth(|c| c.max_sessions_per_user = 2).await;
    let alice = valid("alice");
    for _ in 0..2 {
        assert_eq!(
            create_as(&app, Some(&alice), None).await.0,
            StatusCode::CREATED
        );
    }
    let r = app
        .http
        .post(format!("{}/v1/sessions", app.url))
        .bearer_auth(&alice)
        .json(&json!({"provider": "echo"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "too_many_sessions"
    );
    assert_eq!(
        create_as(&app, Some(&valid("bob")), None).await.0,
        StatusCode::CREATED,
        "bob has his own budget"
    );
}

#[tokio::test]
async fn cors_allow_list_for_h5_pages() {
    let app = spawn_app_with(|c| c.cors_origins = vec!["https://h5.example.com".into()]).await;
    let r = app
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/sessions", app.url))
        .header("origin", "https://h5.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, x-session-token",
        )
        .send()
        .await
        .expect("preflight");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://h5.example.com"
    );
    let r = app
        .http
        .get(format!("{}/health", app.url))
        .header("origin", "https://evil.example")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        r.json::<Value>().await.expect("json")["error"]["code"],
        "cors_forbidden"
    );
    let r = app
        .http
        .get(format!("{}/health", app.url))
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        200,
        "no Origin (mini-programs, servers): not a CORS request"
    );
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn secrets_are_redacted_and_bad_key_lists_refused() {
    let mut c = voxpoll::config::Config::loopback("x.db".into());
    c.jwt_hs256_secret = Some(SECRET.parse().expect("secret"));
    c.api_keys = Some(format!("alice:{ALICE_KEY}").parse().expect("keys"));
    let debug = format!("{c:?}");
    assert!(
        !debug.contains(SECRET) && !debug.contains(ALICE_KEY),
        "{debug}"
    );
    let short = voxpoll::auth::Authenticator::new(&voxpoll::auth::AuthSettings {
        api_keys: Some("alice:short".parse().expect("keys")),
        ..Default::default()
    });
    assert!(
        short.is_err(),
        "keys under 16 characters are refused at start"
    );
    let leeway = voxpoll::auth::Authenticator::new(&voxpoll::auth::AuthSettings {
        jwt_leeway_s: 301,
        ..Default::default()
    });
    assert!(leeway.is_err());
}
