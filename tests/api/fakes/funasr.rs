//! Fake FunASR runtime (C++ 2pass server behaviour; shared/providers.md §4.7): no handshake;
//! the first frame must be a JSON config with `mode` and a 3-element `chunk_size`; PCM frames;
//! `2pass-online` deltas every 600 ms of voice, a `2pass-offline` sentence at each pause; after
//! `{"is_speaking": false}` one last message with `is_final: true`; the server never closes —
//! it records whether the client did.

use super::{samples, Out, Scripter};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Debug, Default)]
pub struct Conn {
    pub config: Value,
    pub audio_bytes: usize,
    pub end_received: bool,
    pub client_closed: bool,
    pub error: Option<String>,
}

pub struct FakeFunAsr {
    pub url: String,
    pub conns: Arc<Mutex<Vec<Conn>>>,
}

impl FakeFunAsr {
    /// `drop_after_ms`: close the socket abruptly after this much audio (fault injection).
    pub async fn start(drop_after_ms: Option<u64>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::new()));
        let c2 = Arc::clone(&conns);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let conns = Arc::clone(&c2);
                tokio::spawn(async move { serve(tcp, conns, drop_after_ms).await });
            }
        });
        Self {
            url: format!("ws://{addr}/"),
            conns,
        }
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.conns.lock().unwrap().clone()
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    conns: Arc<Mutex<Vec<Conn>>>,
    drop_after_ms: Option<u64>,
) {
    let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let idx = {
        let mut c = conns.lock().unwrap();
        c.push(Conn::default());
        c.len() - 1
    };
    let set = |f: &dyn Fn(&mut Conn)| f(&mut conns.lock().unwrap()[idx]);
    let mut wav_name = String::new();
    let mut configured = false;
    let mut sc = Scripter::new();
    while let Some(Ok(m)) = rx.next().await {
        match m {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                if !configured {
                    let ok = v["mode"].is_string()
                        && v["chunk_size"]
                            .as_array()
                            .is_some_and(|a| a.len() == 3 && a[1].as_u64() != Some(0))
                        && v["wav_format"] == "pcm"
                        && v["audio_fs"] == 16000;
                    if !ok {
                        set(&|c| c.error = Some(format!("bad config {t}")));
                        return;
                    }
                    wav_name = v["wav_name"].as_str().unwrap_or("").to_string();
                    set(&|c| c.config = v.clone());
                    configured = true;
                    continue;
                }
                if v["is_speaking"] == false {
                    set(&|c| c.end_received = true);
                    let mut last_text = String::new();
                    for o in sc.finish() {
                        if let Out::Final { text, .. } = o {
                            last_text = text;
                        }
                    }
                    let fin = if last_text.is_empty() {
                        json!({"text": "", "wav_name": wav_name, "is_final": true})
                    } else {
                        json!({"mode": "2pass-offline", "text": last_text, "wav_name": wav_name, "is_final": true})
                    };
                    let _ = tx.send(Message::text(fin.to_string())).await;
                }
            }
            Message::Binary(b) => {
                if !configured {
                    set(&|c| c.error = Some("audio before config".into()));
                    return;
                }
                set(&|c| c.audio_bytes += b.len());
                if drop_after_ms.is_some_and(|ms| sc.pos_ms() >= ms) {
                    return; // abrupt drop: no close frame
                }
                for o in sc.push(&samples(&b)) {
                    let msg = match o {
                        // One delta character per 600 ms of voice; clients append them.
                        Out::Partial { .. } => {
                            json!({"mode": "2pass-online", "text": "在", "wav_name": wav_name, "is_final": false})
                        }
                        Out::Final {
                            text,
                            start_ms,
                            end_ms,
                            ..
                        } => {
                            json!({"mode": "2pass-offline", "text": text, "wav_name": wav_name, "is_final": false,
                                   "stamp_sents": [{"text_seg": "", "punc": "", "start": start_ms, "end": end_ms, "ts_list": []}]})
                        }
                        Out::Begin { .. } => continue,
                    };
                    if tx.send(Message::text(msg.to_string())).await.is_err() {
                        return;
                    }
                }
            }
            Message::Close(_) => {
                set(&|c| c.client_closed = true);
                return;
            }
            _ => {}
        }
    }
}
