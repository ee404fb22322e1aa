//! voxpoll: realtime speech recognition over plain HTTP long-polling, for mini-program and H5
//! clients on hosts that block or mishandle WebSocket upgrades.
//!
//! A client opens a session, POSTs audio chunks with a `seq`, and long-polls an ordered event log
//! of partial and final results, while a worker per session streams the audio to an ASR provider
//! (by default the embedded offline whisper.cpp engine).
//!
//! # Layout
//! - [`config`]: every option and limit (flags + `VOXPOLL_*` env).
//! - [`http`]: warp routes, thin handlers; [`error`]: the one error → HTTP mapping.
//! - [`session`]: the session engine (ordering, event log, long-poll, lifecycle).
//! - [`provider`]: the provider trait and the embedded whisper.cpp provider.
//! - [`audio`]: PCM/WAV decoding, resampling, VAD segmentation.
//! - [`store`]: persistence behind a trait; SQLite today.
//! - [`app`]: wiring and `run(listener, state, shutdown)`; [`client`]: `voxpoll transcribe`.

pub mod app;
pub mod audio;
pub mod auth;
pub mod client;
pub mod config;
pub mod doctor;
pub mod error;
pub mod http;
pub mod oneshot;
pub mod provider;
pub mod session;
pub mod store;
