//! Segmenters of every stream, run by one shared thread instead of a thread per stream.
//!
//! webrtc-vad's detector is not `Send` (it holds a raw pointer to libfvad's state), so a
//! [`Segmenter`] cannot live inside a task that the async runtime may move between threads, and
//! this crate forbids `unsafe` code that would assert otherwise. Each segmenter therefore lives on
//! the pool's thread, in a map keyed by stream, and a stream's task sends it work and awaits the
//! segments ([`StreamSegmenter::run`]). The thread only segments: it never waits for a session,
//! so a session that stops reading holds its own task, not the thread. With many streams the
//! thread takes whatever work is queued in one wake-up, where a thread per stream had to be woken
//! (a context switch) for every chunk of every stream.
//!
//! Cost: webrtc-vad runs at well over 1,000× real time on one core, so one thread serves every
//! stream a 2-core host can decode.

use super::vad::{Segment, Segmenter, SegmenterConfig};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::OnceLock;
use tokio::sync::oneshot;

/// What a stream asks of its segmenter.
#[derive(Debug)]
pub enum Op {
    /// [`Segmenter::push`] these 16 kHz mono samples.
    Push(Vec<i16>),
    /// [`Segmenter::cut`]: end the open utterance now.
    Cut,
    /// [`Segmenter::finish`]: the stream's audio is complete.
    Finish,
}

enum Job {
    Run {
        stream: u64,
        cfg: SegmenterConfig,
        op: Op,
        reply: oneshot::Sender<Vec<Segment>>,
    },
    Close {
        stream: u64,
    },
}

/// The sender to the pool's thread, which starts with the first stream that sends work.
fn pool() -> Result<&'static std_mpsc::Sender<Job>, String> {
    static POOL: OnceLock<Result<std_mpsc::Sender<Job>, String>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = std_mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vad-segmenters".into())
            .spawn(move || serve(&rx))
            .map_err(|e| format!("cannot start the VAD thread: {e}"))?;
        Ok(tx)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The thread: runs each job on its stream's segmenter (made by its first job), in order.
fn serve(rx: &std_mpsc::Receiver<Job>) {
    let mut segmenters: HashMap<u64, Segmenter> = HashMap::new();
    while let Ok(job) = rx.recv() {
        match job {
            Job::Run {
                stream,
                cfg,
                op,
                reply,
            } => {
                let seg = segmenters
                    .entry(stream)
                    .or_insert_with(|| Segmenter::new(cfg));
                let segs = match op {
                    Op::Push(pcm) => seg.push(&pcm),
                    Op::Cut => seg.cut(),
                    Op::Finish => seg.finish(),
                };
                // The stream may be gone meanwhile: its Close follows.
                let _ = reply.send(segs);
            }
            Job::Close { stream } => {
                segmenters.remove(&stream);
            }
        }
    }
}

/// One stream's segmenter on the pool's thread. Dropping it frees the segmenter.
pub struct StreamSegmenter {
    id: u64,
    cfg: SegmenterConfig,
    /// The pool's sender, once the stream has sent work (an idle stream costs nothing there).
    tx: Option<std_mpsc::Sender<Job>>,
}

impl StreamSegmenter {
    /// A segmenter with `cfg` for a new stream; made on the thread by its first [`Self::run`].
    pub fn new(cfg: SegmenterConfig) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            cfg,
            tx: None,
        }
    }

    /// Runs `op` on this stream's segmenter; the segments it produced, in order.
    ///
    /// # Errors
    /// The pool's thread cannot be started or has stopped (it only stops with the process).
    pub async fn run(&mut self, op: Op) -> Result<Vec<Segment>, String> {
        if self.tx.is_none() {
            self.tx = Some(pool()?.clone());
        }
        let (reply, answer) = oneshot::channel();
        let job = Job::Run {
            stream: self.id,
            cfg: self.cfg,
            op,
            reply,
        };
        let gone = || "the VAD thread has stopped".to_string();
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }
}

impl Drop for StreamSegmenter {
    fn drop(&mut self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Close { stream: self.id });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::vad::tests::{finals, voice};

    fn cfg() -> SegmenterConfig {
        SegmenterConfig {
            silence_ms: 600,
            min_voiced_ms: 300,
            partial_interval_ms: 0,
            first_partial_ms: 0,
            early_final_ms: 0,
        }
    }

    /// Streams interleaved on the shared thread each keep their own state: the same audio cut
    /// into chunks gives each the utterances a segmenter of its own gives.
    #[tokio::test]
    async fn interleaved_streams_segment_as_if_alone() {
        let mut audio = vec![0i16; 8_000];
        audio.extend(voice(1500));
        audio.extend(vec![0i16; 16_000]);
        audio.extend(voice(1000));
        audio.extend(vec![0i16; 16_000]);
        let mut alone = Segmenter::new(cfg());
        let mut expected = alone.push(&audio);
        expected.extend(alone.finish());
        let expected = finals(&expected);
        assert_eq!(expected.len(), 2, "{expected:?}");

        let mut streams: Vec<StreamSegmenter> =
            (0..3).map(|_| StreamSegmenter::new(cfg())).collect();
        let mut got: Vec<Vec<Segment>> = (0..streams.len()).map(|_| Vec::new()).collect();
        // Stream i runs i chunks behind stream 0, so their utterances end at different places
        // in the interleaving.
        let chunks: Vec<&[i16]> = audio.chunks(3200).collect();
        for step in 0..chunks.len() + streams.len() {
            for (i, s) in streams.iter_mut().enumerate() {
                if let Some(c) = step.checked_sub(i).and_then(|k| chunks.get(k)) {
                    got[i].extend(s.run(Op::Push(c.to_vec())).await.unwrap());
                }
            }
        }
        for (i, s) in streams.iter_mut().enumerate() {
            got[i].extend(s.run(Op::Finish).await.unwrap());
            assert_eq!(finals(&got[i]), expected, "stream {i}");
        }
    }
}
