//! Restart and shutdown behaviour with the real server and database file.

use crate::helpers::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_restart_keeps_finished_transcripts() {
    let app = spawn_app().await;
    let s = app
        .create(json!({"provider": "echo", "engine": "16k_en"}))
        .await;
    app.upload(&s, "seq=0", vec![0; 20]).await;
    app.upload(&s, "seq=1&last=1", vec![0; 40]).await;
    let before = app.collect_until_end(&s, Duration::from_secs(10)).await;
    let (_, info_before) = app.get(&s).await;
    assert_eq!(info_before["transcript"], "10 samples 20 samples");

    let app = app.restart().await;
    let (st, info) = app.get(&s).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(info["status"], "finished");
    assert_eq!(info["transcript"], info_before["transcript"]);
    assert_eq!(info["sentences"], info_before["sentences"]);
    // Events are served from the database: finals and the end event, same seqs and content.
    let after = app.collect_until_end(&s, Duration::from_secs(5)).await;
    let finals = |v: &[Value]| {
        v.iter()
            .filter(|e| e["type"] != "partial")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(finals(&after), finals(&before));
    // And the token is still required.
    let r = app
        .http
        .get(format!("{}/v1/sessions/{}", app.url, s.id))
        .header("x-session-token", "nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn shutdown_releases_waiting_polls_and_records_open_sessions() {
    let mut app = spawn_app().await;
    let s = app.create(json!({"provider": "echo"})).await;
    app.upload(&s, "seq=0", vec![0; 20]).await;
    let (_, first) = app.poll(&s, 0, 5_000).await;
    let cursor = first["next_cursor"].as_u64().unwrap();
    let poll_started = Instant::now();
    let poll = app.poll_in_background(&s, cursor, 30_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    app.shutdown().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t.elapsed()
    );
    let (returned, status, _) = poll.await.unwrap();
    let held = returned.duration_since(poll_started);
    assert!(
        held < Duration::from_secs(5),
        "the waiting poll was released (held {held:?})"
    );
    assert_eq!(status, StatusCode::OK);

    let app = app.restart().await;
    let (_, info) = app.get(&s).await;
    assert_eq!(info["status"], "failed", "{info}");
    assert_eq!(
        info["transcript"], "10 samples",
        "results before shutdown are kept"
    );
    let events = app.collect_until_end(&s, Duration::from_secs(5)).await;
    assert!(
        events.iter().any(|e| e["code"] == "server_shutdown"),
        "{events:?}"
    );
}
