//! Voice-activity segmentation of a 16 kHz mono stream into utterances (webrtc-vad, aggressive
//! mode, 30 ms frames), per shared/embedded-asr.md "Decoding settings": skip utterances with
//! less than ~300 ms voiced, end one after `silence_ms` of non-speech, split at 30 s.
//!
//! `webrtc_vad::Vad` wraps a raw pointer and is not `Send`, so a [`Segmenter`] lives on one
//! thread for its whole life: the shared VAD thread of [`super::vad_pool`], which runs every
//! stream's segmenter.

use super::TARGET_RATE;
use std::collections::VecDeque;
use webrtc_vad::{SampleRate, Vad, VadMode};

/// Samples per VAD frame (30 ms at 16 kHz).
pub const FRAME: usize = 480;
const FRAME_MS: u64 = 30;
/// Audio kept before the first voiced frame, so word onsets are not clipped.
const PREROLL_FRAMES: usize = 10;
/// Utterances are cut here (Whisper's window is 30 s).
pub const MAX_UTTERANCE_MS: u64 = 29_000;

/// Segmentation settings.
#[derive(Debug, Clone, Copy)]
pub struct SegmenterConfig {
    /// Non-speech that ends an utterance, in ms.
    pub silence_ms: u64,
    /// Minimum voiced audio for an utterance to be decoded, in ms.
    pub min_voiced_ms: u64,
    /// Audio between partial snapshots of the open utterance, in ms (0: no partials).
    pub partial_interval_ms: u64,
    /// Audio from an utterance's first voiced frame to its first partial snapshot, in ms (at
    /// most `partial_interval_ms`; the snapshot also waits for `min_voiced_ms` of speech).
    pub first_partial_ms: u64,
    /// Non-speech after which the open utterance is offered as [`Segment::Tentative`], so its
    /// final can be decoded while `silence_ms` is confirmed, in ms (0: never).
    pub early_final_ms: u64,
}

/// What the segmenter asks its owner to do.
#[derive(Debug)]
pub enum Segment {
    /// An utterance has reached `min_voiced_ms` of speech: it will become a final (a blip
    /// shorter than that never does and is never announced).
    Start {
        /// Utterance index in this stream, from 0.
        utterance: u32,
        /// Stream time of the utterance's first sample (its pre-roll included), ms.
        start_ms: u64,
    },
    /// A snapshot of the utterance in progress, for a partial result.
    Partial {
        /// Utterance index in this stream, from 0.
        utterance: u32,
        /// Samples from the utterance start to now.
        pcm: Vec<i16>,
        /// Stream time of the first sample, ms.
        start_ms: u64,
        /// Stream time of the last sample, ms.
        end_ms: u64,
    },
    /// The utterance as it stands after `early_final_ms` of non-speech: it becomes a final
    /// unchanged unless [`Segment::Resumed`] follows. Decoding it now lets the final be
    /// published as soon as the silence is confirmed.
    Tentative {
        /// Utterance index in this stream, from 0.
        utterance: u32,
        /// The utterance's samples so far.
        pcm: Vec<i16>,
        /// Stream time of the first sample, ms.
        start_ms: u64,
        /// Stream time of the last sample, ms.
        end_ms: u64,
    },
    /// Speech resumed after a [`Segment::Tentative`]: that snapshot will not be the final.
    Resumed {
        /// Utterance index in this stream, from 0.
        utterance: u32,
    },
    /// A complete utterance, for a final result.
    Final {
        /// Utterance index in this stream, from 0.
        utterance: u32,
        /// The utterance's samples.
        pcm: Vec<i16>,
        /// Stream time of the first sample, ms.
        start_ms: u64,
        /// Stream time of the last sample, ms.
        end_ms: u64,
        /// No speech came after the last [`Segment::Tentative`] of this utterance: its decode
        /// stands for this final (the samples differ only by trailing non-speech).
        tentative_holds: bool,
    },
}

/// Streaming utterance segmenter. Feed samples with [`Segmenter::push`]; call
/// [`Segmenter::finish`] at the end of the stream.
pub struct Segmenter {
    vad: Vad,
    cfg: SegmenterConfig,
    frame: Vec<i16>,
    preroll: VecDeque<Vec<i16>>,
    /// Samples of the open utterance (empty when none is open).
    utterance: Vec<i16>,
    utterance_start: u64,
    voiced_ms: u64,
    silence_run_ms: u64,
    since_partial_ms: u64,
    /// Samples consumed so far (stream clock).
    samples: u64,
    /// Stream position at the end of the last voiced frame (the end of speech).
    last_voiced: u64,
    next_index: u32,
    /// A [`Segment::Tentative`] was offered during the current run of non-speech.
    tentative: bool,
    /// [`Segment::Start`] was offered for the open utterance.
    announced: bool,
}

impl Segmenter {
    /// A segmenter with webrtc-vad in its most aggressive mode.
    pub fn new(cfg: SegmenterConfig) -> Self {
        let mut vad = Vad::new_with_rate(SampleRate::Rate16kHz);
        vad.set_mode(VadMode::VeryAggressive);
        Self {
            vad,
            cfg,
            frame: Vec::with_capacity(FRAME),
            preroll: VecDeque::new(),
            utterance: Vec::new(),
            utterance_start: 0,
            voiced_ms: 0,
            silence_run_ms: 0,
            since_partial_ms: 0,
            samples: 0,
            last_voiced: 0,
            next_index: 0,
            tentative: false,
            announced: false,
        }
    }

    /// Stream time consumed so far, in ms.
    pub fn position_ms(&self) -> u64 {
        self.samples * 1000 / u64::from(TARGET_RATE)
    }

    /// Consumes samples; returns the partial snapshots and finished utterances they produced.
    pub fn push(&mut self, pcm: &[i16]) -> Vec<Segment> {
        let mut out = Vec::new();
        for &s in pcm {
            self.frame.push(s);
            if self.frame.len() == FRAME {
                let frame = std::mem::replace(&mut self.frame, Vec::with_capacity(FRAME));
                self.on_frame(frame, &mut out);
            }
        }
        out
    }

    /// Ends the stream: the open utterance (if voiced enough) becomes a final.
    pub fn finish(&mut self) -> Vec<Segment> {
        let mut out = Vec::new();
        if !self.frame.is_empty() && !self.utterance.is_empty() {
            let rest = std::mem::take(&mut self.frame);
            self.samples += rest.len() as u64;
            self.utterance.extend(rest);
        }
        self.close_utterance(&mut out);
        out
    }

    /// Ends the open utterance here, as its closing silence would (a client's finalize): a
    /// [`Segment::Final`] if it has `min_voiced_ms` of speech, else nothing. The stream goes on;
    /// the next speech opens the next utterance.
    pub fn cut(&mut self) -> Vec<Segment> {
        let mut out = Vec::new();
        self.close_utterance(&mut out);
        out
    }

    fn on_frame(&mut self, frame: Vec<i16>, out: &mut Vec<Segment>) {
        let voiced = self.vad.is_voice_segment(&frame).unwrap_or(false);
        let frame_start = self.samples;
        self.samples += frame.len() as u64;
        if voiced {
            self.last_voiced = self.samples;
        }
        if self.utterance.is_empty() {
            if voiced {
                let pre: usize = self.preroll.iter().map(Vec::len).sum();
                self.utterance_start = frame_start - pre as u64;
                for f in self.preroll.drain(..) {
                    self.utterance.extend(f);
                }
                self.utterance.extend(frame);
                self.voiced_ms = FRAME_MS;
                self.silence_run_ms = 0;
                self.announce(out);
                self.since_partial_ms = self
                    .cfg
                    .partial_interval_ms
                    .saturating_sub(self.cfg.first_partial_ms);
            } else {
                self.preroll.push_back(frame);
                if self.preroll.len() > PREROLL_FRAMES {
                    self.preroll.pop_front();
                }
            }
            return;
        }
        self.utterance.extend(frame);
        self.since_partial_ms += FRAME_MS;
        if voiced {
            self.voiced_ms += FRAME_MS;
            self.silence_run_ms = 0;
            self.announce(out);
            if std::mem::take(&mut self.tentative) {
                out.push(Segment::Resumed {
                    utterance: self.next_index,
                });
            }
        } else {
            self.silence_run_ms += FRAME_MS;
        }
        let len_ms = self.utterance.len() as u64 * 1000 / u64::from(TARGET_RATE);
        if self.silence_run_ms >= self.cfg.silence_ms || len_ms >= MAX_UTTERANCE_MS {
            self.close_utterance(out);
        } else if self.cfg.early_final_ms > 0
            && !self.tentative
            && self.silence_run_ms >= self.cfg.early_final_ms
            && self.voiced_ms >= self.cfg.min_voiced_ms
        {
            self.tentative = true;
            out.push(Segment::Tentative {
                utterance: self.next_index,
                pcm: self.utterance.clone(),
                start_ms: self.utterance_start * 1000 / u64::from(TARGET_RATE),
                end_ms: self.position_ms(),
            });
        } else if !self.tentative
            && self.cfg.partial_interval_ms > 0
            && self.since_partial_ms >= self.cfg.partial_interval_ms
            && self.voiced_ms >= self.cfg.min_voiced_ms
        {
            self.since_partial_ms = 0;
            out.push(Segment::Partial {
                utterance: self.next_index,
                pcm: self.utterance.clone(),
                start_ms: self.utterance_start * 1000 / u64::from(TARGET_RATE),
                end_ms: self.position_ms(),
            });
        }
    }

    /// Offers [`Segment::Start`] once the open utterance has `min_voiced_ms` of speech.
    fn announce(&mut self, out: &mut Vec<Segment>) {
        if !self.announced && self.voiced_ms >= self.cfg.min_voiced_ms {
            self.announced = true;
            out.push(Segment::Start {
                utterance: self.next_index,
                start_ms: self.utterance_start * 1000 / u64::from(TARGET_RATE),
            });
        }
    }

    fn close_utterance(&mut self, out: &mut Vec<Segment>) {
        if self.utterance.is_empty() {
            return;
        }
        let pcm = std::mem::take(&mut self.utterance);
        let start_ms = self.utterance_start * 1000 / u64::from(TARGET_RATE);
        // The sentence ends where speech ended, not where the silence that closed it did.
        let end_ms = self.last_voiced.max(self.utterance_start) * 1000 / u64::from(TARGET_RATE);
        if self.voiced_ms >= self.cfg.min_voiced_ms {
            out.push(Segment::Final {
                utterance: self.next_index,
                pcm,
                start_ms,
                end_ms,
                tentative_holds: self.tentative,
            });
            self.next_index += 1;
        }
        self.tentative = false;
        self.announced = false;
        self.voiced_ms = 0;
        self.silence_run_ms = 0;
        self.since_partial_ms = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn cfg() -> SegmenterConfig {
        SegmenterConfig {
            silence_ms: 600,
            min_voiced_ms: 300,
            partial_interval_ms: 1000,
            first_partial_ms: 1000,
            early_final_ms: 0,
        }
    }

    /// The finals among `segs`: (utterance, start ms, end ms).
    pub(crate) fn finals(segs: &[Segment]) -> Vec<(u32, u64, u64)> {
        segs.iter()
            .filter_map(|s| match s {
                Segment::Final {
                    utterance,
                    start_ms,
                    end_ms,
                    ..
                } => Some((*utterance, *start_ms, *end_ms)),
                _ => None,
            })
            .collect()
    }

    /// A vowel-like harmonic tone: webrtc-vad's GMM calls it speech, unlike a pure sine.
    pub(crate) fn voice(ms: u64) -> Vec<i16> {
        let n = ms * 16;
        (0..n)
            .map(|i| {
                let t = i as f32 / 16_000.0;
                let f0 = 140.0 + 20.0 * (t * 3.0).sin();
                let mut v = 0.0;
                for h in 1..=12 {
                    let amp = 1.0 / h as f32 * if (2..=4).contains(&h) { 2.0 } else { 1.0 };
                    v += amp * (2.0 * std::f32::consts::PI * f0 * h as f32 * t).sin();
                }
                (v * 3000.0) as i16
            })
            .collect()
    }

    #[test]
    fn silence_produces_nothing() {
        let mut s = Segmenter::new(cfg());
        let mut out = s.push(&vec![0i16; 16_000 * 5]);
        out.extend(s.finish());
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn voice_between_silences_is_one_final_with_partials() {
        let mut s = Segmenter::new(cfg());
        let mut pcm = vec![0i16; 16_000];
        pcm.extend(voice(2500));
        pcm.extend(vec![0i16; 16_000]);
        let out = s.push(&pcm);
        let finals: Vec<_> = out
            .iter()
            .filter(|x| matches!(x, Segment::Final { .. }))
            .collect();
        let partials = out
            .iter()
            .filter(|x| matches!(x, Segment::Partial { .. }))
            .count();
        assert_eq!(finals.len(), 1, "{out:?}");
        assert!(partials >= 1);
        if let Segment::Final {
            start_ms, end_ms, ..
        } = finals[0]
        {
            assert!((600..=1000).contains(start_ms), "start {start_ms}");
            assert!((3400..=4200).contains(end_ms), "end {end_ms}");
        }
    }

    #[test]
    fn an_utterance_is_announced_once_it_has_min_voiced_ms_and_a_blip_never_is() {
        let mut s = Segmenter::new(cfg());
        let mut pcm = vec![0i16; 16_000];
        pcm.extend(voice(150)); // a blip: under min_voiced_ms (300)
        pcm.extend(vec![0i16; 16_000]);
        pcm.extend(voice(2000));
        pcm.extend(vec![0i16; 16_000]);
        let out = s.push(&pcm);
        let starts: Vec<(u32, u64, usize)> = out
            .iter()
            .enumerate()
            .filter_map(|(i, x)| match x {
                Segment::Start {
                    utterance,
                    start_ms,
                } => Some((*utterance, *start_ms, i)),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 1, "{out:?}");
        let (utterance, start_ms, at) = starts[0];
        assert_eq!(utterance, 0);
        // Before any partial or final of it, with the final's own start.
        assert!(out[..at]
            .iter()
            .all(|x| !matches!(x, Segment::Partial { .. } | Segment::Final { .. })));
        let Some(Segment::Final {
            utterance: 0,
            start_ms: final_start,
            ..
        }) = out.iter().find(|x| matches!(x, Segment::Final { .. }))
        else {
            panic!("{out:?}")
        };
        assert_eq!(start_ms, *final_start);
        assert!((1_800..=2_300).contains(&start_ms), "{start_ms}");
    }

    #[test]
    fn a_cut_ends_the_utterance_mid_speech_and_the_next_speech_opens_another() {
        let mut s = Segmenter::new(cfg());
        let mut out = s.push(&voice(1000));
        out.extend(s.cut());
        out.extend(s.cut()); // nothing open: nothing
        out.extend(s.push(&voice(1000)));
        out.extend(s.finish());
        let finals = finals(&out);
        assert_eq!(finals.len(), 2, "{out:?}");
        assert_eq!(finals[0].0, 0);
        assert_eq!(finals[1].0, 1);
        assert!(finals[0].2 <= 1_000 && finals[1].1 >= 990, "{finals:?}");
    }

    #[test]
    fn a_pause_offers_a_tentative_final_that_resumed_speech_withdraws() {
        let mut s = Segmenter::new(SegmenterConfig {
            early_final_ms: 150,
            ..cfg()
        });
        let mut pcm = vec![0i16; 8_000];
        pcm.extend(voice(1500));
        pcm.extend(vec![0i16; 16 * 300]); // a pause shorter than silence_ms
        pcm.extend(voice(1000));
        pcm.extend(vec![0i16; 16_000]);
        let kinds: Vec<String> = s
            .push(&pcm)
            .iter()
            .filter_map(|x| match x {
                Segment::Partial { .. } | Segment::Start { .. } => None,
                Segment::Tentative { utterance, pcm, .. } => {
                    Some(format!("tentative {utterance} {}", pcm.len() / 16))
                }
                Segment::Resumed { utterance } => Some(format!("resumed {utterance}")),
                Segment::Final {
                    utterance,
                    tentative_holds,
                    pcm,
                    ..
                } => Some(format!(
                    "final {utterance} {tentative_holds} {}",
                    pcm.len() / 16
                )),
            })
            .collect();
        assert_eq!(kinds.len(), 4, "{kinds:?}");
        assert!(kinds[0].starts_with("tentative 0"), "{kinds:?}");
        assert_eq!(kinds[1], "resumed 0");
        assert!(kinds[2].starts_with("tentative 0"), "{kinds:?}");
        assert!(kinds[3].starts_with("final 0 true"), "{kinds:?}");
        // The tentative ends 150-180 ms into the silence; the final has the whole 600 ms.
        let len = |k: &str| k.rsplit(' ').next().unwrap().parse::<i64>().unwrap();
        let extra = len(&kinds[3]) - len(&kinds[2]);
        assert!((390..=480).contains(&extra), "{kinds:?}");
    }

    #[test]
    fn without_early_final_ms_no_tentative_is_offered() {
        let mut s = Segmenter::new(cfg());
        let mut pcm = voice(1500);
        pcm.extend(vec![0i16; 16_000]);
        let out = s.push(&pcm);
        assert!(out
            .iter()
            .all(|x| !matches!(x, Segment::Tentative { .. } | Segment::Resumed { .. })));
        assert!(out.iter().any(|x| matches!(
            x,
            Segment::Final {
                tentative_holds: false,
                ..
            }
        )));
    }

    #[test]
    fn the_first_partial_comes_after_first_partial_ms_then_every_interval() {
        let mut s = Segmenter::new(SegmenterConfig {
            first_partial_ms: 450,
            ..cfg()
        });
        let mut pcm = vec![0i16; 16_000];
        pcm.extend(voice(3000));
        let ends: Vec<u64> = s
            .push(&pcm)
            .iter()
            .filter_map(|x| match x {
                Segment::Partial { end_ms, .. } => Some(*end_ms),
                _ => None,
            })
            .collect();
        // Voice starts at 1000 ms: snapshots at ~1450, ~2450, ~3450 ms.
        assert_eq!(ends.len(), 3, "{ends:?}");
        assert!((1420..=1520).contains(&ends[0]), "{ends:?}");
        assert!((980..=1020).contains(&(ends[1] - ends[0])), "{ends:?}");
    }
}
