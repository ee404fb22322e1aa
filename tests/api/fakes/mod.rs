//! Local fake ASR servers that speak each provider's documented protocol byte for byte
//! (shared/providers.md §1.11, §2.5, §3.7, §4.7). They verify signatures, enforce pacing and
//! idle limits, and answer with scripted results computed from the audio they receive, so tests
//! can check that nothing was lost or reordered on the way.

pub mod funasr;
pub mod openai;
pub mod tc3;
pub mod tencent;

/// Energy segmentation shared by the fakes: 30 ms frames, a frame is voiced when its RMS exceeds
/// 200; a sentence ends after 300 ms without voice. Texts encode the voiced duration, so the
/// transcript is a pure function of the audio.
pub struct Scripter {
    pending: Vec<i16>,
    pos_ms: u64,
    sentence: u32,
    open: Option<Open>,
}

struct Open {
    start_ms: u64,
    voiced_ms: u64,
    last_voice_ms: u64,
    last_partial_ms: u64,
}

/// What a scripted recogniser reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Sentence started (Tencent slice_type 0).
    Begin { index: u32, start_ms: u64 },
    /// Text so far (every 600 ms of voice).
    Partial {
        index: u32,
        start_ms: u64,
        end_ms: u64,
        text: String,
    },
    /// Sentence done.
    Final {
        index: u32,
        start_ms: u64,
        end_ms: u64,
        text: String,
    },
}

/// Final text of a sentence with `voiced_ms` of voice.
pub fn sentence_text(index: u32, voiced_ms: u64) -> String {
    format!("第{index}句{voiced_ms}毫秒")
}

impl Default for Scripter {
    fn default() -> Self {
        Self::new()
    }
}

impl Scripter {
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            pos_ms: 0,
            sentence: 0,
            open: None,
        }
    }

    /// Audio position, ms.
    pub fn pos_ms(&self) -> u64 {
        self.pos_ms
    }

    pub fn push(&mut self, pcm: &[i16]) -> Vec<Out> {
        self.pending.extend_from_slice(pcm);
        let mut out = Vec::new();
        while self.pending.len() >= 480 {
            let frame: Vec<i16> = self.pending.drain(..480).collect();
            let rms = (frame.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / 480.0).sqrt();
            let start = self.pos_ms;
            self.pos_ms += 30;
            if rms > 200.0 {
                let open = self.open.get_or_insert_with(|| {
                    out.push(Out::Begin {
                        index: self.sentence,
                        start_ms: start,
                    });
                    Open {
                        start_ms: start,
                        voiced_ms: 0,
                        last_voice_ms: start,
                        last_partial_ms: 0,
                    }
                });
                open.voiced_ms += 30;
                open.last_voice_ms = self.pos_ms;
                if open.voiced_ms >= open.last_partial_ms + 600 {
                    open.last_partial_ms = open.voiced_ms;
                    out.push(Out::Partial {
                        index: self.sentence,
                        start_ms: open.start_ms,
                        end_ms: self.pos_ms,
                        text: format!("第{}句{}", self.sentence, open.voiced_ms),
                    });
                }
            } else if self
                .open
                .as_ref()
                .is_some_and(|o| self.pos_ms - o.last_voice_ms >= 300)
            {
                out.extend(self.close());
            }
        }
        out
    }

    pub fn finish(&mut self) -> Vec<Out> {
        self.close().into_iter().collect()
    }

    fn close(&mut self) -> Option<Out> {
        let o = self.open.take()?;
        let i = self.sentence;
        self.sentence += 1;
        Some(Out::Final {
            index: i,
            start_ms: o.start_ms,
            end_ms: o.last_voice_ms,
            text: sentence_text(i, o.voiced_ms),
        })
    }
}

/// s16le bytes → samples.
pub fn samples(bytes: &[u8]) -> Vec<i16> {
    bytes
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect()
}

/// A 300 Hz tone of `ms` at amplitude 3000 (never an all-zero frame), 16 kHz.
pub fn tone(ms: u64) -> Vec<i16> {
    (0..ms * 16)
        .map(|i| {
            let t = i as f64 / 16_000.0;
            (3000.0 * (2.0 * std::f64::consts::PI * 300.0 * t).sin()).round() as i16 + 1
        })
        .map(|s| if s == 0 { 1 } else { s })
        .collect()
}
