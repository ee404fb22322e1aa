//! One-shot uploads: sniffing and whole-file decoding (symphonia) of arbitrary bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let hint = voxpoll::audio::file::sniff(data);
    let _ = voxpoll::audio::file::decode(data, hint, 16_000, 1, 600_000);
});
