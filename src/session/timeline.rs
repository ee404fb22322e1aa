//! When the audio of the current provider stream was handed to the provider, so a result can
//! be timed from the moment the audio it ends at was given (`voxpoll_provider_result_latency_
//! seconds`): for a final that is "end of the sentence's audio → its final", the latency a
//! speaker feels after they stop, minus the client's upload time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most entries kept: 10 minutes of 200 ms chunks without a final.
const MAX_ENTRIES: usize = 3000;

/// Sends of the current stream: (stream time the sent audio ends at in ms, when it was sent).
#[derive(Debug, Default)]
pub(super) struct Timeline {
    sent: VecDeque<(u64, Instant)>,
    end_ms: u64,
}

impl Timeline {
    /// `samples` (16 kHz) were handed to the provider now.
    pub fn sent(&mut self, samples: usize) {
        if samples == 0 {
            return;
        }
        self.end_ms += samples as u64 / 16;
        if self.sent.len() == MAX_ENTRIES {
            self.sent.pop_front();
        }
        self.sent.push_back((self.end_ms, Instant::now()));
    }

    /// A new stream starts at stream time 0.
    pub fn reset(&mut self) {
        self.sent.clear();
        self.end_ms = 0;
    }

    /// How long ago the audio up to `end_ms` (stream time) was handed over; `None` when it is
    /// not known (before any audio, or dropped). A final forgets the sends before its end.
    pub fn latency(&mut self, end_ms: u64, is_final: bool) -> Option<Duration> {
        let i = self.sent.partition_point(|&(e, _)| e < end_ms);
        let at = self.sent.get(i).or_else(|| self.sent.back())?.1;
        if is_final {
            self.sent.drain(..i);
        }
        Some(at.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_is_timed_from_the_send_that_covers_its_end() {
        let mut t = Timeline::default();
        assert_eq!(t.latency(100, false), None);
        t.sent(3200); // 0..200 ms
        std::thread::sleep(Duration::from_millis(30));
        t.sent(3200); // 200..400 ms
        let first = t.latency(150, false).unwrap();
        let second = t.latency(400, false).unwrap();
        assert!(first >= Duration::from_millis(30) && second < first);
        // A final drops what it covers; later results still find their send.
        assert!(t.latency(250, true).unwrap() < Duration::from_millis(30));
        assert_eq!(t.sent.len(), 1);
        assert!(t.latency(350, false).unwrap() < Duration::from_millis(30));
        t.reset();
        assert_eq!(t.latency(10, false), None);
    }
}
