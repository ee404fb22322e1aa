//! Crash durability with the real binary: `kill -9` in the middle of a sentence, restart on the
//! same database, and the client carries on with the same session id, token, next seq and
//! cursor. The transcript must equal a run without the crash, and no event may be lost or
//! repeated.

use crate::process::{check_log, create, drain, one_instance_transcript, speech_chunks, Server};
use serde_json::Value;
use std::time::Duration;
use voxpoll::store::SessionStore;

#[tokio::test]
async fn kill_9_mid_sentence_then_restart_gives_the_same_transcript() {
    let dir = tempfile::tempdir().expect("dir");
    let chunks = speech_chunks();
    let n = chunks.len();

    // Without a crash (one run shared with the replica tests).
    let clean_transcript = one_instance_transcript().await;

    // With kill -9 at 6.4 s, inside the second sentence (it runs from 5.1 s to 8.4 s), after
    // the first final was served.
    let db = dir.path().join("crash.db");
    let first = Server::start(&db, &[]);
    let (id, token) = create(&first).await;
    let cut = 32; // chunks 0..32 = 6.4 s
    for (i, c) in chunks.iter().enumerate().take(cut) {
        first.upload(&id, &token, i, false, c).await;
    }
    let mut seen = Vec::new();
    let mut cursor = 0;
    let mut epoch = 0;
    while !seen.iter().any(|e: &Value| e["type"] == "final") {
        let page = first.poll(&id, &token, cursor).await;
        seen.extend(page["events"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_u64().unwrap();
        epoch = page["epoch"].as_u64().unwrap();
    }
    first.kill9();

    let second = Server::start(&db, &[]);
    // The client goes on: same id, token, next seq, cursor.
    for (i, c) in chunks.iter().enumerate().skip(cut) {
        second.upload(&id, &token, i, i + 1 == n, c).await;
    }
    let rest = drain(&second, &id, &token, cursor).await;
    let page = second.poll(&id, &token, cursor).await;
    assert_ne!(
        page["epoch"].as_u64().unwrap(),
        epoch,
        "the epoch tells the client a restart happened"
    );
    assert!(
        rest.iter().any(|e| e["code"] == "session_resumed"),
        "before the crash (cursor {cursor}): {seen:?}\nafter: {rest:?}"
    );
    seen.extend(rest);
    assert_eq!(
        check_log(&seen),
        clean_transcript,
        "same transcript as without the crash"
    );
}

/// `/finish`, or a retried last chunk that now carries `last=1`, is stored before it is
/// answered: after a `kill -9` right after the answer, the restarted server finishes the
/// session instead of waiting for more audio (or keeping it open while it is polled).
#[tokio::test]
async fn finish_survives_a_kill_9_right_after_it_is_answered() {
    let dir = tempfile::tempdir().expect("dir");
    let chunks = speech_chunks();
    let n = 12; // 2.4 s: inside the first sentence
    for via_last in [false, true] {
        let db = dir.path().join(format!("finish-{via_last}.db"));
        let a = Server::start(&db, &[]);
        let (id, token) = create(&a).await;
        for (i, c) in chunks.iter().take(n).enumerate() {
            a.upload(&id, &token, i, false, c).await;
        }
        if via_last {
            // A retry of the last chunk that carries `last=1`: answered as a duplicate.
            a.upload(&id, &token, n - 1, true, &chunks[n - 1]).await;
        } else {
            let r = a
                .http
                .post(format!("{}/v1/sessions/{id}/finish", a.url))
                .header("x-session-token", &token)
                .send()
                .await
                .expect("finish");
            assert_eq!(r.status(), 200);
        }
        a.kill9();
        let b = Server::start(&db, &[]);
        let events = tokio::time::timeout(Duration::from_secs(40), drain(&b, &id, &token, 0))
            .await
            .unwrap_or_else(|_| panic!("via_last={via_last}: the session never ended"));
        let end = events.last().expect("events");
        assert_eq!(end["type"], "end", "{events:?}");
        assert_eq!(end["reason"], "finished", "via_last={via_last}: {events:?}");
    }
}

/// `--durable-acks false` answers before the commit but still writes every chunk behind, so a
/// restart can resume from them (the window a crash can lose is the last commit).
#[tokio::test]
async fn acks_that_are_not_durable_still_write_every_chunk_behind() {
    let app = crate::helpers::spawn_app_with(|c| c.durable_acks = false).await;
    let s = app.create(serde_json::json!({"provider": "echo"})).await;
    for seq in 0..3 {
        let (status, body) = app.upload(&s, &format!("seq={seq}"), vec![0u8; 640]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["acked_seq"], seq);
    }
    let store = voxpoll::store::sqlite::Db::open(&app.db_path())
        .await
        .unwrap();
    let mut stored = 0;
    for _ in 0..100 {
        stored = store.chunks(&s.id).await.unwrap().len();
        if stored == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored, 3, "every acknowledged chunk reaches the store");
}
