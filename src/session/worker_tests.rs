//! The worker's loop driven step by step against a scripted provider whose stream ends the
//! test holds, over a real SQLite store.

use super::*;
use crate::audio::AudioFormat;
use crate::config::Config;
use crate::provider::{ProviderError, Readiness, Recognition};
use crate::session::state::State;
use crate::store::sqlite::Db;
use crate::store::SessionRecord;
use bytes::Bytes;
use std::sync::Mutex;
use tokio::sync::mpsc;

/// The test's side of one opened stream.
struct Ends {
    input: mpsc::Receiver<ProviderInput>,
    events: mpsc::Sender<ProviderEvent>,
}

/// A provider that hands every stream it opens to the test. Its input channel holds one
/// item, so the worker must wait for room while results keep coming.
struct Scripted {
    opened: Mutex<mpsc::UnboundedSender<Ends>>,
}

impl Provider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: String::new(),
            stats: None,
        }
    }
    fn open(
        &self,
        _opts: &StreamOptions,
        _cancel: CancellationToken,
    ) -> Result<ProviderStream, ProviderError> {
        let (in_tx, in_rx) = mpsc::channel(1);
        let (ev_tx, ev_rx) = mpsc::channel(16);
        let _ = self.opened.lock().unwrap().send(Ends {
            input: in_rx,
            events: ev_tx,
        });
        Ok(ProviderStream {
            input: in_tx,
            events: ev_rx,
        })
    }
}

struct Rig {
    worker: Worker,
    s: Arc<Session>,
    provider: Ends,
    opened: mpsc::UnboundedReceiver<Ends>,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Db::open(&dir.path().join("w.db")).await.unwrap());
    let mut limits = SessionLimits::from(&Config::loopback("unused.db".into()));
    limits.provider_backoff_ms = 1;
    let rec = SessionRecord {
        id: uuid::Uuid::new_v4().to_string(),
        user_id: None,
        token_sha256: hex::encode([0u8; 32]),
        provider: "scripted".into(),
        engine: "16k_zh".into(),
        options_json: "{}".into(),
        status: "open".into(),
        epoch: 1,
        acked_seq: None,
        audio_ms: 0,
        transcript: String::new(),
        end_reason: None,
        created_at_ms: 0,
        updated_at_ms: 0,
        ended_at_ms: None,
    };
    store.insert_session(&rec).await.unwrap();
    let state = State::fresh(&limits);
    let s = Arc::new(Session::new(rec, AudioFormat::Pcm, 1, state).unwrap());
    let (tx, mut opened) = mpsc::unbounded_channel();
    let provider: Arc<dyn Provider> = Arc::new(Scripted {
        opened: Mutex::new(tx),
    });
    let opts = StreamOptions {
        engine: "16k_zh".into(),
        partials: true,
        ..StreamOptions::default()
    };
    let cancel = CancellationToken::new();
    let stream = provider.open(&opts, cancel.clone()).unwrap();
    let ends = opened.recv().await.unwrap();
    let ctx = WorkerCtx {
        store,
        limits: Arc::new(limits),
        shutdown: CancellationToken::new(),
        on_exit: Box::new(|| {}),
        shared: None,
    };
    let up = Upstream {
        provider,
        opts,
        stream,
        cancel,
    };
    let worker = Worker::new(
        ctx,
        Arc::clone(&s),
        up,
        Decoder::new(AudioFormat::Pcm, 16_000, 1).unwrap(),
    );
    Rig {
        worker,
        s,
        provider: ends,
        opened,
        _dir: dir,
    }
}

/// `n` samples of value `v`, as a chunk body.
fn chunk(v: i16, n: usize) -> Bytes {
    Bytes::from(
        std::iter::repeat_n(v.to_le_bytes(), n)
            .flatten()
            .collect::<Vec<u8>>(),
    )
}

fn rec(sentence: u32, text: &str, start_ms: u64, end_ms: u64) -> Recognition {
    Recognition {
        sentence,
        text: text.into(),
        start_ms,
        end_ms,
        words: None,
    }
}

impl Rig {
    fn offer(&self, seq: u64, body: Bytes, last: bool) {
        self.s.lock().ingest.offer(seq, body, last).unwrap();
        self.s.wake.notify_one();
    }

    /// One turn of the worker's loop; panics if the session ends.
    async fn turn(&mut self) {
        let input = self.worker.next_input().await;
        assert_eq!(self.worker.step(input).await, None, "the session ended");
    }

    /// Turns the loop until the provider receives its next input.
    async fn provider_gets(&mut self) -> ProviderInput {
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    biased;
                    got = self.provider.input.recv() => return got.expect("input closed"),
                    input = self.worker.next_input() => {
                        assert_eq!(self.worker.step(input).await, None, "the session ended");
                    }
                }
            }
        });
        got.await.expect("the provider got nothing")
    }

    /// The provider sends `ev`; the loop turns until the worker has handled it.
    async fn provider_says(&mut self, ev: ProviderEvent) -> Option<EndReason> {
        self.provider.events.send(ev).await.unwrap();
        loop {
            let input = self.worker.next_input().await;
            let was_event = matches!(input, Input::Provider(_));
            if let Some(end) = self.worker.step(input).await {
                return Some(end);
            }
            if was_event {
                return None;
            }
        }
    }

    fn log(&self) -> Vec<(u64, EventKind, u32, String)> {
        let st = self.s.lock();
        st.log
            .after(0, 100)
            .into_iter()
            .map(|e| (e.seq, e.kind, e.sentence, e.text))
            .collect()
    }
}

fn samples(input: &ProviderInput) -> Vec<i16> {
    match input {
        ProviderInput::Audio(pcm) => pcm.clone(),
        other => panic!("expected audio, got {other:?}"),
    }
}

#[tokio::test]
async fn chunks_reach_the_provider_in_seq_order() {
    let mut r = rig().await;
    r.offer(1, chunk(2, 160), false);
    r.offer(2, chunk(3, 160), false);
    r.offer(0, chunk(1, 160), false);
    for v in 1..=3 {
        let got = samples(&r.provider_gets().await);
        assert_eq!(got, vec![v; 160]);
    }
    assert_eq!(r.s.lock().audio_ms, 30);
}

#[tokio::test]
async fn results_are_logged_in_order_and_finals_only_once_stored() {
    let mut r = rig().await;
    r.provider_says(ProviderEvent::Partial(rec(0, "he", 0, 100)))
        .await;
    r.provider_says(ProviderEvent::Partial(rec(0, "hello", 0, 200)))
        .await;
    r.provider_says(ProviderEvent::Final(rec(0, "hello.", 0, 300)))
        .await;
    r.provider_says(ProviderEvent::Partial(rec(1, "wo", 300, 400)))
        .await;
    assert_eq!(
        r.log(),
        vec![
            (3, EventKind::Final, 0, "hello.".into()),
            (4, EventKind::Partial, 1, "wo".into()),
        ]
    );
    // The final was stored before it became visible.
    let stored = r
        .worker
        .ctx
        .store
        .events_after(&r.s.id.to_string(), 0)
        .await
        .unwrap();
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    assert_eq!(r.s.read_after(0).next_cursor, 4);
    assert_eq!(r.s.transcript(&r.s.lock()), "hello.");
}

/// Each partial carries the prefix it shares with the one before it (same sentence); a final
/// ends the agreement, a new sentence starts its own.
#[tokio::test]
async fn partials_carry_the_prefix_two_guesses_agree_on() {
    let mut r = rig().await;
    let stable_after = |r: &Rig| {
        let st = r.s.lock();
        let newest = st.log.after(0, 100).into_iter().next_back().unwrap();
        (newest.kind, newest.stable)
    };
    let said = [
        (0, "今天天", Some("")),
        (0, "今天天气很", Some("今天天")),
        (0, "今天天气很好，", Some("今天天气很")),
        (0, "今天天气很好。我们", Some("今天天气很好")),
        (1, "the cat", Some("")),
        (1, "the catalog is", Some("the ")),
    ];
    for (sentence, text, stable) in said {
        r.provider_says(ProviderEvent::Partial(rec(sentence, text, 0, 100)))
            .await;
        assert_eq!(
            stable_after(&r),
            (EventKind::Partial, stable.map(String::from)),
            "{text}"
        );
    }
    r.provider_says(ProviderEvent::Final(rec(1, "the catalog is here.", 0, 300)))
        .await;
    assert_eq!(stable_after(&r), (EventKind::Final, None));
    r.provider_says(ProviderEvent::Partial(rec(2, "the catalog", 300, 400)))
        .await;
    assert_eq!(stable_after(&r), (EventKind::Partial, Some(String::new())));
    let json = serde_json::to_value(r.s.lock().log.after(0, 100).last().unwrap()).unwrap();
    assert_eq!(json["stable"], "");
}

#[tokio::test]
async fn a_failed_stream_is_reopened_and_the_unfinished_audio_replayed() {
    let mut r = rig().await;
    // 200 ms of audio; the provider finalises the first 100 ms, then fails.
    r.offer(0, chunk(1, 1600), false);
    r.offer(1, chunk(2, 1600), false);
    assert_eq!(samples(&r.provider_gets().await), vec![1; 1600]);
    assert_eq!(samples(&r.provider_gets().await), vec![2; 1600]);
    r.provider_says(ProviderEvent::Final(rec(0, "one", 0, 100)))
        .await;
    r.provider_says(ProviderEvent::Error {
        code: "provider_error".into(),
        provider_code: Some("4000".into()),
        message: "boom".into(),
    })
    .await;
    let mut second = r.opened.try_recv().expect("a second stream was opened");
    std::mem::swap(&mut r.provider, &mut second);
    drop(second);
    // Only the audio after the last final comes again.
    assert_eq!(samples(&r.provider_gets().await), vec![2; 1600]);
    // The new stream's sentence 0 at its time 0 is the session's sentence 1 at 100 ms.
    r.provider_says(ProviderEvent::Final(rec(0, "two", 0, 100)))
        .await;
    let log = r.log();
    assert_eq!(log[1].1, EventKind::Warning);
    assert!(log[1].3.contains("reopened"), "{log:?}");
    assert_eq!(log[2], (3, EventKind::Final, 1, "two".into()));
    let fin = r.s.lock().finals.get(&1).cloned().unwrap();
    assert_eq!((fin.start_ms, fin.end_ms), (100, 200));
    // Later audio goes to the new stream, after the replay.
    r.offer(2, chunk(3, 160), false);
    assert_eq!(samples(&r.provider_gets().await), vec![3; 160]);
}

#[tokio::test]
async fn provider_events_are_drained_while_the_worker_waits_to_send() {
    let mut r = rig().await;
    for seq in 0..3 {
        r.offer(seq, chunk(seq as i16 + 1, 160), false);
    }
    // The chunks are decoded into the outbox (wake-up), one goes into the input channel
    // (room); the channel holds one item and nobody reads it: the worker still takes results.
    for _ in 0..2 {
        r.turn().await;
    }
    r.provider_says(ProviderEvent::Final(rec(0, "early", 0, 10)))
        .await;
    assert_eq!(r.log().len(), 1, "{:?}", r.log());
    for v in 1..=3 {
        assert_eq!(samples(&r.provider_gets().await), vec![v; 160]);
    }
}

#[tokio::test]
async fn the_last_chunk_finishes_the_stream_and_done_ends_the_session() {
    let mut r = rig().await;
    r.offer(0, chunk(1, 320), true);
    assert_eq!(samples(&r.provider_gets().await), vec![1; 320]);
    assert!(matches!(r.provider_gets().await, ProviderInput::Finish));
    r.provider_says(ProviderEvent::Final(rec(0, "done.", 0, 20)))
        .await;
    let end = r.provider_says(ProviderEvent::Done).await;
    assert_eq!(end, Some(EndReason::Finished));
    r.worker.record_end(EndReason::Finished).await;
    let st = r.s.lock();
    assert_eq!(st.status, Status::Ended(EndReason::Finished));
    assert!(st.log.ended());
}

#[tokio::test]
async fn cancel_ends_the_session_at_once() {
    let mut r = rig().await;
    r.offer(0, chunk(1, 320), false);
    r.s.cancel.cancel();
    let input = r.worker.next_input().await;
    assert!(matches!(input, Input::Cancelled));
    assert_eq!(r.worker.step(input).await, Some(EndReason::Cancelled));
}

#[tokio::test]
async fn retries_are_bounded_and_a_non_transient_error_ends_the_session() {
    let mut r = rig().await;
    r.worker.ctx.limits = Arc::new(SessionLimits {
        provider_retries: 1,
        ..(*r.worker.ctx.limits).clone()
    });
    let err = |code: &str| ProviderEvent::Error {
        code: code.into(),
        provider_code: None,
        message: "x".into(),
    };
    r.provider_says(err("provider_error")).await;
    let mut second = r.opened.try_recv().expect("reopened once");
    std::mem::swap(&mut r.provider, &mut second);
    r.provider_says(err("provider_error")).await;
    assert!(r.opened.try_recv().is_err(), "no second reopen");
    let end = r.provider_says(ProviderEvent::Done).await;
    assert_eq!(end, Some(EndReason::Failed));
    let kinds: Vec<_> = r.log().into_iter().map(|e| e.1).collect();
    assert_eq!(kinds, vec![EventKind::Warning, EventKind::Error]);
}

#[tokio::test]
async fn an_event_is_visible_only_once_stored_and_a_failed_write_is_retried() {
    let mut r = rig().await;
    // Seqs are reserved by the first event; the second one's store write is the one that fails.
    r.provider_says(ProviderEvent::Final(rec(0, "first", 0, 10)))
        .await;
    // Another connection holds the write lock past the store's 5 s busy timeout.
    let lock = rusqlite::Connection::open(r._dir.path().join("w.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let Rig { mut worker, s, .. } = r;
    let step = tokio::spawn(async move {
        let end = worker
            .step(Input::Provider(Some(ProviderEvent::Final(rec(
                1, "second", 10, 20,
            )))))
            .await;
        (worker, end)
    });
    tokio::time::sleep(Duration::from_millis(5_600)).await;
    assert!(!step.is_finished(), "the worker waits for the store");
    assert_eq!(
        s.read_after(1).events.len(),
        0,
        "an unstored event was visible"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    let (worker, end) = tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .expect("the retry succeeds once the lock is gone")
        .unwrap();
    assert_eq!(end, None);
    assert_eq!(s.read_after(1).events[0].text, "second");
    let stored = worker
        .ctx
        .store
        .events_after(&s.id.to_string(), 1)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
}
