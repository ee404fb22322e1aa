//! Wall-clock time as the API and the store write it: unix milliseconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in ms (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Unix time in whole seconds, as request signatures use it (Tencent `timestamp`, TC3
/// `X-TC-Timestamp`).
pub fn now_s() -> u64 {
    now_ms() / 1000
}
