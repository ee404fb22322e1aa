//! The audio a session's provider stream has been given since the last final result, kept so
//! a reopened stream (after a provider fault) or a resumed session (after a restart) can be
//! given it again, and the offsets that map the new stream's results back into session time
//! and sentence numbering.

use crate::provider::{ProviderInput, Recognition};
use std::collections::VecDeque;

/// Most audio kept, in samples (60 s at 16 kHz): a provider that finalises nothing for longer
/// gets only the last minute again.
const MAX_SAMPLES: usize = 60 * 16_000;

/// Samples per ms at 16 kHz.
const PER_MS: u64 = 16;

/// Replay state of one session.
#[derive(Debug, Default)]
pub(super) struct Replay {
    /// 16 kHz mono samples from `start_ms` (session time) to what was sent. A deque: the
    /// front is dropped as finals arrive without moving the rest.
    pcm: VecDeque<i16>,
    /// Session time where `pcm` starts: the end of the last final, ms.
    pub start_ms: u64,
    /// Session time where the current stream's time 0 is, ms.
    offset_ms: u64,
    /// Added to the current stream's sentence indices.
    sentence_base: u32,
    /// One past the highest sentence index finalised so far.
    next_sentence: u32,
    /// Provider failures since the last final result.
    pub failures: u32,
    /// Compressed frames go through as recorded (until a reopen switches the stream to PCM).
    pub pass_through: bool,
    /// Set for a session resumed after a restart: its replay is sent before anything else.
    pub resumed: bool,
}

impl Replay {
    /// A new session's replay; `pass_through` when its compressed audio goes to the provider
    /// as recorded.
    pub fn new(pass_through: bool) -> Self {
        Self {
            pass_through,
            ..Self::default()
        }
    }

    /// A resumed session's replay: `pcm` from `from_ms` of session time (the end of the last
    /// final), results numbered from `next_sentence`.
    pub fn resumed(pcm: &[i16], from_ms: u64, next_sentence: u32) -> Self {
        let mut r = Self {
            start_ms: from_ms,
            next_sentence,
            resumed: true,
            ..Self::default()
        };
        r.sent(pcm); // keeps at most the last minute, moving start_ms
        r.reopened();
        r
    }

    /// Records audio given to the stream.
    pub fn sent(&mut self, pcm: &[i16]) {
        self.pcm.extend(pcm);
        if self.pcm.len() > MAX_SAMPLES {
            let drop = self.pcm.len() - MAX_SAMPLES;
            self.pcm.drain(..drop);
            self.start_ms += drop as u64 / PER_MS;
        }
    }

    /// The kept audio in 1 s parts, for a new stream.
    pub fn parts(&self) -> Vec<ProviderInput> {
        let pcm: Vec<i16> = self.pcm.iter().copied().collect();
        pcm.chunks(16_000)
            .map(|p| ProviderInput::Audio(p.to_vec()))
            .collect()
    }

    /// A new stream starts at the kept audio: its time 0 is `start_ms`, its sentence 0 the
    /// next sentence; it takes PCM.
    pub fn reopened(&mut self) {
        self.pass_through = false;
        self.offset_ms = self.start_ms;
        self.sentence_base = self.next_sentence;
    }

    /// Maps a result of the current stream into session time and sentence numbering.
    pub fn map(&self, mut r: Recognition) -> Recognition {
        let off = self.offset_ms;
        // Saturating: the numbers come from an upstream.
        r.sentence = r.sentence.saturating_add(self.sentence_base);
        r.start_ms = r.start_ms.saturating_add(off);
        r.end_ms = r.end_ms.saturating_add(off);
        if let Some(words) = r.words.as_mut() {
            for w in words {
                w.start_ms = w.start_ms.saturating_add(off);
                w.end_ms = w.end_ms.saturating_add(off);
            }
        }
        r
    }

    /// A final result (already mapped): the audio before its end will never be replayed.
    pub fn finalised(&mut self, r: &Recognition) {
        self.next_sentence = self.next_sentence.max(r.sentence.saturating_add(1));
        self.failures = 0;
        if r.end_ms > self.start_ms {
            let drop = usize::try_from((r.end_ms - self.start_ms).saturating_mul(PER_MS))
                .unwrap_or(usize::MAX);
            self.pcm.drain(..drop.min(self.pcm.len()));
            self.start_ms = r.end_ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fin(sentence: u32, end_ms: u64) -> Recognition {
        Recognition {
            sentence,
            text: "x".into(),
            start_ms: 0,
            end_ms,
            words: None,
        }
    }

    #[test]
    fn finals_drop_what_they_cover_and_a_reopen_maps_from_there() {
        let mut r = Replay::new(true);
        r.sent(&[1; 3200]); // 200 ms
        r.finalised(&fin(0, 50));
        assert_eq!((r.start_ms, r.pcm.len()), (50, 2400));
        r.reopened();
        assert!(!r.pass_through);
        let m = r.map(fin(0, 10));
        assert_eq!((m.sentence, m.end_ms), (1, 60));
        assert_eq!(r.parts().len(), 1);
    }

    #[test]
    fn at_most_a_minute_is_kept() {
        let mut r = Replay::resumed(&vec![0; MAX_SAMPLES + 16_000], 1_000, 4);
        assert_eq!(r.pcm.len(), MAX_SAMPLES);
        assert_eq!(r.start_ms, 2_000);
        assert_eq!(r.map(fin(0, 0)).sentence, 4);
        assert_eq!(r.map(fin(0, 0)).end_ms, 2_000);
        r.sent(&[0; 16]);
        assert_eq!(r.start_ms, 2_001);
    }
}
