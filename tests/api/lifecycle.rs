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

#[tokio::test]
async fn sessions_left_open_by_a_killed_process_are_recorded_as_failed_at_start() {
    use voxpoll::store::{SessionRecord, SessionStore, StoredEvent};
    // What a kill -9 leaves behind: an `open` row with one persisted final.
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("crashed.db");
    let token = "a-token-from-before-the-crash";
    let id = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab";
    {
        let db = voxpoll::store::sqlite::Db::open(&db_path).await.unwrap();
        let token_sha256 = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        };
        let rec = SessionRecord {
            id: id.into(),
            user_id: None,
            token_sha256,
            provider: "embedded".into(),
            engine: "16k_en".into(),
            options_json: "{}".into(),
            status: "open".into(),
            epoch: 1,
            acked_seq: Some(4),
            audio_ms: 1000,
            transcript: "hello".into(),
            end_reason: None,
            created_at_ms: 1,
            updated_at_ms: 1,
            ended_at_ms: None,
        };
        db.insert_session(&rec).await.unwrap();
        let fin = json!({"seq": 1, "type": "final", "sentence": 0, "text": "hello", "start_ms": 0, "end_ms": 900});
        db.append_event(
            id,
            &StoredEvent {
                seq: 1,
                json: fin.to_string(),
            },
        )
        .await
        .unwrap();
    }
    let app = spawn_app_with(|c| c.db = db_path.clone()).await;
    let s = TestSession {
        id: id.into(),
        token: token.into(),
        created: Value::Null,
    };
    let (st, info) = app.get(&s).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(info["status"], "failed");
    assert_eq!(info["transcript"], "hello");
    let events = app.collect_until_end(&s, Duration::from_secs(5)).await;
    let kinds: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![(1, "final".into()), (2, "error".into()), (3, "end".into())]
    );
    assert_eq!(events[1]["code"], "server_restarted");
    assert_eq!(events[2]["transcript"], "hello");
}
