//! Whole-file decoding for one-shot recognition: WAV, MP3, AAC (ADTS), M4A/MP4, Ogg and FLAC
//! through symphonia, then downmix and resampling to 16 kHz mono. Raw PCM goes through
//! [`super::Decoder`].

use super::{AudioError, AudioFormat, Decoder, RateConverter, TARGET_RATE};
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymErr;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

/// A decoded upload.
#[derive(Debug, Clone)]
pub struct DecodedFile {
    /// 16 kHz mono samples.
    pub pcm: Vec<i16>,
    /// Container/codec name: `wav`, `mp3`, `aac`, `m4a`, `ogg`, `flac`, `pcm`.
    pub format: String,
    /// Source sample rate, Hz.
    pub rate: u32,
    /// Source channels.
    pub channels: u16,
}

/// Normalises a format name or MIME type (`audio/mpeg` → `mp3`); `None` when unknown.
pub fn format_from_name(s: &str) -> Option<&'static str> {
    let s = s.split(';').next().unwrap_or(s).trim().to_ascii_lowercase();
    let s = s.strip_prefix("audio/").unwrap_or(&s).to_string();
    Some(match s.as_str() {
        "wav" | "wave" | "x-wav" | "vnd.wave" => "wav",
        "mp3" | "mpeg" | "mpga" | "mpeg3" | "x-mpeg" => "mp3",
        "aac" | "x-aac" | "aacp" => "aac",
        "m4a" | "mp4" | "x-m4a" => "m4a",
        "ogg" | "opus" | "x-ogg" => "ogg",
        "flac" | "x-flac" => "flac",
        "pcm" | "l16" | "s16le" | "raw" => "pcm",
        _ => return None,
    })
}

/// Format name from a file name's extension.
pub fn format_from_filename(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1;
    format_from_name(ext)
}

/// Decodes a whole upload. `format` is a hint (`None` lets symphonia probe the bytes); `pcm`
/// needs `rate` and `channels`.
///
/// Decoding stops as soon as more than `max_ms` of audio came out, so a small file that
/// declares hours of audio (a decompression bomb) costs no more than `max_ms` of decoding.
///
/// # Errors
/// [`FileError::Audio`] for unknown or corrupt data (a clear message for the 415 answer);
/// [`FileError::TooLong`] past `max_ms`.
pub fn decode(
    bytes: &[u8],
    format: Option<&str>,
    rate: u32,
    channels: u16,
    max_ms: u64,
) -> Result<DecodedFile, FileError> {
    if bytes.is_empty() {
        return Err(AudioError("the audio is empty".into()).into());
    }
    if format == Some("pcm") {
        let ms =
            bytes.len() as u64 * 1000 / (2 * u64::from(channels.max(1)) * u64::from(rate.max(1)));
        if ms > max_ms {
            return Err(FileError::TooLong { at_least_ms: ms });
        }
        let mut d = Decoder::new(AudioFormat::Pcm, rate, channels)?;
        let mut pcm = d.push(bytes)?;
        pcm.extend(d.finish());
        return Ok(DecodedFile {
            pcm,
            format: "pcm".into(),
            rate,
            channels,
        });
    }
    let mut hint = Hint::new();
    if let Some(f) = format {
        hint.with_extension(match f {
            "m4a" => "m4a",
            other => other,
        });
    }
    let mss = MediaSourceStream::new(
        Box::new(std::io::Cursor::new(bytes.to_vec())),
        Default::default(),
    );
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| AudioError(format!("unrecognised or corrupt audio: {e}")))?;
    let mut reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError("no audio track in the file".into()))?;
    let track_id = track.id;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| AudioError(format!("unsupported codec: {e}")))?;
    let mut src_rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut src_channels = track.codec_params.channels.map_or(0, |c| c.count() as u16);
    let mut mono: Vec<f32> = Vec::new();
    let mut decoded_any = false;
    loop {
        let packet = match reader.next_packet() {
            Ok(p) => p,
            Err(SymErr::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymErr::ResetRequired) => break,
            Err(e) if decoded_any => {
                tracing::debug!(error = %e, "audio ends with unreadable data");
                break;
            }
            Err(e) => return Err(AudioError(format!("corrupt audio: {e}")).into()),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            Err(SymErr::DecodeError(e)) => {
                tracing::debug!(error = %e, "skipping an undecodable packet");
                continue;
            }
            Err(e) => return Err(AudioError(format!("corrupt audio: {e}")).into()),
        };
        let spec = *buf.spec();
        src_rate = spec.rate;
        src_channels = spec.channels.count() as u16;
        let mut sb = SampleBuffer::<f32>::new(buf.capacity() as u64, spec);
        sb.copy_interleaved_ref(buf);
        let n = usize::from(src_channels.max(1));
        mono.extend(
            sb.samples()
                .chunks(n)
                .map(|f| f.iter().sum::<f32>() / n as f32 * 32768.0),
        );
        decoded_any = true;
        // Stop as soon as the limit is passed: a small file may declare hours of audio.
        let ms = mono.len() as u64 * 1000 / u64::from(src_rate.max(1));
        if ms > max_ms {
            return Err(FileError::TooLong { at_least_ms: ms });
        }
    }
    if !decoded_any {
        return Err(AudioError("the file holds no decodable audio".into()).into());
    }
    if !super::RATE_RANGE.contains(&src_rate) {
        return Err(AudioError(format!(
            "sample rate {src_rate} Hz is outside the supported {}..={} Hz",
            super::RATE_RANGE.start(),
            super::RATE_RANGE.end()
        ))
        .into());
    }
    let pcm: Vec<i16> = if src_rate == TARGET_RATE {
        mono.iter().map(|&x| super::to_i16(x)).collect()
    } else {
        let ints: Vec<i16> = mono.iter().map(|&x| super::to_i16(x)).collect();
        let mut conv = RateConverter::new(src_rate, TARGET_RATE)?;
        let mut out = conv.process(&ints);
        out.extend(conv.flush());
        out
    };
    let format = format
        .or_else(|| sniff(bytes))
        .unwrap_or("unknown")
        .to_string();
    Ok(DecodedFile {
        pcm,
        format,
        rate: src_rate,
        channels: src_channels,
    })
}

/// Why a whole file was not decoded.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not decodable audio.
    #[error(transparent)]
    Audio(#[from] AudioError),
    /// Longer than the caller's limit; decoding stopped once the limit was passed.
    #[error("the audio lasts at least {at_least_ms} ms")]
    TooLong {
        /// Audio decoded when decoding stopped, ms.
        at_least_ms: u64,
    },
}

/// The container of an upload from its first bytes (`None` when unknown).
pub fn sniff(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        [b'R', b'I', b'F', b'F', _, _, _, _, b'W', b'A', b'V', b'E', ..] => Some("wav"),
        [b'I', b'D', b'3', ..] => Some("mp3"),
        [_, _, _, _, b'f', b't', b'y', b'p', ..] => Some("m4a"),
        [b'O', b'g', b'g', b'S', ..] => Some("ogg"),
        [b'f', b'L', b'a', b'C', ..] => Some("flac"),
        // ADTS: 12-bit sync, layer 00.
        [0xFF, b, ..] if b & 0xF6 == 0xF0 => Some("aac"),
        // MPEG audio: 11-bit sync, layer != 00.
        [0xFF, b, ..] if b & 0xE0 == 0xE0 && b & 0x06 != 0 => Some("mp3"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_mime_types() {
        assert_eq!(format_from_name("audio/mpeg"), Some("mp3"));
        assert_eq!(format_from_name("audio/wav; codecs=1"), Some("wav"));
        assert_eq!(format_from_name("audio/x-m4a"), Some("m4a"));
        assert_eq!(format_from_filename("rec.AAC"), Some("aac"));
        assert_eq!(format_from_name("video/webm"), None);
        assert_eq!(sniff(b"RIFF\0\0\0\0WAVEfmt "), Some("wav"));
        assert_eq!(sniff(&[0xFF, 0xF1, 0x50]), Some("aac"));
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90]), Some("mp3"));
        assert_eq!(sniff(b"\0\0\0\x20ftypM4A "), Some("m4a"));
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let e = decode(b"definitely not audio at all", None, 16_000, 1, 1_000).unwrap_err();
        assert!(e.to_string().contains("unrecognised"), "{e}");
        assert!(decode(b"", Some("mp3"), 16_000, 1, 1_000).is_err());
    }

    #[test]
    fn raw_pcm_past_the_limit_is_refused_before_decoding() {
        // 1 s of 16 kHz mono s16 is 32,000 bytes.
        assert!(decode(&[0; 32_000], Some("pcm"), 16_000, 1, 1_000).is_ok());
        assert!(matches!(
            decode(&[0; 32_100], Some("pcm"), 16_000, 1, 1_000),
            Err(FileError::TooLong { .. })
        ));
    }
}
