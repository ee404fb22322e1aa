//! Incremental decoding of the compressed frame streams RecorderManager records (MP3, AAC in
//! ADTS), split across chunks at arbitrary byte offsets.
//!
//! symphonia's format readers want the whole stream up front, so the framing is done here: the
//! frame headers give each frame's length (MP3: ISO/IEC 11172-3 §2.4.2.3 and 13818-3 for the
//! MPEG-2/2.5 rates, Layer III only; ADTS: ISO/IEC 13818-7 §6.2 `adts_fixed_header` and
//! `adts_variable_header`). Bytes wait until a whole frame is there; each complete frame goes
//! to symphonia's codec (one packet per frame), which keeps its state (the MP3 bit reservoir)
//! across frames. An ID3v2 tag before the first MP3 frame is skipped.

use super::AudioError;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, DecoderOptions, CODEC_TYPE_AAC, CODEC_TYPE_MP3};
use symphonia::core::formats::Packet;

/// Bytes searched for the first frame before the stream is declared not to be MP3/ADTS.
const MAX_SYNC_SEARCH: usize = 64 * 1024;

/// Largest ID3v2 tag skipped before the first MP3 frame, bytes. A tag is held whole until it
/// ends, so a bigger one (a 256 MiB size field with no audio behind it) would hold memory that
/// `max_buffered_bytes` never sees; recorders write none or a few KB.
pub const MAX_ID3_BYTES: usize = 1024 * 1024;

/// Which frame syntax to expect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// MPEG audio Layer III frames.
    Mp3,
    /// AAC frames each behind an ADTS header.
    Adts,
}

/// One frame located in the buffer.
struct Frame {
    /// Total length including the header, bytes.
    len: usize,
    /// Header bytes to strip before the codec (ADTS: 7 or 9; MP3: 0, the codec reads it).
    header: usize,
    rate: u32,
    channels: u16,
}

/// Frames kept for pass-through: the `(rate Hz, channels)` they must have, and the frames.
type Kept = ((u32, u16), Vec<Vec<u8>>);

/// Decodes a compressed stream fed in arbitrary pieces into interleaved s16 samples.
pub struct FrameDecoder {
    framing: Framing,
    buf: Vec<u8>,
    /// Bytes discarded since the last frame while looking for sync (garbage or tags).
    skipped: usize,
    synced: bool,
    codec: Option<Box<dyn symphonia::core::codecs::Decoder>>,
    /// Rate and channels of the first frame; later frames must agree.
    pub format: Option<(u32, u16)>,
    ts: u64,
    /// When set, every complete frame's original bytes (header included) are kept here for
    /// pass-through, and the stream must be of this `(rate Hz, channels)`.
    kept: Option<Kept>,
}

impl FrameDecoder {
    /// A decoder for `framing`.
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            buf: Vec::new(),
            skipped: 0,
            synced: false,
            codec: None,
            format: None,
            ts: 0,
            kept: None,
        }
    }

    /// Keeps every complete frame's bytes for pass-through ([`Self::take_frames`]); the stream
    /// must then be `rate` Hz with `channels` channels.
    pub fn keep_frames(&mut self, rate: u32, channels: u16) {
        self.kept = Some(((rate, channels), Vec::new()));
    }

    /// The whole frames completed since the last call, as received (pass-through only).
    pub fn take_frames(&mut self) -> Option<Vec<Vec<u8>>> {
        self.kept.as_mut().map(|(_, v)| std::mem::take(v))
    }

    /// Feeds bytes; returns the interleaved s16 samples of every frame completed by them, with
    /// the stream's `(rate Hz, channels)` once known.
    ///
    /// # Errors
    /// No frame sync within the first 64 KiB, a change of rate or channels mid-stream, or a
    /// frame the codec rejects after sync was established.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<i16>, AudioError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            if !self.synced && self.framing == Framing::Mp3 && pos == 0 {
                match id3_len(&self.buf) {
                    Some(Some(n)) if n > MAX_ID3_BYTES => {
                        return Err(AudioError(format!(
                            "an ID3 tag of {n} bytes before the first MP3 frame; at most {MAX_ID3_BYTES} bytes are skipped"
                        )));
                    }
                    Some(Some(n)) if self.buf.len() >= n => {
                        pos = n;
                        self.skipped += n;
                    }
                    Some(_) => break, // tag incomplete: wait for more
                    None => {}
                }
            }
            let rest = &self.buf[pos..];
            if rest.len() < 10 {
                break;
            }
            let Some(frame) = self.parse(rest) else {
                // Resynchronise as players do (a damaged frame, a trailing ID3v1 tag), but
                // give up after 64 KiB without a frame.
                pos += 1;
                self.skipped += 1;
                if self.skipped > MAX_SYNC_SEARCH {
                    return Err(AudioError(if self.synced {
                        format!(
                            "{} stream lost frame sync for {MAX_SYNC_SEARCH} bytes: corrupt",
                            self.name()
                        )
                    } else {
                        format!(
                            "no {} frame in the first {MAX_SYNC_SEARCH} bytes: not a {} stream",
                            self.name(),
                            self.name()
                        )
                    }));
                }
                continue;
            };
            if rest.len() < frame.len {
                break; // wait for the rest of the frame
            }
            let data = rest[frame.header..frame.len].to_vec();
            let name = self.name();
            if let Some((want, kept)) = self.kept.as_mut() {
                if *want != (frame.rate, frame.channels) {
                    return Err(AudioError(format!(
                        "the session declared {} Hz with {} channel(s), but the {name} frames are {} Hz with {}; the provider takes this audio as recorded, so the declaration must match",
                        want.0, want.1, frame.rate, frame.channels
                    )));
                }
                kept.push(rest[..frame.len].to_vec());
            }
            pos += frame.len;
            self.synced = true;
            self.skipped = 0;
            self.decode(&frame, &data, &mut out)?;
        }
        self.buf.drain(..pos);
        Ok(out)
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn name(&self) -> &'static str {
        match self.framing {
            Framing::Mp3 => "MP3",
            Framing::Adts => "AAC (ADTS)",
        }
    }

    fn parse(&self, b: &[u8]) -> Option<Frame> {
        match self.framing {
            Framing::Mp3 => mp3_frame(b),
            Framing::Adts => adts_frame(b),
        }
    }

    fn decode(&mut self, f: &Frame, data: &[u8], out: &mut Vec<i16>) -> Result<(), AudioError> {
        match self.format {
            None => self.format = Some((f.rate, f.channels)),
            Some(fmt) if fmt != (f.rate, f.channels) => {
                return Err(AudioError(format!(
                    "{} stream changed from {} Hz/{} ch to {} Hz/{} ch mid-stream",
                    self.name(),
                    fmt.0,
                    fmt.1,
                    f.rate,
                    f.channels
                )))
            }
            Some(_) => {}
        }
        if self.codec.is_none() {
            let mut params = CodecParameters::new();
            params
                .for_codec(match self.framing {
                    Framing::Mp3 => CODEC_TYPE_MP3,
                    Framing::Adts => CODEC_TYPE_AAC,
                })
                .with_sample_rate(f.rate)
                .with_channels(match f.channels {
                    1 => symphonia::core::audio::Channels::FRONT_LEFT,
                    _ => {
                        symphonia::core::audio::Channels::FRONT_LEFT
                            | symphonia::core::audio::Channels::FRONT_RIGHT
                    }
                });
            let codec = symphonia::default::get_codecs()
                .make(&params, &DecoderOptions::default())
                .map_err(|e| AudioError(format!("{} decoder: {e}", self.name())))?;
            self.codec = Some(codec);
        }
        let Some(codec) = self.codec.as_mut() else {
            return Ok(());
        };
        let packet = Packet::new_from_slice(0, self.ts, 0, data);
        match codec.decode(&packet) {
            Ok(buf) => {
                let spec = *buf.spec();
                let frames = buf.frames();
                self.ts += frames as u64;
                let mut sb = SampleBuffer::<i16>::new(frames as u64, spec);
                sb.copy_interleaved_ref(buf);
                // Keep the channel count of the header (mono AAC may decode as stereo).
                let n = spec.channels.count();
                if n == usize::from(f.channels) {
                    out.extend_from_slice(sb.samples());
                } else {
                    for frame in sb.samples().chunks_exact(n) {
                        for c in 0..usize::from(f.channels) {
                            out.push(frame[c.min(n - 1)]);
                        }
                    }
                }
                Ok(())
            }
            // A damaged frame is skipped, as players do; the stream stays in sync.
            Err(symphonia::core::errors::Error::DecodeError(_)) => Ok(()),
            Err(e) => Err(AudioError(format!("{}: {e}", self.name()))),
        }
    }
}

/// `Some(Some(total_len))` for a complete ID3v2 header, `Some(None)` when the buffer is too short
/// to tell, `None` when there is no tag.
fn id3_len(b: &[u8]) -> Option<Option<usize>> {
    if b.len() < 3 {
        return if b.is_empty() || !b"ID3".starts_with(b) {
            None
        } else {
            Some(None)
        };
    }
    if &b[..3] != b"ID3" {
        return None;
    }
    if b.len() < 10 {
        return Some(None);
    }
    // Syncsafe size: 4 × 7 bits (ID3v2.4 §3.1), plus the 10-byte header and a footer if flagged.
    let size = b[6..10]
        .iter()
        .fold(0usize, |acc, &x| (acc << 7) | usize::from(x & 0x7f));
    let footer = if b[5] & 0x10 != 0 { 10 } else { 0 };
    Some(Some(10 + size + footer))
}

/// An MPEG audio Layer III frame header at `b[0..4]` (ISO/IEC 11172-3 §2.4.1.3).
fn mp3_frame(b: &[u8]) -> Option<Frame> {
    if b.len() < 4 || b[0] != 0xff || b[1] & 0xe0 != 0xe0 {
        return None;
    }
    let version = (b[1] >> 3) & 3; // 0 = MPEG 2.5, 2 = MPEG 2, 3 = MPEG 1
    let layer = (b[1] >> 1) & 3; // 1 = Layer III
    if version == 1 || layer != 1 {
        return None;
    }
    let bitrate_idx = usize::from(b[2] >> 4);
    let rate_idx = usize::from((b[2] >> 2) & 3);
    if bitrate_idx == 0 || bitrate_idx == 15 || rate_idx == 3 {
        return None;
    }
    const V1: [u32; 15] = [
        0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
    ];
    const V2: [u32; 15] = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160];
    const RATES: [[u32; 3]; 4] = [
        [11025, 12000, 8000],
        [0, 0, 0],
        [22050, 24000, 16000],
        [44100, 48000, 32000],
    ];
    let kbps = if version == 3 {
        V1[bitrate_idx]
    } else {
        V2[bitrate_idx]
    };
    let rate = RATES[usize::from(version)][rate_idx];
    let padding = u32::from((b[2] >> 1) & 1);
    let coeff = if version == 3 { 144 } else { 72 };
    let len = (coeff * kbps * 1000 / rate + padding) as usize;
    let channels = if b[3] >> 6 == 3 { 1 } else { 2 };
    Some(Frame {
        len,
        header: 0,
        rate,
        channels,
    })
}

/// An ADTS header at `b[0..7]` (ISO/IEC 13818-7 §6.2.1).
fn adts_frame(b: &[u8]) -> Option<Frame> {
    if b.len() < 7 || b[0] != 0xff || b[1] & 0xf6 != 0xf0 {
        return None; // syncword 0xFFF and layer 00
    }
    let protection_absent = b[1] & 1 == 1;
    let rate_idx = usize::from((b[2] >> 2) & 0x0f);
    const RATES: [u32; 13] = [
        96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
    ];
    let rate = *RATES.get(rate_idx)?;
    let channels = u16::from(((b[2] & 1) << 2) | (b[3] >> 6));
    if channels == 0 || channels > 2 {
        return None;
    }
    let len = (usize::from(b[3] & 3) << 11) | (usize::from(b[4]) << 3) | usize::from(b[5] >> 5);
    let header = if protection_absent { 7 } else { 9 };
    if len <= header || b[6] & 3 != 0 {
        return None; // one raw data block per frame, as RecorderManager writes
    }
    Some(Frame {
        len,
        header,
        rate,
        channels,
    })
}
