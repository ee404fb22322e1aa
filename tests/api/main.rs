//! One integration-test binary (faster to link, one shared model): the real server on port 0
//! with a real SQLite file, driven over HTTP.

mod helpers;
mod lifecycle;
mod protocol;
mod speech;
