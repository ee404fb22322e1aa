//! Request parsing: session options as JSON (what `POST /v1/sessions` and the WebSocket accept),
//! their validation, the hot-word list syntax and format names.
#![no_main]
use libfuzzer_sys::fuzz_target;
use voxpoll::session::{check_hotwords, CreateOptions};

fuzz_target!(|data: &[u8]| {
    if let Ok(opts) = serde_json::from_slice::<CreateOptions>(data) {
        let _ = opts.stream_options();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = check_hotwords(s);
        let _ = voxpoll::audio::AudioFormat::parse(s);
    }
});
