//! History: sessions and one-shot recognitions listed per user, newest first, paged, read,
//! deleted, kept across restarts, and purged after the retention period.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::Duration;

async fn list(app: &TestApp, query: &str) -> (StatusCode, Value) {
    app.get_path(&format!("/v1/history{query}")).await
}

async fn one_shot(app: &TestApp) -> String {
    let pcm = pcm_bytes(&vec![0i16; 1600]);
    let (_, r) = app
        .recognize("?format=pcm&provider=echo", "application/octet-stream", pcm)
        .await;
    r["id"].as_str().expect("id").to_string()
}

#[tokio::test]
async fn sessions_and_recognitions_are_listed_paged_read_and_deleted() {
    listed_paged_read_and_deleted(&spawn_app().await).await;
}

/// The same history on the Redis engine replicas share (`--redis-url`).
#[tokio::test]
async fn the_redis_engine_keeps_the_same_history() {
    let redis = crate::store::RedisServer::start().await;
    let url = redis.url.clone();
    let app = spawn_app_with(|c| c.redis_url = Some(voxpoll::secret::Secret::new(url))).await;
    listed_paged_read_and_deleted(&app).await;
}

async fn listed_paged_read_and_deleted(app: &TestApp) {
    let s = app
        .create(json!({"provider": "echo", "engine": "16k_en"}))
        .await;
    let events = app.stream_pcm(&s, &vec![100i16; 3200], 100, false).await;
    assert_eq!(transcript(&events), "1600 samples 1600 samples");
    tokio::time::sleep(Duration::from_millis(5)).await;
    let rec = one_shot(app).await;

    let (st, page) = list(app, "").await;
    assert_eq!(st, StatusCode::OK, "{page}");
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0]["id"].as_str(), items[0]["kind"].as_str()),
        (Some(rec.as_str()), Some("recognition"))
    );
    assert_eq!(
        (items[1]["id"].as_str(), items[1]["kind"].as_str()),
        (Some(s.id.as_str()), Some("session"))
    );
    assert_eq!(items[1]["text"], "1600 samples 1600 samples");
    assert_eq!(items[1]["status"], "finished");
    assert_eq!(items[1]["provider"], "echo");
    assert_eq!(items[1]["duration_ms"], 200);

    // Paging: one per page, following next_before, sees both once.
    let (_, p1) = list(app, "?limit=1").await;
    let cursor = p1["next_before"].as_str().expect("cursor").to_string();
    let (_, p2) = list(app, &format!("?limit=1&before={cursor}")).await;
    assert_eq!(p1["items"][0]["id"].as_str(), Some(rec.as_str()));
    assert_eq!(p2["items"][0]["id"].as_str(), Some(s.id.as_str()));
    let (_, p3) = list(
        app,
        &format!("?limit=1&before={}", p2["next_before"].as_str().unwrap()),
    )
    .await;
    assert_eq!(p3["items"], json!([]));
    assert_eq!(p3["next_before"], Value::Null);
    for bad in ["?limit=0", "?limit=101", "?before=yesterday"] {
        let (st, body) = list(app, bad).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    // One entry with its sentences.
    let item: Value = app.get_path(&format!("/v1/history/{}", s.id)).await.1;
    let sentences = item["sentences"].as_array().unwrap();
    assert_eq!(sentences.len(), 2);
    assert_eq!(sentences[1]["start_ms"], 100);

    // Delete, then it is gone.
    let r = app
        .http
        .delete(format!("{}/v1/history/{}", app.url, s.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let (status, body) = app.get_path(&format!("/v1/history/{}", s.id)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "history_not_found");
    let r = app
        .http
        .delete(format!("{}/v1/history/{}", app.url, s.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let (_, page) = list(app, "").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);

    // An open session cannot be deleted from history.
    let open = app.create(json!({"provider": "echo"})).await;
    let r = app
        .http
        .delete(format!("{}/v1/history/{}", app.url, open.id))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn history_survives_a_restart() {
    let app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    app.stream_pcm(&s, &vec![100i16; 1600], 100, false).await;
    let rec = one_shot(&app).await;
    let app = app.restart().await;
    let (_, page) = list(&app, "").await;
    let ids: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, vec![rec.as_str(), s.id.as_str()]);
}

#[tokio::test]
async fn entries_past_retention_are_purged() {
    let app = spawn_app_with(|c| {
        c.history_retention_ms = 1_500;
        c.purge_interval_ms = 200;
    })
    .await;
    let rec = one_shot(&app).await;
    let (status, _) = app.get_path(&format!("/v1/history/{rec}")).await;
    assert_eq!(status, StatusCode::OK, "kept within retention");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (status, _) = app.get_path(&format!("/v1/history/{rec}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "purged after retention");
}
