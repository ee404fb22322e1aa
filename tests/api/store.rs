//! One behaviour, two engines: the same [`SessionStore`] checks against a real SQLite file and
//! a real `redis-server` (Debian's, installed by scripts/setup, started here on a Unix socket
//! in a temporary directory).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use voxpoll::store::redis::RedisStore;
use voxpoll::store::sqlite::Db;
use voxpoll::store::{ChunkRecord, SessionProgress, SessionRecord, SessionStore, StoredEvent};

/// A `redis-server` of its own, killed on drop.
pub struct RedisServer {
    child: Child,
    /// `redis+unix://…` URL of its socket.
    pub url: String,
    _dir: tempfile::TempDir,
}

/// `redis-server` on the Unix socket `sock`, with AOF on (`appendfsync always`) in `dir`.
fn spawn_redis(dir: &Path, sock: &Path) -> Child {
    Command::new("redis-server")
        .args(["--port", "0", "--unixsocket"])
        .arg(sock)
        .arg("--dir")
        .arg(dir)
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server missing: run scripts/setup (apt-get install redis-server)")
}

impl RedisServer {
    /// Starts a server in a fresh directory and waits for its socket.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("redis.sock");
        let child = spawn_redis(dir.path(), &sock);
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            sock.exists(),
            "redis-server did not open {}",
            sock.display()
        );
        Self {
            child,
            url: format!("redis+unix://{}", sock.display()),
            _dir: dir,
        }
    }
}

impl RedisServer {
    /// Stops the server (SIGKILL: what it acknowledged is in its AOF).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same directory and socket, and waits for the socket.
    pub async fn restart(&mut self) {
        self.stop();
        let sock = self.url.trim_start_matches("redis+unix://").to_string();
        let _ = std::fs::remove_file(&sock);
        let dir = Path::new(&sock).parent().unwrap().to_path_buf();
        self.child = spawn_redis(&dir, Path::new(&sock));
        for _ in 0..200 {
            if Path::new(&sock).exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not come back");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn record(id: &str, status: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        user_id: Some("user-1".into()),
        token_sha256: "ab".repeat(32),
        provider: "embedded".into(),
        engine: "16k_zh".into(),
        options_json: r#"{"engine":"16k_zh"}"#.into(),
        status: status.into(),
        epoch: 7,
        acked_seq: None,
        audio_ms: 0,
        transcript: String::new(),
        end_reason: None,
        created_at_ms: 1_000,
        updated_at_ms: 1_000,
        ended_at_ms: None,
    }
}

fn progress(status: &str, acked: Option<u64>, end: Option<&str>, at: u64) -> SessionProgress {
    SessionProgress {
        status: status.into(),
        acked_seq: acked,
        audio_ms: 400,
        transcript: "你好".into(),
        end_reason: end.map(Into::into),
        at_ms: at,
    }
}

fn event(seq: u64, kind: &str) -> StoredEvent {
    StoredEvent {
        seq,
        json: format!(r#"{{"seq":{seq},"type":"{kind}"}}"#),
    }
}

fn chunk(id: &str, seq: u64, last: bool, data: &[u8]) -> ChunkRecord {
    ChunkRecord {
        session_id: id.into(),
        seq,
        last,
        data: bytes::Bytes::copy_from_slice(data),
    }
}

/// The behaviour every store must have (the SQLite store's, which the engine relies on).
async fn behaves_as_a_session_store(store: &dyn SessionStore) {
    let (a, b) = (
        "0b9e2c4c-1111-4a4a-8a8a-000000000001",
        "0b9e2c4c-2222-4a4a-8a8a-000000000002",
    );
    // Insert and read back, field for field; a second insert of the same id fails.
    store.insert_session(&record(a, "open")).await.unwrap();
    assert_eq!(store.get_session(a).await.unwrap(), Some(record(a, "open")));
    assert!(store.insert_session(&record(a, "open")).await.is_err());
    assert_eq!(store.get_session(b).await.unwrap(), None);
    store.insert_session(&record(b, "open")).await.unwrap();

    // Progress: written, and a status never goes back.
    store
        .update_progress(a, &progress("finishing", Some(3), None, 2_000))
        .await
        .unwrap();
    store
        .update_progress(a, &progress("open", Some(4), None, 2_100))
        .await
        .unwrap();
    let r = store.get_session(a).await.unwrap().unwrap();
    assert_eq!(
        (r.status.as_str(), r.acked_seq, r.audio_ms),
        ("finishing", Some(4), 400)
    );
    assert_eq!((r.transcript.as_str(), r.updated_at_ms), ("你好", 2_100));

    // Events: idempotent on seq, read after a cursor in seq order.
    for seq in [2, 1, 3] {
        store.append_event(a, &event(seq, "final")).await.unwrap();
    }
    store.append_event(a, &event(2, "changed")).await.unwrap();
    let after1 = store.events_after(a, 1).await.unwrap();
    assert_eq!(after1, vec![event(2, "final"), event(3, "final")]);
    assert!(store.events_after(a, 3).await.unwrap().is_empty());
    assert!(store.events_after(b, 0).await.unwrap().is_empty());

    // Chunks: idempotent on (session, seq), first write wins; ascending; per session.
    store
        .put_chunks(vec![
            chunk(a, 1, false, b"\x01\x02"),
            chunk(b, 0, false, b"b0"),
            chunk(a, 0, false, b""),
            chunk(a, 2, true, &[0u8, 255, 7]),
        ])
        .await
        .unwrap();
    store
        .put_chunks(vec![chunk(a, 1, true, b"other")])
        .await
        .unwrap();
    assert_eq!(
        store.chunks(a).await.unwrap(),
        vec![
            chunk(a, 0, false, b""),
            chunk(a, 1, false, b"\x01\x02"),
            chunk(a, 2, true, &[0, 255, 7])
        ]
    );

    // Seq reservations only grow.
    assert_eq!(store.reserved_seqs(a).await.unwrap(), 0);
    store.reserve_seqs(a, 64).await.unwrap();
    store.reserve_seqs(a, 10).await.unwrap();
    assert_eq!(store.reserved_seqs(a).await.unwrap(), 64);

    // Unfinished: open and finishing sessions, oldest first, with their highest event seq.
    let open = store.unfinished().await.unwrap();
    let ids: Vec<(&str, u64)> = open.iter().map(|(r, s)| (r.id.as_str(), *s)).collect();
    assert!(ids.contains(&(a, 3)) && ids.contains(&(b, 0)), "{ids:?}");

    // Ending: the end event and the status together, chunks dropped, no longer unfinished,
    // and an ended session stays ended.
    store
        .end_session(
            a,
            &progress("finished", Some(4), Some("finished"), 3_000),
            &event(4, "end"),
        )
        .await
        .unwrap();
    store
        .update_progress(a, &progress("open", Some(5), None, 3_100))
        .await
        .unwrap();
    let r = store.get_session(a).await.unwrap().unwrap();
    assert_eq!(r.status, "finished");
    assert_eq!(
        (r.end_reason.as_deref(), r.ended_at_ms),
        (Some("finished"), Some(3_000))
    );
    assert_eq!(
        store.events_after(a, 3).await.unwrap(),
        vec![event(4, "end")]
    );
    assert!(store.chunks(a).await.unwrap().is_empty());
    assert_eq!(
        store.chunks(b).await.unwrap(),
        vec![chunk(b, 0, false, b"b0")]
    );
    let open = store.unfinished().await.unwrap();
    assert_eq!(
        open.iter().map(|(r, _)| r.id.as_str()).collect::<Vec<_>>(),
        vec![b]
    );
    store.check_writable().await.unwrap();
}

/// SQLite deployments keep chunks in a file per running session: they survive a reopen, rows
/// an older version left in `session_chunks` are still read (the file's record of a seq wins),
/// and a reopen removes the files of sessions that are not running.
#[tokio::test]
async fn sqlite_chunk_files_survive_a_reopen_and_older_rows_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chunks.db");
    let (running, ended) = (
        "0b9e2c4c-3333-4a4a-8a8a-000000000003",
        "0b9e2c4c-4444-4a4a-8a8a-000000000004",
    );
    {
        let db = Db::open(&path).await.unwrap();
        db.insert_session(&record(running, "open")).await.unwrap();
        db.insert_session(&record(ended, "finished")).await.unwrap();
        db.put_chunks(vec![
            chunk(running, 0, false, b"file0"),
            chunk(running, 1, false, b"file1"),
            // A chunk written after its session ended: nothing will ever read it.
            chunk(ended, 7, false, b"late"),
        ])
        .await
        .unwrap();
    }
    let c = rusqlite::Connection::open(&path).unwrap();
    for (seq, data) in [(1, &b"row1"[..]), (2, &b"row2"[..])] {
        c.execute(
            "INSERT INTO session_chunks (session_id, seq, last, data) VALUES (?1, ?2, 0, ?3)",
            rusqlite::params![running, seq, data],
        )
        .unwrap();
    }
    drop(c);
    let mut files = path.clone().into_os_string();
    files.push(".chunks");
    let files = std::path::PathBuf::from(files);
    assert!(files.join(ended).exists());
    let db = Db::open(&path).await.unwrap();
    assert!(
        !files.join(ended).exists(),
        "an ended session's file is removed"
    );
    assert_eq!(
        db.chunks(running).await.unwrap(),
        vec![
            chunk(running, 0, false, b"file0"),
            chunk(running, 1, false, b"file1"),
            chunk(running, 2, false, b"row2"),
        ]
    );
    db.end_session(
        running,
        &progress("finished", Some(2), Some("finished"), 3_000),
        &event(1, "end"),
    )
    .await
    .unwrap();
    assert!(
        !files.join(running).exists(),
        "ending a session drops its file"
    );
    assert!(db.chunks(running).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_store_behaves_as_a_session_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("store.db")).await.unwrap();
    behaves_as_a_session_store(&db).await;
}

#[tokio::test]
async fn redis_store_behaves_as_a_session_store() {
    let server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url).await.expect("connect");
    behaves_as_a_session_store(&store).await;
}

#[tokio::test]
async fn redis_store_keeps_what_it_acknowledged_across_a_restart_and_reports_an_outage() {
    let mut server = RedisServer::start().await;
    let store = RedisStore::connect(&server.url).await.expect("connect");
    let id = "0b9e2c4c-3333-4a4a-8a8a-000000000003";
    store.insert_session(&record(id, "open")).await.unwrap();
    store
        .put_chunks(vec![chunk(id, 0, false, b"pcm")])
        .await
        .unwrap();
    // Down: every call is an error (the engine answers 503 store_unavailable), none hangs.
    server.stop();
    let down = tokio::time::timeout(Duration::from_secs(10), store.get_session(id)).await;
    assert!(
        matches!(down, Ok(Err(_))),
        "an error while Redis is down: {down:?}"
    );
    // Back on the same directory (AOF): the acknowledged chunk is there; the client reconnects.
    server.restart().await;
    let mut back = None;
    for _ in 0..100 {
        if let Ok(c) = store.chunks(id).await {
            back = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back, Some(vec![chunk(id, 0, false, b"pcm")]));
}

#[tokio::test]
async fn redis_unreachable_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis+unix://{}", dir.path().join("none.sock").display());
    assert!(RedisStore::connect(&url).await.is_err());
    assert!(RedisStore::connect("not a url").await.is_err());
}

/// `rediss://` (TLS, as managed Redis offers it) against `redis-server --tls-port`, with a CA
/// and a server certificate made by openssl for the test: the real binary connects and serves
/// when `SSL_CERT_FILE` names the CA (how a managed Redis's own CA is trusted), and refuses to
/// start without it (the certificate is verified).
#[tokio::test]
async fn redis_over_tls_verifies_the_server_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |script: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(d)
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .expect("sh");
        assert!(ok.success(), "{script}");
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem");
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=other-ca -keyout o.key -out other.pem");
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout srv.key -out srv.csr");
    sh("printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && \
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out srv.pem");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--tls-auth-clients",
            "no",
        ])
        .args(["--tls-port", &port.to_string()])
        .args([
            "--tls-cert-file",
            "srv.pem",
            "--tls-key-file",
            "srv.key",
            "--tls-ca-cert-file",
            "ca.pem",
        ])
        .current_dir(d)
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("rediss://127.0.0.1:{port}");
    let args = ["--redis-url", url.as_str()];
    let untrusted = crate::process::serve_command(&d.join("x.db"), &args)
        .env("SSL_CERT_FILE", d.join("other.pem")) // another CA
        .output()
        .expect("run");
    assert!(
        !untrusted.status.success(),
        "an unverified certificate is refused"
    );
    let server = {
        crate::process::Server::start_with_env(
            &d.join("y.db"),
            &args,
            &[("SSL_CERT_FILE", d.join("ca.pem").to_str().unwrap())],
        )
    };
    let ready = server
        .http
        .get(format!("{}/ready", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "ready over TLS");
    drop(server);
    let _ = redis.kill();
    let _ = redis.wait();
}
