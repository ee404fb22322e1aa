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
    app.until_polls_waiting(1).await;
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
async fn sessions_that_cannot_be_resumed_are_recorded_as_failed_at_start() {
    use voxpoll::store::{SessionRecord, SessionStore, StoredEvent};
    // What a kill -9 leaves behind: an `open` row with one persisted final, here for a provider
    // this server no longer has, so it cannot be resumed.
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
            provider: "retired".into(),
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

#[tokio::test]
async fn a_session_left_open_resumes_with_its_id_token_seq_and_cursor() {
    // First process: two chunks acknowledged (so on disk), one final served, then the process
    // "dies" (its state is dropped without any shutdown bookkeeping).
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("resume.db");
    let app = spawn_app_with(|c| c.db = db_path.clone()).await;
    let s = app.create(json!({"provider": "echo"})).await;
    assert_eq!(app.upload(&s, "seq=0", vec![0u8; 3200]).await.0, 200);
    assert_eq!(app.upload(&s, "seq=1", vec![0u8; 1600]).await.0, 200);
    // Wait until the first process has served (so stored) a final for each chunk: its worker
    // keeps running in this test process after `abandon`, and must have nothing left to write.
    let mut first = json!({"events": []});
    let mut events_first: Vec<Value> = Vec::new();
    let mut cursor = 0;
    while events_first.iter().filter(|e| e["type"] == "final").count() < 2 {
        let (_, page) = app.poll(&s, cursor, 2000).await;
        events_first.extend(page["events"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_u64().unwrap();
        first = page;
    }
    first["events"] = Value::Array(events_first);
    let epoch_before = first["epoch"].as_u64().unwrap();
    app.abandon();
    // Second process on the same database.
    let app = spawn_app_with(|c| c.db = db_path.clone()).await;
    // The acknowledged chunk is still known: its retry is a duplicate.
    let (st, dup) = app.upload(&s, "seq=1", vec![0u8; 1600]).await;
    assert_eq!(
        (st.as_u16(), dup["duplicate"].clone()),
        (200, json!(true)),
        "{dup}"
    );
    assert_eq!(app.upload(&s, "seq=2&last=1", vec![0u8; 640]).await.0, 200);
    let mut events: Vec<Value> = first["events"].as_array().unwrap().clone();
    let mut after = cursor;
    loop {
        let (st, page) = app.poll(&s, after, 2000).await;
        assert_eq!(st, StatusCode::OK, "{page}");
        assert_ne!(
            page["epoch"].as_u64().unwrap(),
            epoch_before,
            "a new epoch after the restart"
        );
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        after = page["next_cursor"].as_u64().unwrap();
        if page["done"] == true {
            break;
        }
    }
    // Ascending, no repeats; after the restart seqs continue above any the first process could
    // have handed out (a block is reserved ahead), so there is a gap.
    assert_seqs_ascending(&events, "after the resume");
    assert!(events.iter().any(|e| e["code"] == "session_resumed"));
    let finals: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "final")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    // Echo numbers one final per provider input; the resumed stream gets the audio after the
    // last final replayed, then chunk 2: every sample is recognised exactly once.
    let total: u64 = finals
        .iter()
        .map(|t| t.trim_end_matches(" samples").parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, (3200 + 1600 + 640) / 2, "{finals:?}");
    let end = events.last().unwrap();
    assert_eq!(end["reason"], "finished");
}
