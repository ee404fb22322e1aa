//! The real binary as a child process (`voxpoll serve` on port 0), for what an in-process
//! server cannot show: `kill -9`, several replicas, a start that must fail.

use crate::helpers::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `voxpoll serve` child process, killed on drop.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub http: reqwest::Client,
    /// Every stderr line so far.
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// The `voxpoll serve` command on loopback port 0 with `db` and `args`.
pub fn serve_command(db: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_voxpoll"));
    cmd.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--decode-workers",
        "2",
        "--db",
    ])
    .arg(db)
    .args(args)
    .env("NO_COLOR", "1")
    .env("RUST_LOG", "voxpoll=info");
    cmd
}

impl Server {
    /// Starts `voxpoll serve --db <db> <args…>` and waits until it listens.
    pub fn start(db: &Path, args: &[&str]) -> Self {
        Self::start_with_env(db, args, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(db: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = serve_command(db, args);
        cmd.envs(env.iter().copied());
        Self::start_command(cmd)
    }

    /// Starts `cmd` (a [`serve_command`], possibly wrapped) and waits until it listens.
    pub fn start_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn voxpoll");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let verbose = std::env::var_os("VOXPOLL_TEST_LOG").is_some();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if verbose {
                    eprintln!("[server] {line}");
                }
                // `listening addr=…` as text, `"addr":"…"` as JSON.
                let addr = match line.split("addr=").nth(1) {
                    Some(a) => a.split_whitespace().next(),
                    None => line
                        .split("\"addr\":\"")
                        .nth(1)
                        .and_then(|a| a.split('"').next()),
                };
                if let Some(addr) = addr.filter(|_| line.contains("listening")) {
                    let _ = tx.send(addr.to_string());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("server listening");
        Self {
            child,
            url: format!("http://{addr}"),
            http: reqwest::Client::new(),
            lines,
        }
    }

    /// The stderr lines logged so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// SIGTERM, as an orchestrator scaling in does; waits for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        self.child.wait().expect("wait")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Uploads chunk `seq` until it is acknowledged; 429 and 503 (store unavailable) are
    /// retried after their `Retry-After`, as a client does.
    pub async fn upload(&self, id: &str, token: &str, seq: usize, last: bool, body: &[u8]) {
        let q = if last {
            format!("seq={seq}&last=1")
        } else {
            format!("seq={seq}")
        };
        for _ in 0..300 {
            let r = self
                .http
                .post(format!("{}/v1/sessions/{id}/audio?{q}", self.url))
                .header("x-session-token", token)
                .body(body.to_vec())
                .send()
                .await
                .expect("upload");
            match r.status().as_u16() {
                200 => return,
                429 | 503 => {
                    assert!(r.headers().contains_key("retry-after"), "Retry-After");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                s => panic!("chunk {seq}: {s} {}", r.text().await.unwrap_or_default()),
            }
        }
        panic!("chunk {seq} never acknowledged");
    }

    /// One poll after `after` (held up to 2 s): (status, body).
    pub async fn try_poll(&self, id: &str, token: &str, after: u64) -> (u16, Value) {
        let r = self
            .http
            .get(format!(
                "{}/v1/sessions/{id}/events?after={after}&wait_ms=2000",
                self.url
            ))
            .header("x-session-token", token)
            .send()
            .await
            .expect("poll");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// One poll after `after` (held up to 2 s) that must succeed.
    pub async fn poll(&self, id: &str, token: &str, after: u64) -> Value {
        let (status, v) = self.try_poll(id, token, after).await;
        assert_eq!(status, 200, "poll: {v}");
        v
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two Mandarin sentences with a pause, in 200 ms chunks of s16le.
pub fn speech_chunks() -> Vec<Vec<u8>> {
    let dir = root().join("tests/fixtures/zh");
    let mut pcm = read_wav(&dir.join("01.wav"));
    pcm.extend(vec![0i16; 16_000]);
    pcm.extend(read_wav(&dir.join("03.wav")));
    pcm.extend(vec![0i16; 12_800]);
    pcm_bytes(&pcm).chunks(6400).map(<[u8]>::to_vec).collect()
}

/// Creates a Mandarin session; (id, token).
pub async fn create(s: &Server) -> (String, String) {
    create_with(s, json!({"engine": "16k_zh"})).await
}

/// Creates a session with `options`; (id, token).
pub async fn create_with(s: &Server, options: Value) -> (String, String) {
    let r = s
        .http
        .post(format!("{}/v1/sessions", s.url))
        .json(&options)
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.expect("json");
    (
        v["session_id"].as_str().unwrap().into(),
        v["session_token"].as_str().unwrap().into(),
    )
}

/// Polls from `after` until `done`, returning the events.
pub async fn drain(s: &Server, id: &str, token: &str, mut after: u64) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..120 {
        let page = s.poll(id, token, after).await;
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        after = page["next_cursor"].as_u64().unwrap();
        if page["done"] == true {
            return out;
        }
    }
    panic!("session did not end: {out:?}");
}

/// No event twice, ascending seqs, one final per sentence, a `finished` end; its transcript.
pub fn check_log(events: &[Value]) -> String {
    assert_seqs_ascending(events, "ascending, no repeats");
    let finals: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "final" && e["text"] != "")
        .map(|e| e["sentence"].as_u64().unwrap())
        .collect();
    let mut unique = finals.clone();
    unique.dedup();
    assert_eq!(finals, unique, "one final per sentence: {events:?}");
    let end = events.last().expect("events");
    assert_eq!(end["type"], "end", "{events:?}");
    assert_eq!(end["reason"], "finished", "{end}");
    end["transcript"].as_str().unwrap().to_string()
}

/// The transcript of the speech fixture on one instance (SQLite, no Redis), once per run.
pub async fn one_instance_transcript() -> String {
    static CLEAN: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    CLEAN
        .get_or_init(|| async {
            let dir = tempfile::tempdir().expect("dir");
            let one = Server::start(&dir.path().join("one.db"), &[]);
            let chunks = speech_chunks();
            let (id, token) = create(&one).await;
            for (i, c) in chunks.iter().enumerate() {
                one.upload(&id, &token, i, i + 1 == chunks.len(), c).await;
            }
            let events = drain(&one, &id, &token, 0).await;
            let t = events.last().unwrap()["transcript"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(
                zh_cer(
                    "今天天气很好，我们去公园散步吧。明天上午九点在会议室开会。",
                    &t
                ) <= 0.2,
                "{t}"
            );
            t
        })
        .await
        .clone()
}
