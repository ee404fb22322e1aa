//! `openapi.yaml` against the server: the document lists exactly the routes the code has
//! (path templates read from every `warp::path!` in `src/http/`), each documented method is
//! served and no undocumented one is, and `GET /openapi.yaml` serves the file.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// `{path template → methods}` of the document (its `paths:` block), params as `{}`.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(root().join("openapi.yaml")).unwrap();
    let paths = text
        .split("\npaths:\n")
        .nth(1)
        .unwrap()
        .split("\ncomponents:")
        .next()
        .unwrap();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut current = None;
    for line in paths.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            let key = normalise(&format!("/{p}"));
            out.entry(key.clone()).or_default();
            current = Some(key);
        } else if let Some(m) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':')) {
            if ["get", "post", "delete", "put", "patch"].contains(&m) {
                out.get_mut(current.as_ref().unwrap())
                    .unwrap()
                    .insert(m.to_uppercase());
            }
        }
    }
    out
}

fn normalise(template: &str) -> String {
    template
        .split('/')
        .map(|s| if s.starts_with('{') { "{}" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// Path templates of every `warp::path!(…)` and `warp::path::end()` in `src/http/*.rs`.
fn in_code() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("src/http")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for part in src.split("warp::path!(").skip(1) {
            let args = part.split(')').next().unwrap();
            let segs: Vec<String> = args
                .split('/')
                .map(|s| s.trim())
                .map(
                    |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                        Some(lit) => lit.to_string(),
                        None => "{}".to_string(), // String, u64: a parameter
                    },
                )
                .collect();
            out.insert(format!("/{}", segs.join("/")));
        }
        if src.contains("warp::path::end()") {
            out.insert("/".into());
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes_in_the_code() {
    let doc: BTreeSet<String> = documented().into_keys().collect();
    let code = in_code();
    let missing: Vec<_> = code.difference(&doc).collect();
    let extra: Vec<_> = doc.difference(&code).collect();
    assert!(missing.is_empty(), "routes the document lacks: {missing:?}");
    assert!(
        extra.is_empty(),
        "documented routes the code lacks: {extra:?}"
    );
    assert!(doc.len() >= 20, "{doc:?}");
}

/// Whether the server routes `method path` (anything but 404 `not_found` / 405).
async fn routed(app: &TestApp, method: &str, path: &str) -> bool {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = app
        .http
        .request(m, format!("{}{path}", app.url))
        .header("content-type", "application/json")
        .body(if method == "GET" { "" } else { "{}" })
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    !(status == StatusCode::METHOD_NOT_ALLOWED
        || (status == StatusCode::NOT_FOUND && body["error"]["code"] == "not_found"))
}

#[tokio::test]
async fn every_documented_method_is_served_and_no_other() {
    let app = spawn_app().await;
    let session = app.create(serde_json::json!({"provider": "echo"})).await;
    for (template, methods) in documented() {
        let path = template
            .replacen(
                "/v1/sessions/{}",
                &format!("/v1/sessions/{}", session.id),
                1,
            )
            .replace("/ui/{}", "/ui/app.js")
            .replace("{}", "some-id");
        for m in ["GET", "POST", "DELETE"] {
            let served = routed(&app, m, &path).await;
            assert_eq!(served, methods.contains(m), "{m} {template} ({path})");
        }
    }
}

#[tokio::test]
async fn the_document_is_served() {
    let app = spawn_app().await;
    let r = app
        .http
        .get(format!("{}/openapi.yaml", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/yaml");
    let served = r.text().await.unwrap();
    assert_eq!(
        served,
        std::fs::read_to_string(root().join("openapi.yaml")).unwrap()
    );
    assert!(served.starts_with("openapi: 3.1.0"));
}
