//! Provider message parsing: Tencent real-time frames, with result times mapped back through a
//! time map holding bridged silence.
#![no_main]
use libfuzzer_sys::fuzz_target;
use voxpoll::provider::tencent::realtime::{parse_message, TimeMap};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut times = TimeMap::default();
    times.insert(1_000, 400);
    times.insert(5_000, 40);
    if let Ok(m) = parse_message(text, &times) {
        if let Some((_, r)) = m.result {
            let _ = (r.start_ms, r.end_ms, r.words.map(|w| w.len()));
        }
    }
});
