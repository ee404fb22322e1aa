//! A session's incremental decoder (PCM, streamed WAV, MP3 and ADTS framing + symphonia) on
//! arbitrary bytes split at arbitrary points: it may refuse the audio, never panic or hang.
#![no_main]
use libfuzzer_sys::fuzz_target;
use voxpoll::audio::{AudioFormat, Decoder};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let format = [AudioFormat::Pcm, AudioFormat::Wav, AudioFormat::Mp3, AudioFormat::Aac][usize::from(data[0] % 4)];
    let rate = [8_000, 16_000, 44_100, 48_000][usize::from(data[1] % 4)];
    let channels = 1 + u16::from(data[1] & 0x10 != 0);
    let split = 1 + usize::from(data[2]);
    let Ok(mut d) = Decoder::new(format, rate, channels) else { return };
    if data[1] & 0x20 != 0 {
        d.pass_through();
    }
    for piece in data[3..].chunks(split) {
        if d.push(piece).is_err() {
            return;
        }
        let _ = d.take_frames();
    }
    let _ = d.incomplete();
    let _ = d.finish();
    let _ = d.audio_ms();
});
