//! WebSocket transport (`GET /v1/sessions/{id}/ws`) on the session model of the HTTP routes, and
//! the `/v1/probe/*` routes `voxpoll doctor` measures with.

use crate::helpers::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, s: &TestSession, after: u64) -> Socket {
    let url = format!(
        "{}/v1/sessions/{}/ws?after={after}",
        app.url.replace("http", "ws"),
        s.id
    );
    let mut req = url.into_client_request().expect("request");
    req.headers_mut()
        .insert("x-session-token", s.token.parse().expect("header"));
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    assert_eq!(resp.status(), 101);
    ws
}

fn frame(seq: u32, last: bool, audio: &[u8]) -> Message {
    let mut b = seq.to_be_bytes().to_vec();
    b.push(u8::from(last));
    b.extend_from_slice(audio);
    Message::binary(b)
}

/// Next JSON text frame (pings are skipped), within 5 s.
async fn next_json(ws: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("frame within 5 s")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).expect("json frame");
        }
    }
}

/// Next JSON frame that answers a client frame (pushed `events` frames are skipped).
async fn next_reply(ws: &mut Socket) -> Value {
    loop {
        let v = next_json(ws).await;
        if v["type"] != "events" {
            return v;
        }
    }
}

fn echo_session() -> Value {
    json!({"provider": "echo"})
}

#[tokio::test]
async fn websocket_carries_chunks_acks_and_events_then_closes() {
    let app = spawn_app().await;
    let s = app.create(echo_session()).await;
    let mut ws = connect(&app, &s, 0).await;
    let ready = next_json(&mut ws).await;
    assert_eq!(ready["type"], "ready");
    assert_eq!(ready["cursor"], 0);
    assert_eq!(ready["max_chunk_bytes"], 96 * 1024);

    ws.send(frame(0, false, &[0u8; 3200])).await.expect("send");
    let mut acks = Vec::new();
    let mut events = Vec::new();
    ws.send(frame(1, true, &[0u8; 1600])).await.expect("send");
    let mut closed = None;
    while closed.is_none() {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                match v["type"].as_str() {
                    Some("ack") => acks.push(v),
                    Some("events") => {
                        events.extend(v["events"].as_array().expect("events").clone())
                    }
                    other => panic!("unexpected frame {other:?}: {v}"),
                }
            }
            Ok(Some(Ok(Message::Close(c)))) => closed = Some(c.map(|c| u16::from(c.code))),
            Ok(Some(Ok(_))) => {}
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    }
    assert_eq!(closed, Some(Some(1000)));
    assert_eq!(acks.len(), 2);
    assert_eq!(acks[1]["acked_seq"], 1);
    assert_seqs_contiguous(&events, "in order, no gaps");
    assert_eq!(events[0]["text"], "1600 samples");
    assert_eq!(events[1]["text"], "800 samples");
    assert_eq!(events.last().expect("end")["type"], "end");
}

#[tokio::test]
async fn switching_transport_mid_stream_loses_and_duplicates_nothing() {
    let app = spawn_app().await;
    let s = app.create(echo_session()).await;
    // Chunks 0-1 over the socket; it then drops before chunk 1 is known to be acked.
    let mut ws = connect(&app, &s, 0).await;
    next_json(&mut ws).await;
    ws.send(frame(0, false, &[0u8; 320])).await.expect("send");
    ws.send(frame(1, false, &[0u8; 640])).await.expect("send");
    let mut cursor = 0;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let v = next_json(&mut ws).await;
        if v["type"] == "events" {
            seen.extend(v["events"].as_array().expect("events").clone());
            cursor = v["next_cursor"].as_u64().expect("cursor");
        }
    }
    drop(ws);
    // Over HTTP: chunk 1 again (the client never saw its ack), then 2 and last.
    let (st, ack) = app.upload(&s, "seq=1", vec![0u8; 640]).await;
    assert_eq!((st.as_u16(), ack["duplicate"].clone()), (200, json!(true)));
    let (st, _) = app.upload(&s, "seq=2", vec![0u8; 960]).await;
    assert_eq!(st, 200);
    // Back to a socket from the HTTP cursor for the rest.
    let (st, r) = app.poll(&s, cursor, 2000).await;
    assert_eq!(st, 200);
    seen.extend(r["events"].as_array().expect("events").clone());
    cursor = r["next_cursor"].as_u64().expect("cursor");
    let mut ws = connect(&app, &s, cursor).await;
    assert_eq!(next_json(&mut ws).await["cursor"], cursor);
    ws.send(frame(3, true, &[])).await.expect("send");
    loop {
        let v = next_json(&mut ws).await;
        if v["type"] == "events" {
            seen.extend(v["events"].as_array().expect("events").clone());
            if v["done"] == true {
                break;
            }
        }
    }
    assert_seqs_contiguous(&seen, &format!("{seen:?}"));
    let texts: Vec<&str> = seen
        .iter()
        .filter(|e| e["type"] == "final")
        .map(|e| e["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["160 samples", "320 samples", "480 samples"]);
}

#[tokio::test]
async fn websocket_errors_match_the_http_routes() {
    let app = spawn_app_with(|c| c.max_chunk_bytes = 1000).await;
    let s = app.create(echo_session()).await;
    let mut ws = connect(&app, &s, 0).await;
    next_reply(&mut ws).await;
    // Too short to hold the header.
    ws.send(Message::binary(vec![0u8, 0, 0]))
        .await
        .expect("send");
    let v = next_reply(&mut ws).await;
    assert_eq!(
        (v["status"].clone(), v["error"]["code"].clone()),
        (json!(400), json!("invalid_frame"))
    );
    // Empty non-last chunk, then an odd-length s16 chunk is fine for the transport.
    ws.send(frame(0, false, &[])).await.expect("send");
    assert_eq!(next_reply(&mut ws).await["error"]["code"], "empty_chunk");
    // Exactly max_chunk_bytes is accepted; one more byte is refused with the HTTP code.
    ws.send(frame(0, false, &[0u8; 1000])).await.expect("send");
    assert_eq!(next_reply(&mut ws).await["type"], "ack");
    // Beyond the reorder window.
    ws.send(frame(100, false, &[0u8; 10])).await.expect("send");
    let v = next_reply(&mut ws).await;
    assert_eq!(
        (
            v["status"].clone(),
            v["error"]["code"].clone(),
            v["seq"].clone()
        ),
        (json!(409), json!("seq_out_of_window"), json!(100))
    );
    ws.send(Message::text("{\"type\":\"dance\"}"))
        .await
        .expect("send");
    assert_eq!(
        next_reply(&mut ws).await["error"]["code"],
        "invalid_message"
    );
    ws.send(Message::text("not json")).await.expect("send");
    assert_eq!(next_reply(&mut ws).await["error"]["code"], "invalid_json");
    ws.send(Message::text("{\"type\":\"ping\"}"))
        .await
        .expect("send");
    assert_eq!(next_reply(&mut ws).await["type"], "pong");
    // One byte over max_chunk_bytes: the HTTP route's 413, the socket stays open.
    ws.send(frame(1, false, &[0u8; 1001])).await.expect("send");
    let v = next_reply(&mut ws).await;
    assert_eq!(
        (v["status"].clone(), v["error"]["code"].clone()),
        (json!(413), json!("chunk_too_large"))
    );
    // Past twice the limit the socket itself is closed.
    ws.send(frame(1, false, &[0u8; 2100])).await.expect("send");
    let mut ended = false;
    while let Ok(m) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        match m {
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                ended = true;
                break;
            }
            _ => {}
        }
    }
    assert!(ended, "an oversized frame ends the socket");
    // The server stays healthy and the session still takes chunks over HTTP.
    let (st, _) = app.upload(&s, "seq=1", vec![0u8; 10]).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn websocket_refusals_are_plain_http_errors() {
    let app = spawn_app().await;
    let s = app.create(echo_session()).await;
    let base = app.url.replace("http", "ws");
    // Wrong token → 403 before any upgrade.
    let mut req = format!("{base}/v1/sessions/{}/ws", s.id)
        .into_client_request()
        .expect("req");
    req.headers_mut()
        .insert("x-session-token", "nope".parse().expect("h"));
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    // Unknown session → 404.
    let req = format!("{base}/v1/sessions/00000000-0000-4000-8000-000000000000/ws?session_token=x");
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected 404, got {other:?}"),
    }
    // A plain GET (what a proxy that drops Upgrade sends) → 426 upgrade_required.
    let r = app
        .http
        .get(format!("{}/v1/sessions/{}/ws", app.url, s.id))
        .header("x-session-token", &s.token)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 426);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "upgrade_required");
}

#[tokio::test]
async fn websocket_pings_keep_a_quiet_socket_busy() {
    let app = spawn_app_with(|c| c.ws_ping_ms = 200).await;
    let s = app.create(echo_session()).await;
    let mut ws = connect(&app, &s, 0).await;
    next_json(&mut ws).await;
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(1100) {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout(Duration::from_millis(300), ws.next()).await
        {
            pings += 1;
        }
    }
    assert!((4..=6).contains(&pings), "{pings} pings in 1.1 s at 200 ms");
}

#[tokio::test]
async fn probe_routes_hold_stream_and_echo_within_their_limits() {
    let app = spawn_app_with(|c| {
        c.probe_max_hold_ms = 300;
        c.probe_max_body_bytes = 1000;
    })
    .await;
    let t0 = Instant::now();
    let (st, v) = app.get_path("/v1/probe/hold?ms=5000").await;
    assert_eq!(
        (st.as_u16(), v["held_ms"].clone()),
        (200, json!(300)),
        "capped at probe_max_hold_ms"
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));

    let t0 = Instant::now();
    let r = app
        .http
        .get(format!(
            "{}/v1/probe/stream?events=3&interval_ms=200",
            app.url
        ))
        .send()
        .await
        .expect("stream");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("chunk").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("data:{\"i\":0}"));
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "first event sent before the others"
    );
    let mut n = 1;
    while let Some(c) = body.next().await {
        n += String::from_utf8_lossy(&c.expect("bytes"))
            .matches("data:")
            .count();
    }
    assert_eq!(n, 3);
    assert!(t0.elapsed() >= Duration::from_millis(400));

    for (len, status) in [(1000usize, 200u16), (1001, 413)] {
        let r = app
            .http
            .post(format!("{}/v1/probe/echo", app.url))
            .body(vec![7u8; len])
            .send()
            .await
            .expect("echo");
        assert_eq!(r.status(), status, "{len} bytes");
        if status == 200 {
            assert_eq!(r.json::<Value>().await.expect("json")["bytes"], len);
        }
    }

    let off = spawn_app_with(|c| c.probe_max_hold_ms = 0).await;
    let (st, v) = off.get_path("/v1/probe/hold?ms=1").await;
    assert_eq!(
        (st.as_u16(), v["error"]["code"].clone()),
        (404, json!("not_found"))
    );
}
