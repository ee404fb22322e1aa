//! Several `voxpoll serve` processes sharing sessions through one real `redis-server`, with
//! every request sent to the next replica in turn (the per-request round-robin of a cloud host
//! with no session affinity), on real speech through the embedded engine. The transcripts must
//! equal a one-instance run; `kill -9` of the replica running a session, a Redis restart and a
//! per-user budget are shown through the HTTP API.

use crate::helpers::{pcm_bytes, read_wav, root};
use crate::process::{
    check_log, create, create_with, one_instance_transcript, serve_command, speech_chunks, Server,
};
use crate::store::RedisServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Replicas on one Redis; requests go round-robin over the live ones.
struct Replicas {
    redis: RedisServer,
    servers: Vec<Option<Server>>,
    turn: AtomicUsize,
    _dir: tempfile::TempDir,
}

impl Replicas {
    async fn start(n: usize, args: &[&str]) -> Self {
        let redis = RedisServer::start().await;
        let dir = tempfile::tempdir().expect("dir");
        let servers = (0..n)
            .map(|i| {
                let name = format!("r{i}");
                let mut all = vec!["--redis-url", &redis.url, "--replica-id", &name];
                all.extend_from_slice(args);
                Some(Server::start(&dir.path().join(format!("{name}.db")), &all))
            })
            .collect();
        Self {
            redis,
            servers,
            turn: AtomicUsize::new(0),
            _dir: dir,
        }
    }

    /// Replica `i`.
    fn at(&self, i: usize) -> &Server {
        self.servers[i].as_ref().expect("replica alive")
    }

    /// The next live replica in turn.
    fn next(&self) -> &Server {
        loop {
            let i = self.turn.fetch_add(1, Ordering::Relaxed) % self.servers.len();
            if let Some(s) = &self.servers[i] {
                return s;
            }
        }
    }

    fn kill9(&mut self, i: usize) {
        self.servers[i].take().expect("alive").kill9();
    }

    /// Uploads chunks `range` (round-robin), the last one with `last=1` when it ends the audio.
    async fn upload(
        &self,
        id: &str,
        token: &str,
        chunks: &[Vec<u8>],
        range: std::ops::Range<usize>,
    ) {
        self.upload_paced(id, token, chunks, range, Duration::ZERO)
            .await;
    }

    /// [`Replicas::upload`] one chunk per `pace` at most (200 ms: a recording client).
    async fn upload_paced(
        &self,
        id: &str,
        token: &str,
        chunks: &[Vec<u8>],
        range: std::ops::Range<usize>,
        pace: Duration,
    ) {
        let start = Instant::now();
        for (n, i) in range.enumerate() {
            let due = start + pace * u32::try_from(n).unwrap();
            tokio::time::sleep_until(due.into()).await;
            let last = i + 1 == chunks.len();
            self.next().upload(id, token, i, last, &chunks[i]).await;
        }
    }

    /// Polls (round-robin) from `after` until an event matches `stop`; the events so far.
    async fn drain_until(
        &self,
        id: &str,
        token: &str,
        mut after: u64,
        stop: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let mut out: Vec<Value> = Vec::new();
        while !out.iter().any(&stop) {
            let page = self.next().poll(id, token, after).await;
            out.extend(page["events"].as_array().unwrap().iter().cloned());
            after = page["next_cursor"].as_u64().unwrap();
            assert!(page["done"] != true, "ended early: {out:?}");
        }
        out
    }

    /// Polls (round-robin) from `after` until `done`; 503 during a Redis outage is retried.
    async fn drain(&self, id: &str, token: &str, mut after: u64) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            let (status, page) = self.next().try_poll(id, token, after).await;
            if status == 503 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            assert_eq!(status, 200, "poll: {page}");
            out.extend(page["events"].as_array().unwrap().iter().cloned());
            after = page["next_cursor"].as_u64().unwrap();
            if page["done"] == true {
                return out;
            }
        }
        panic!("session did not end: {out:?}");
    }
}

#[tokio::test]
async fn three_replicas_with_round_robin_routing_give_the_one_instance_transcript() {
    let clean = one_instance_transcript().await;
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.json");
    std::fs::write(&providers, r#"[{"name":"loopback","kind":"loopback"}]"#).unwrap();
    let r = Replicas::start(3, &["--providers", providers.to_str().unwrap()]).await;
    let chunks = speech_chunks();

    // Long-poll: create, every chunk and every poll on the next replica in turn, polls held
    // while the audio streams at the pace it is recorded.
    let (id, token) = create(r.next()).await;
    let pace = Duration::from_millis(200);
    let (_, events) = tokio::join!(
        r.upload_paced(&id, &token, &chunks, 0..chunks.len(), pace),
        r.drain(&id, &token, 0)
    );
    assert_eq!(check_log(&events), clean, "long-poll through 3 replicas");
    // Partials reach polls on any replica. The embedded engine may skip every partial when the
    // machine is busy (finals first), so this uses `loopback`, which answers each chunk with
    // one: created on r0 (the owner), chunk via r1, polled on r2.
    let (lb_id, lb_token) = create_with(r.at(0), json!({"provider": "loopback"})).await;
    let (lb_id, lb_token) = (lb_id.as_str(), lb_token.as_str());
    r.at(1).upload(lb_id, lb_token, 0, false, &[0u8; 640]).await;
    let mut partial = None;
    for _ in 0..20 {
        let page = r.at(2).poll(lb_id, lb_token, 0).await;
        partial = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"] == "partial")
            .cloned();
        if partial.is_some() {
            break;
        }
    }
    let partial = partial.expect("a partial reaches a poll on a third replica");
    assert_eq!(partial["text"], "0", "{partial}");

    // The session as any replica tells it.
    for i in 0..3 {
        let v: Value = r
            .at(i)
            .http
            .get(format!("{}/v1/sessions/{id}", r.at(i).url))
            .header("x-session-token", &token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "finished", "replica {i}: {v}");
        assert_eq!(v["transcript"], clean.as_str(), "replica {i}");
    }

    // WebSocket on a replica that does not run the session (created on r0, socket on r1).
    let (id, token) = create(r.at(0)).await;
    let url = format!(
        "{}/v1/sessions/{id}/ws?after=0",
        r.at(1).url.replace("http", "ws")
    );
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("x-session-token", token.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    for (i, c) in chunks.iter().enumerate() {
        let mut b = u32::try_from(i).unwrap().to_be_bytes().to_vec();
        b.push(u8::from(i + 1 == chunks.len()));
        b.extend_from_slice(c);
        ws.send(Message::binary(b)).await.unwrap();
    }
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    'socket: while Instant::now() < deadline {
        let Some(Ok(msg)) = ws.next().await else {
            break;
        };
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        match v["type"].as_str() {
            Some("events") => {
                events.extend(v["events"].as_array().unwrap().iter().cloned());
                if v["done"] == true {
                    break 'socket;
                }
            }
            Some("error") => panic!("socket error: {v}"),
            _ => {}
        }
    }
    assert_eq!(
        check_log(&events),
        clean,
        "WebSocket on a non-owner replica"
    );
}

#[tokio::test]
async fn kill_9_of_the_replica_running_a_session_hands_it_over() {
    let clean = one_instance_transcript().await;
    let mut r = Replicas::start(3, &[]).await;
    let chunks = speech_chunks();
    // Created on r0, so r0 runs it; then round-robin, through the first final (6.4 s: inside
    // the second sentence).
    let (id, token) = create(r.at(0)).await;
    let cut = 32;
    r.upload(&id, &token, &chunks, 0..cut).await;
    let mut seen = r
        .drain_until(&id, &token, 0, |e| e["type"] == "final")
        .await;
    let cursor = seen.last().unwrap()["seq"].as_u64().unwrap();
    let epoch = r.next().poll(&id, &token, cursor).await["epoch"]
        .as_u64()
        .unwrap();
    r.kill9(0);
    let killed = Instant::now();
    // The client goes on with the other replicas: same id, token, next seq, cursor.
    let (_, rest) = tokio::join!(
        r.upload(&id, &token, &chunks, cut..chunks.len()),
        r.drain(&id, &token, cursor)
    );
    let resumed = rest
        .iter()
        .find(|e| e["code"] == "session_resumed")
        .unwrap_or_else(|| panic!("before (cursor {cursor}): {seen:?}\nafter: {rest:?}"));
    eprintln!(
        "taken over; session_resumed seq {} ({} ms after the kill, end {} ms after)",
        resumed["seq"],
        killed.elapsed().as_millis(),
        killed.elapsed().as_millis()
    );
    let page = r.next().poll(&id, &token, 0).await;
    assert!(
        page["epoch"].as_u64().unwrap() > epoch,
        "the epoch tells the client the session moved"
    );
    seen.extend(rest);
    assert_eq!(
        check_log(&seen),
        clean,
        "same transcript as without the kill"
    );
}

#[tokio::test]
async fn a_draining_replica_hands_its_sessions_over_at_once() {
    let clean = one_instance_transcript().await;
    let mut r = Replicas::start(2, &["--lease-ms", "20000"]).await;
    let chunks = speech_chunks();
    let (id, token) = create(r.at(0)).await;
    r.upload(&id, &token, &chunks, 0..20).await;
    let seen = r
        .drain_until(&id, &token, 0, |e| {
            e["type"] == "partial" || e["type"] == "final"
        })
        .await;
    // Scale-in: SIGTERM. The replica drops its leases as it stops, so the other one takes the
    // session over long before the (here 20 s) lease would lapse.
    let stopped = Instant::now();
    let status = r.servers[0].take().unwrap().terminate();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let cursor = seen.last().map_or(0, |e| e["seq"].as_u64().unwrap());
    // The takeover itself is timed (the rest of the session's decoding is not).
    let handed = r
        .drain_until(&id, &token, cursor, |e| e["code"] == "session_resumed")
        .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "taken over before the lease lapsed"
    );
    let cursor = handed.last().unwrap()["seq"].as_u64().unwrap();
    let (_, rest) = tokio::join!(
        r.upload(&id, &token, &chunks, 20..chunks.len()),
        r.drain(&id, &token, cursor)
    );
    let mut all = seen;
    all.extend(handed);
    all.extend(rest);
    assert_eq!(check_log(&all), clean, "same transcript across the drain");
}

#[tokio::test]
async fn a_finalize_on_any_replica_ends_the_sentence_at_its_chunk() {
    let r = Replicas::start(2, &[]).await;
    // The first sentence's speech only: nothing but the finalize can end it before a finish.
    let pcm = read_wav(&root().join("tests/fixtures/zh/01.wav"));
    let rms = |f: &[i16]| f.iter().map(|&s| f64::from(s).abs()).sum::<f64>() / f.len() as f64;
    let speech_end = pcm.chunks(480).rposition(|f| rms(f) > 300.0).unwrap() * 480 + 960;
    let chunks: Vec<Vec<u8>> = pcm_bytes(&pcm[..speech_end])
        .chunks(6400)
        .map(<[u8]>::to_vec)
        .collect();
    let (id, token) = create(r.at(0)).await;
    let n = chunks.len();
    for (i, c) in chunks.iter().enumerate().take(n - 1) {
        r.next().upload(&id, &token, i, false, c).await;
    }
    // On the replica that does not run the session, ahead of the sentence's last chunk.
    let resp = r
        .at(1)
        .http
        .post(format!(
            "{}/v1/sessions/{id}/finalize?seq={}",
            r.at(1).url,
            n - 1
        ))
        .header("x-session-token", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["after_seq"], n - 1);
    r.next()
        .upload(&id, &token, n - 1, false, &chunks[n - 1])
        .await;
    let seen = tokio::time::timeout(
        Duration::from_secs(30),
        r.drain_until(&id, &token, 0, |e| e["type"] == "final"),
    )
    .await
    .expect("the sentence's final within 30 s");
    let f = seen.iter().find(|e| e["type"] == "final").unwrap();
    assert_eq!(f["sentence"], 0);
    assert!(f["text"].as_str().unwrap().contains("公园"), "{f}");
    let audio_ms = (speech_end / 16) as u64;
    assert!(
        f["end_ms"].as_u64().unwrap() + 400 >= audio_ms,
        "{f} of {audio_ms} ms"
    );
}

#[tokio::test]
async fn a_redis_restart_mid_session_loses_nothing_and_a_redis_down_at_start_is_an_error() {
    // Down at start: a clear error and a non-zero exit.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis+unix://{}", dir.path().join("none.sock").display());
    let out = serve_command(&dir.path().join("x.db"), &["--redis-url", &url])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connecting to Redis"), "{stderr}");

    let clean = one_instance_transcript().await;
    let mut r = Replicas::start(2, &[]).await;
    let chunks = speech_chunks();
    let (id, token) = create(r.next()).await;
    r.upload(&id, &token, &chunks, 0..20).await;
    // Redis away: uploads and polls answer 503 store_unavailable with Retry-After.
    r.redis.stop();
    for s in [r.at(0), r.at(1)] {
        let resp = s
            .http
            .post(format!("{}/v1/sessions/{id}/audio?seq=20", s.url))
            .header("x-session-token", &token)
            .body(chunks[20].clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("retry-after"));
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "store_unavailable", "{v}");
        let ready = s.http.get(format!("{}/ready", s.url)).send().await.unwrap();
        assert_eq!(ready.status(), 503, "/ready reports the store");
    }
    r.redis.restart().await;
    // Back (AOF): the session goes on from chunk 20 and ends as without the outage.
    r.upload(&id, &token, &chunks, 20..chunks.len()).await;
    let events = r.drain(&id, &token, 0).await;
    assert_eq!(
        check_log(&events),
        clean,
        "same transcript after a Redis restart"
    );
}

#[tokio::test]
async fn the_per_user_session_budget_holds_across_replicas() {
    let key = "alice:alice-key-0123456789abcdef";
    let r = Replicas::start(3, &["--api-keys", key, "--max-sessions-per-user", "2"]).await;
    let create_on = |i: usize| {
        let s = r.at(i);
        s.http
            .post(format!("{}/v1/sessions", s.url))
            .header("x-api-key", "alice-key-0123456789abcdef")
            .json(&json!({"engine": "16k_zh"}))
            .send()
    };
    let a: Value = create_on(0).await.unwrap().json().await.unwrap();
    let b = create_on(1).await.unwrap();
    assert_eq!(b.status(), 201);
    let third = create_on(2).await.unwrap();
    assert_eq!(third.status(), 429, "a third session on a third replica");
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_sessions", "{v}");
    // Cancelled through another replica than the one running it: the place is free again.
    let s = r.at(2);
    let cancelled: Value = s
        .http
        .delete(format!(
            "{}/v1/sessions/{}",
            s.url,
            a["session_id"].as_str().unwrap()
        ))
        .header("x-session-token", a["session_token"].as_str().unwrap())
        .header("x-api-key", "alice-key-0123456789abcdef")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert_eq!(create_on(2).await.unwrap().status(), 201);
}
