//! Audio input: turns a session's chunk bytes (PCM s16le or a WAV stream, any common sample rate,
//! mono or stereo) into 16 kHz mono s16 samples, incrementally across chunk boundaries.
//! A leaf module: it knows nothing of sessions or providers.

pub mod compressed;
pub mod file;
pub mod vad;
pub mod vad_pool;

use rubato::{FftFixedIn, Resampler};
use std::io::Cursor;

/// Sample rate every provider receives, in Hz.
pub const TARGET_RATE: u32 = 16_000;

/// Lowest and highest input sample rates accepted, in Hz.
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 8_000..=48_000;

/// A session's declared audio container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// Raw signed 16-bit little-endian PCM, interleaved when stereo.
    Pcm,
    /// A RIFF/WAVE stream (16-bit integer PCM) split across chunks; the header rides in the first
    /// chunk(s) and its rate and channels override the session's.
    Wav,
    /// MPEG audio Layer III frames (RecorderManager `format: 'mp3'`), split anywhere; rate and
    /// channels come from the frame headers.
    Mp3,
    /// AAC frames behind ADTS headers (RecorderManager `format: 'aac'`), split anywhere.
    Aac,
}

impl AudioFormat {
    /// Parses a session's `format` option.
    ///
    /// # Errors
    /// A message naming the accepted formats (`m4a`, `opus`, `speex` and `silk` are recognised
    /// but not streamable here: an MP4 container keeps its index at the end).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "pcm" | "s16le" => Ok(Self::Pcm),
            "wav" => Ok(Self::Wav),
            "mp3" => Ok(Self::Mp3),
            "aac" | "adts" => Ok(Self::Aac),
            "m4a" | "opus" | "speex" | "silk" => Err(format!(
                "audio format {s:?} cannot be streamed in chunks here; send \"pcm\" (s16le), \"wav\", \"mp3\" or \"aac\" (ADTS), or upload the file to POST /v1/recognize"
            )),
            _ => Err(format!("unknown audio format {s:?}; supported: \"pcm\" (s16le), \"wav\", \"mp3\", \"aac\" (ADTS)")),
        }
    }
}

/// Why audio could not be decoded. Always a client problem, answered with 415 or an `error` event.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct AudioError(pub String);

/// Incremental decoder for one session: feed chunk bytes in `seq` order, get 16 kHz mono samples.
pub struct Decoder {
    /// Bytes of a WAV header not yet complete; `None` once the header is parsed (or for PCM).
    header: Option<Vec<u8>>,
    rate: u32,
    channels: u16,
    /// A trailing partial sample frame carried to the next chunk (odd byte counts are legal
    /// across chunk boundaries).
    carry: Vec<u8>,
    resampler: Option<Resampling>,
    /// Input sample frames (at the source rate) decoded so far.
    frames_in: u64,
    /// MP3/ADTS framing and decoding; rate and channels come from its first frame.
    frames: Option<compressed::FrameDecoder>,
    /// Rate and channels are final (PCM from the start; WAV/MP3/AAC once their headers arrive).
    params_known: bool,
    /// Bytes pushed so far.
    bytes_in: u64,
}

struct Resampling {
    inner: FftFixedIn<f32>,
    pending: Vec<f32>,
}

impl Decoder {
    /// A decoder for `format` with the session's declared `rate` (Hz) and `channels`.
    ///
    /// # Errors
    /// Rates outside [`RATE_RANGE`] or channel counts other than 1 and 2.
    pub fn new(format: AudioFormat, rate: u32, channels: u16) -> Result<Self, AudioError> {
        check_params(rate, channels)?;
        let mut d = Self {
            header: None,
            rate,
            channels,
            carry: Vec::new(),
            resampler: None,
            frames_in: 0,
            frames: None,
            params_known: false,
            bytes_in: 0,
        };
        match format {
            AudioFormat::Wav => d.header = Some(Vec::new()),
            AudioFormat::Pcm => {
                d.init_resampler()?;
                d.params_known = true;
            }
            AudioFormat::Mp3 => {
                d.frames = Some(compressed::FrameDecoder::new(compressed::Framing::Mp3));
            }
            AudioFormat::Aac => {
                d.frames = Some(compressed::FrameDecoder::new(compressed::Framing::Adts));
            }
        }
        Ok(d)
    }

    /// Keeps MP3/AAC frames for pass-through to the provider ([`Self::take_frames`]), requiring
    /// the stream to be of the session's declared rate and channels. No effect on PCM and WAV.
    pub fn pass_through(&mut self) {
        let (rate, channels) = (self.rate, self.channels);
        if let Some(fd) = self.frames.as_mut() {
            fd.keep_frames(rate, channels);
        }
    }

    /// The whole compressed frames completed by the last [`Self::push`], as received; `None`
    /// unless [`Self::pass_through`] was called.
    pub fn take_frames(&mut self) -> Option<Vec<Vec<u8>>> {
        self.frames
            .as_mut()
            .and_then(compressed::FrameDecoder::take_frames)
    }

    /// Source sample rate in Hz (from the WAV header once parsed).
    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Audio decoded so far, in ms of source time.
    pub fn audio_ms(&self) -> u64 {
        self.frames_in * 1000 / u64::from(self.rate)
    }

    fn init_resampler(&mut self) -> Result<(), AudioError> {
        self.resampler = if self.rate == TARGET_RATE {
            None
        } else {
            Some(Resampling::new(self.rate, TARGET_RATE)?)
        };
        Ok(())
    }

    /// Decodes one chunk. Returns the 16 kHz mono samples that became available.
    ///
    /// # Errors
    /// A WAV stream whose header is malformed or not 16-bit PCM; an MP3/AAC stream without
    /// frame sync, with a rate outside [`RATE_RANGE`] or a corrupt frame structure.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<i16>, AudioError> {
        self.bytes_in += bytes.len() as u64;
        if let Some(fd) = self.frames.as_mut() {
            let samples = fd.push(bytes)?;
            if let (false, Some((rate, channels))) = (self.params_known, fd.format) {
                check_params(rate, channels)?;
                self.rate = rate;
                self.channels = channels;
                self.init_resampler()?;
                self.params_known = true;
            }
            let pcm = le_bytes(samples.iter().copied());
            return Ok(self.push_pcm(&pcm));
        }
        let body: Vec<u8>;
        let bytes = if let Some(header) = self.header.as_mut() {
            header.extend_from_slice(bytes);
            match parse_wav_header(header)? {
                None => return Ok(Vec::new()),
                Some((rate, channels, offset)) => {
                    body = header[offset..].to_vec();
                    self.header = None;
                    check_params(rate, channels)?;
                    self.rate = rate;
                    self.channels = channels;
                    self.init_resampler()?;
                    self.params_known = true;
                    &body[..]
                }
            }
        } else {
            bytes
        };
        Ok(self.push_pcm(bytes))
    }

    /// Downmixes and resamples interleaved s16le bytes at the source rate and channels.
    fn push_pcm(&mut self, bytes: &[u8]) -> Vec<i16> {
        let frame_bytes = 2 * usize::from(self.channels);
        let joined: Vec<u8>;
        let data = if self.carry.is_empty() {
            bytes
        } else {
            let mut j = std::mem::take(&mut self.carry);
            j.extend_from_slice(bytes);
            joined = j;
            &joined[..]
        };
        let whole = data.len() / frame_bytes * frame_bytes;
        self.carry = data[whole..].to_vec();
        if self.channels == 1 && self.resampler.is_none() {
            // 16 kHz mono, what clients are asked to send: the samples as they are.
            let mut out = vec![0i16; whole / 2];
            for (o, s) in out.iter_mut().zip(data[..whole].chunks_exact(2)) {
                *o = i16::from_le_bytes([s[0], s[1]]);
            }
            self.frames_in += out.len() as u64;
            return out;
        }
        let mono: Vec<f32> = data[..whole]
            .chunks_exact(frame_bytes)
            .map(|f| {
                let sum: f32 = f
                    .chunks_exact(2)
                    .map(|s| f32::from(i16::from_le_bytes([s[0], s[1]])))
                    .sum();
                sum / f32::from(self.channels)
            })
            .collect();
        self.frames_in += mono.len() as u64;
        self.resample(mono, false)
    }

    /// Why the stream ended unusable, if it did: a WAV header that never completed, or MP3/AAC
    /// bytes without a single whole frame. A stream that carried no bytes at all is complete.
    pub fn incomplete(&self) -> Option<String> {
        if self.bytes_in == 0 {
            return None;
        }
        if let Some(h) = &self.header {
            return Some(format!(
                "the WAV stream ended inside its header ({} bytes): truncated or not WAV",
                h.len()
            ));
        }
        match &self.frames {
            Some(fd) if fd.format.is_none() => Some(
                "the stream ended without one whole MP3/AAC frame: truncated or not that codec"
                    .into(),
            ),
            _ => None,
        }
    }

    /// Flushes the resampler at the end of the stream.
    pub fn finish(&mut self) -> Vec<i16> {
        self.resample(Vec::new(), true)
    }

    fn resample(&mut self, mono: Vec<f32>, flush: bool) -> Vec<i16> {
        match self.resampler.as_mut() {
            None => mono.into_iter().map(to_i16).collect(),
            Some(rs) => rs.run(&mono, flush),
        }
    }
}

impl Resampling {
    fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        let inner = FftFixedIn::new(from as usize, to as usize, 1024, 2, 1)
            .map_err(|e| AudioError(format!("cannot resample {from} Hz to {to} Hz: {e}")))?;
        Ok(Self {
            inner,
            pending: Vec::new(),
        })
    }

    /// Resamples what full blocks allow; with `flush`, the remainder too.
    fn run(&mut self, input: &[f32], flush: bool) -> Vec<i16> {
        self.pending.extend_from_slice(input);
        let mut out = Vec::new();
        loop {
            let need = self.inner.input_frames_next();
            if self.pending.len() < need {
                break;
            }
            let block: Vec<f32> = self.pending.drain(..need).collect();
            if let Ok(res) = self.inner.process(&[block], None) {
                out.extend(res[0].iter().copied().map(to_i16));
            }
        }
        if flush && !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            if let Ok(res) = self.inner.process_partial(Some(&[rest]), None) {
                out.extend(res[0].iter().copied().map(to_i16));
            }
        }
        out
    }
}

/// Converts a stream of mono samples from one rate to another (rubato), e.g. 16 kHz to the
/// 8 kHz that Tencent's `8k_*` engines take. A no-op when the rates are equal.
pub struct RateConverter {
    inner: Option<Resampling>,
}

impl RateConverter {
    /// A converter from `from` Hz to `to` Hz.
    ///
    /// # Errors
    /// Rates rubato cannot convert between.
    pub fn new(from: u32, to: u32) -> Result<Self, AudioError> {
        Ok(Self {
            inner: (from != to)
                .then(|| Resampling::new(from, to))
                .transpose()?,
        })
    }

    /// Converts the next samples; some may be held back until the next call or [`Self::flush`].
    pub fn process(&mut self, pcm: &[i16]) -> Vec<i16> {
        match self.inner.as_mut() {
            None => pcm.to_vec(),
            Some(rs) => rs.run(
                &pcm.iter().map(|&x| f32::from(x)).collect::<Vec<_>>(),
                false,
            ),
        }
    }

    /// Converts whatever is held back.
    pub fn flush(&mut self) -> Vec<i16> {
        match self.inner.as_mut() {
            None => Vec::new(),
            Some(rs) => rs.run(&[], true),
        }
    }
}

fn to_i16(x: f32) -> i16 {
    x.round().clamp(-32768.0, 32767.0) as i16
}

fn check_params(rate: u32, channels: u16) -> Result<(), AudioError> {
    if !RATE_RANGE.contains(&rate) {
        return Err(AudioError(format!(
            "sample rate {rate} Hz is outside the supported {}..={} Hz",
            RATE_RANGE.start(),
            RATE_RANGE.end()
        )));
    }
    if !(1..=2).contains(&channels) {
        return Err(AudioError(format!(
            "{channels} channels: only mono and stereo are supported"
        )));
    }
    Ok(())
}

/// Parses a WAV header from the bytes seen so far. `Ok(None)` means "need more bytes".
/// Returns (sample rate Hz, channels, byte offset of the sample data).
fn parse_wav_header(buf: &[u8]) -> Result<Option<(u32, u16, usize)>, AudioError> {
    if buf.len() >= 12 && (&buf[0..4] != b"RIFF" || &buf[8..12] != b"WAVE") {
        return Err(AudioError(
            "not a WAV stream: missing RIFF/WAVE header".into(),
        ));
    }
    if buf.len() < 12 {
        if !b"RIFF".starts_with(&buf[..buf.len().min(4)]) {
            return Err(AudioError(
                "not a WAV stream: missing RIFF/WAVE header".into(),
            ));
        }
        return Ok(None);
    }
    // hound reads chunks up to the start of `data`; a streamed WAV carries a data length of 0 or
    // 0xFFFFFFFF, which hound accepts for header parsing.
    let mut cursor = Cursor::new(buf);
    match hound::WavReader::new(&mut cursor) {
        Ok(reader) => {
            let spec = reader.spec();
            if spec.sample_format != hound::SampleFormat::Int || spec.bits_per_sample != 16 {
                return Err(AudioError(format!(
                    "WAV with {}-bit {:?} samples: only 16-bit integer PCM is supported",
                    spec.bits_per_sample, spec.sample_format
                )));
            }
            // The reader stops right after the `data` chunk header.
            let offset = reader.into_inner().position() as usize;
            Ok(Some((spec.sample_rate, spec.channels, offset)))
        }
        // A header cut by a chunk boundary: hound says EOF or "Failed to read enough bytes".
        Err(hound::Error::IoError(ref e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            need_more(buf)
        }
        Err(hound::Error::IoError(ref e)) if e.to_string().contains("enough bytes") => {
            need_more(buf)
        }
        Err(e) => Err(AudioError(format!("malformed WAV header: {e}"))),
    }
}

fn need_more(buf: &[u8]) -> Result<Option<(u32, u16, usize)>, AudioError> {
    if buf.len() > 64 * 1024 {
        Err(AudioError(
            "WAV header larger than 64 KiB without a data chunk".into(),
        ))
    } else {
        Ok(None)
    }
}

/// Samples as s16le bytes (what every upstream and the upload API take), 2 bytes per sample.
pub fn le_bytes(samples: impl ExactSizeIterator<Item = i16>) -> Vec<u8> {
    let mut out = vec![0u8; 2 * samples.len()];
    for (d, s) in out.chunks_exact_mut(2).zip(samples) {
        d.copy_from_slice(&s.to_le_bytes());
    }
    out
}

/// Reads a whole WAV file into 16 kHz mono samples (used by `voxpoll transcribe` and tests).
///
/// # Errors
/// Unreadable file or unsupported WAV.
pub fn decode_wav_bytes(bytes: &[u8]) -> Result<Vec<i16>, AudioError> {
    let mut d = Decoder::new(AudioFormat::Wav, TARGET_RATE, 1)?;
    let mut out = d.push(bytes)?;
    if d.header.is_some() {
        return Err(AudioError("truncated WAV: no data chunk".into()));
    }
    out.extend(d.finish());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        for s in samples {
            w.write_sample(*s).unwrap();
        }
        w.finalize().unwrap();
        out.into_inner()
    }

    #[test]
    fn pcm_odd_byte_counts_are_carried_across_chunks() {
        let mut d = Decoder::new(AudioFormat::Pcm, 16_000, 1).unwrap();
        let bytes: Vec<u8> = [1i16, -2, 300, -400]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        let mut got = d.push(&bytes[..3]).unwrap();
        got.extend(d.push(&bytes[3..]).unwrap());
        assert_eq!(got, vec![1, -2, 300, -400]);
    }

    #[test]
    fn stereo_is_downmixed() {
        let mut d = Decoder::new(AudioFormat::Pcm, 16_000, 2).unwrap();
        let bytes: Vec<u8> = [100i16, 300, -50, -150]
            .iter()
            .flat_map(|s| s.to_le_bytes())
            .collect();
        assert_eq!(d.push(&bytes).unwrap(), vec![200, -100]);
    }

    #[test]
    fn wav_header_split_across_chunks_and_resampled() {
        let samples: Vec<i16> = (0..48_000)
            .map(|i| ((i as f32 / 10.0).sin() * 8000.0) as i16)
            .collect();
        let bytes = wav(48_000, 1, &samples);
        let mut d = Decoder::new(AudioFormat::Wav, 16_000, 1).unwrap();
        let mut out = Vec::new();
        for part in bytes.chunks(7) {
            out.extend(d.push(part).unwrap());
        }
        out.extend(d.finish());
        assert_eq!(d.rate(), 48_000);
        assert!(
            (15_500..=16_600).contains(&out.len()),
            "1 s at 48 kHz gave {} samples",
            out.len()
        );
    }

    #[test]
    fn garbage_wav_is_rejected() {
        let mut d = Decoder::new(AudioFormat::Wav, 16_000, 1).unwrap();
        assert!(d.push(b"this is not a wav file at all").is_err());
    }

    #[test]
    fn non_16_bit_wav_is_rejected() {
        let mut out = Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16_000,
            bits_per_sample: 8,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::new(&mut out, spec).unwrap();
        w.write_sample(1i8).unwrap();
        w.finalize().unwrap();
        let err = Decoder::new(AudioFormat::Wav, 16_000, 1)
            .unwrap()
            .push(&out.into_inner())
            .unwrap_err();
        assert!(err.0.contains("8-bit"), "{err}");
    }

    #[test]
    fn absurd_rates_are_rejected() {
        assert!(Decoder::new(AudioFormat::Pcm, 1_000_000, 1).is_err());
        assert!(Decoder::new(AudioFormat::Pcm, 16_000, 6).is_err());
    }
}
