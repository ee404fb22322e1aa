//! Chunk reassembly in `seq` order (shared/api.md, `POST …/audio`): an identical duplicate is a
//! no-op, a different body for a known seq is a conflict, a seq ahead of the next expected one
//! but inside the window is buffered, beyond it is rejected; accepted bytes are bounded.
//! A sentence end requested after chunk N (`POST …/finalize?seq=N`) is handed out right
//! after that chunk, whichever order the two requests arrive in.

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// What [`Ingest::take_ready`] hands out, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// The next chunk's bytes.
    Chunk(Bytes),
    /// The client asked for the current sentence to end here.
    SentenceEnd,
}

/// Outcome of offering a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// New chunk stored.
    New,
    /// Same seq and bytes as before: nothing changed.
    Duplicate,
}

/// Why a chunk was refused. Nothing is stored when a chunk is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// 409 `seq_conflict`.
    #[error("seq {seq} was already received with different bytes")]
    Conflict {
        /// The offending seq.
        seq: u64,
    },
    /// 409 `seq_out_of_window`.
    #[error(
        "seq {seq} is beyond the reorder window: next expected seq is {expected}, window {window}"
    )]
    OutOfWindow {
        /// The offending seq.
        seq: u64,
        /// Next contiguous seq the server waits for.
        expected: u64,
        /// Window size in chunks.
        window: u64,
    },
    /// 409 `seq_after_last`.
    #[error("seq {seq} comes after the last chunk (seq {last})")]
    AfterLast {
        /// The offending seq.
        seq: u64,
        /// Seq of the chunk that ended the audio.
        last: u64,
    },
    /// 429 `backpressure`.
    #[error("session buffer full ({buffered} of {max} bytes not yet consumed); retry shortly")]
    Backpressure {
        /// Bytes currently held.
        buffered: usize,
        /// Limit.
        max: usize,
    },
}

/// Per-session reassembly state.
#[derive(Debug)]
pub struct Ingest {
    next_seq: u64,
    window: u64,
    max_buffered: usize,
    /// Digest of every chunk accepted so far, by seq (XXH3-128: a retry is told from a
    /// conflicting chunk by it; a crafted collision could only fool the client's own session,
    /// so it need not be cryptographic, and SHA-256 cost 4.5 % of chunk ingest's CPU).
    digests: HashMap<u64, [u8; 16]>,
    pending: BTreeMap<u64, Bytes>,
    ready: VecDeque<Bytes>,
    buffered: usize,
    /// Set by `last=1` or finish: the seq of the final chunk (`None` with `finish` = no audio).
    end_seq: Option<u64>,
    finish: bool,
    bytes_total: u64,
    /// Seqs after which a sentence end was requested, not yet handed out (at most `window`).
    sentence_ends: BTreeSet<u64>,
}

fn digest(b: &[u8]) -> [u8; 16] {
    xxhash_rust::xxh3::xxh3_128(b).to_le_bytes()
}

impl Ingest {
    /// Empty state with a reorder `window` (chunks) and a cap on held bytes.
    pub fn new(window: u64, max_buffered: usize) -> Self {
        Self {
            next_seq: 0,
            window: window.max(1),
            max_buffered,
            digests: HashMap::new(),
            pending: BTreeMap::new(),
            ready: VecDeque::new(),
            buffered: 0,
            end_seq: None,
            finish: false,
            bytes_total: 0,
            sentence_ends: BTreeSet::new(),
        }
    }

    /// Highest seq such that every chunk ≤ it was received (`None` before chunk 0).
    pub fn acked_seq(&self) -> Option<u64> {
        self.next_seq.checked_sub(1)
    }

    /// Next contiguous seq expected.
    pub fn expected(&self) -> u64 {
        self.next_seq
    }

    /// Bytes accepted in total.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Offers chunk `seq`; `last` marks it as the final chunk.
    ///
    /// # Errors
    /// See [`IngestError`]; a refused chunk changes nothing.
    pub fn offer(&mut self, seq: u64, body: Bytes, last: bool) -> Result<Accepted, IngestError> {
        let d = digest(&body);
        if let Some(prev) = self.digests.get(&seq) {
            if *prev != d {
                return Err(IngestError::Conflict { seq });
            }
            if last && self.end_seq.is_some_and(|e| e != seq) {
                return Err(IngestError::Conflict { seq });
            }
            if last && !self.finish {
                self.end_seq = Some(seq);
                self.finish = true;
            }
            return Ok(Accepted::Duplicate);
        }
        if let Some(end) = self.end_seq {
            if seq > end {
                return Err(IngestError::AfterLast { seq, last: end });
            }
        }
        if seq >= self.next_seq.saturating_add(self.window) {
            return Err(IngestError::OutOfWindow {
                seq,
                expected: self.next_seq,
                window: self.window,
            });
        }
        if last {
            if let Some((&max, _)) = self.pending.last_key_value() {
                if max > seq {
                    return Err(IngestError::AfterLast {
                        seq: max,
                        last: seq,
                    });
                }
            }
        }
        if self.buffered + body.len() > self.max_buffered {
            return Err(IngestError::Backpressure {
                buffered: self.buffered,
                max: self.max_buffered,
            });
        }
        self.digests.insert(seq, d);
        self.buffered += body.len();
        self.bytes_total += body.len() as u64;
        self.pending.insert(seq, body);
        if last {
            self.end_seq = Some(seq);
            self.finish = true;
        }
        while let Some(b) = self.pending.remove(&self.next_seq) {
            self.ready.push_back(b);
            self.next_seq += 1;
        }
        Ok(Accepted::New)
    }

    /// Whether `seq` was already accepted with exactly these bytes (changes nothing).
    pub fn is_duplicate(&self, seq: u64, body: &[u8]) -> bool {
        self.digests.get(&seq).is_some_and(|d| *d == digest(body))
    }

    /// Ends the audio at the highest seq received so far (finish without `last=1`).
    pub fn request_finish(&mut self) {
        if self.finish {
            return;
        }
        self.finish = true;
        let highest = self
            .pending
            .last_key_value()
            .map(|(&k, _)| k)
            .or(self.acked_seq());
        self.end_seq = highest;
    }

    /// Whether finish was requested (by `last=1` or finish).
    pub fn finish_requested(&self) -> bool {
        self.finish
    }

    /// Whether every chunk up to the end has arrived and been handed out by [`Ingest::take_ready`].
    pub fn input_complete(&self) -> bool {
        self.finish && self.ready.is_empty() && self.end_seq.is_none_or(|e| self.next_seq > e)
    }

    /// Requests that the current sentence end after chunk `seq` (default: the highest
    /// contiguous seq received, [`Ingest::acked_seq`]); returns the seq it will end after, `None` when no audio was received
    /// yet (there is no sentence to end). Idempotent per seq; a seq already handed out ends the
    /// sentence at once.
    ///
    /// # Errors
    /// [`IngestError::OutOfWindow`] for a seq beyond the reorder window,
    /// [`IngestError::AfterLast`] for one after the last chunk.
    pub fn request_sentence_end(&mut self, seq: Option<u64>) -> Result<Option<u64>, IngestError> {
        let Some(seq) = seq.or(self.acked_seq()) else {
            return Ok(None);
        };
        if let Some(last) = self.end_seq.filter(|&last| seq > last) {
            return Err(IngestError::AfterLast { seq, last });
        }
        if seq >= self.next_seq.saturating_add(self.window) {
            return Err(IngestError::OutOfWindow {
                seq,
                expected: self.next_seq,
                window: self.window,
            });
        }
        // Ends already due collapse into one: the set stays within the window.
        let handed_out = self.next_seq - self.ready.len() as u64;
        let at = seq.max(handed_out.saturating_sub(1));
        self.sentence_ends.insert(at);
        Ok(Some(seq))
    }

    /// Hands out the contiguous chunks not yet consumed, in order, with the sentence ends
    /// requested after them.
    pub fn take_ready(&mut self) -> Vec<Ready> {
        let first = self.next_seq - self.ready.len() as u64;
        let mut out = Vec::with_capacity(self.ready.len() + 1);
        // An end after a chunk handed out earlier is due now.
        if self.sentence_ends.first().is_some_and(|&e| e < first) {
            self.sentence_ends.retain(|&e| e >= first);
            out.push(Ready::SentenceEnd);
        }
        for (seq, b) in (first..).zip(self.ready.drain(..)) {
            self.buffered -= b.len();
            out.push(Ready::Chunk(b));
            if self.sentence_ends.remove(&seq) {
                out.push(Ready::SentenceEnd);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_string())
    }

    fn c(s: &str) -> Ready {
        Ready::Chunk(b(s))
    }

    #[test]
    fn a_sentence_end_follows_its_chunk_in_either_arrival_order() {
        let mut i = Ingest::new(4, 1000);
        assert_eq!(
            i.request_sentence_end(None),
            Ok(None),
            "no audio: nothing to end"
        );
        i.offer(0, b("a"), false).unwrap();
        // Before its chunk arrives (the finalize overtook the upload).
        assert_eq!(i.request_sentence_end(Some(1)), Ok(Some(1)));
        assert_eq!(i.take_ready(), vec![c("a")]);
        i.offer(1, b("b"), false).unwrap();
        i.offer(2, b("c"), false).unwrap();
        assert_eq!(i.take_ready(), vec![c("b"), Ready::SentenceEnd, c("c")]);
        // After its chunk was handed out: at once, once, however often it is asked.
        assert_eq!(i.request_sentence_end(None), Ok(Some(2)));
        assert_eq!(i.request_sentence_end(Some(0)), Ok(Some(0)));
        assert_eq!(i.take_ready(), vec![Ready::SentenceEnd]);
        assert_eq!(i.take_ready(), vec![]);
        // Bounded like chunks.
        assert!(matches!(
            i.request_sentence_end(Some(7)),
            Err(IngestError::OutOfWindow { seq: 7, .. })
        ));
        i.offer(3, b("d"), true).unwrap();
        assert_eq!(
            i.request_sentence_end(Some(4)),
            Err(IngestError::AfterLast { seq: 4, last: 3 })
        );
    }

    #[test]
    fn in_order_chunks_become_ready() {
        let mut i = Ingest::new(4, 1000);
        assert_eq!(i.offer(0, b("a"), false), Ok(Accepted::New));
        assert_eq!(i.offer(1, b("b"), false), Ok(Accepted::New));
        assert_eq!(i.acked_seq(), Some(1));
        assert_eq!(i.take_ready(), vec![c("a"), c("b")]);
    }

    #[test]
    fn out_of_order_within_window_is_buffered_then_released() {
        let mut i = Ingest::new(4, 1000);
        assert_eq!(i.offer(2, b("c"), false), Ok(Accepted::New));
        assert_eq!(i.offer(1, b("b"), false), Ok(Accepted::New));
        assert_eq!(i.acked_seq(), None);
        assert!(i.take_ready().is_empty());
        i.offer(0, b("a"), false).unwrap();
        assert_eq!(i.acked_seq(), Some(2));
        assert_eq!(i.take_ready(), vec![c("a"), c("b"), c("c")]);
    }

    #[test]
    fn duplicates_conflicts_and_window_edges() {
        let mut i = Ingest::new(4, 1000);
        i.offer(0, b("a"), false).unwrap();
        assert_eq!(i.offer(0, b("a"), false), Ok(Accepted::Duplicate));
        assert_eq!(
            i.offer(0, b("x"), false),
            Err(IngestError::Conflict { seq: 0 })
        );
        // next expected is 1; window 4 → seqs 1..=4 accepted, 5 rejected
        assert_eq!(i.offer(4, b("e"), false), Ok(Accepted::New));
        assert_eq!(
            i.offer(5, b("f"), false),
            Err(IngestError::OutOfWindow {
                seq: 5,
                expected: 1,
                window: 4
            })
        );
        assert_eq!(i.offer(4, b("e"), false), Ok(Accepted::Duplicate));
    }

    #[test]
    fn last_ends_the_audio_once_gaps_fill() {
        let mut i = Ingest::new(4, 1000);
        i.offer(1, b("b"), true).unwrap();
        assert!(i.finish_requested());
        assert!(!i.input_complete());
        assert_eq!(
            i.offer(2, b("c"), false),
            Err(IngestError::AfterLast { seq: 2, last: 1 })
        );
        i.offer(0, b("a"), false).unwrap();
        i.take_ready();
        assert!(i.input_complete());
    }

    #[test]
    fn finish_without_audio_is_complete() {
        let mut i = Ingest::new(4, 1000);
        i.request_finish();
        assert!(i.input_complete());
    }

    #[test]
    fn backpressure_refuses_without_storing() {
        let mut i = Ingest::new(4, 3);
        i.offer(0, b("ab"), false).unwrap();
        assert!(matches!(
            i.offer(1, b("cd"), false),
            Err(IngestError::Backpressure { .. })
        ));
        assert_eq!(i.acked_seq(), Some(0));
        i.take_ready();
        assert_eq!(i.offer(1, b("cd"), false), Ok(Accepted::New));
    }
}
