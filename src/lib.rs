//! voxpoll: realtime speech recognition over plain HTTP long-polling, for mini-program and H5
//! clients on hosts that block or mishandle WebSocket upgrades.
//!
//! A client opens a session, POSTs audio chunks with a `seq`, and long-polls an ordered event log
//! of partial and final results, while a worker per session streams the audio to an ASR provider
//! (by default the embedded offline whisper.cpp engine).
//!
//! # Layout
//! - [`app`]: wiring from [`config`] to a running server, `run(listener, state, shutdown)`.
//! - [`audio`]: PCM/WAV/MP3/AAC decoding, resampling, VAD segmentation, whole-file decoding.
//! - [`auth`]: caller authentication (JWT HS256/RS256, API keys).
//! - [`client`]: `voxpoll transcribe`, a streaming client over the HTTP API.
//! - [`clock`]: unix-ms time.
//! - [`config`]: every option and limit (flags + `VOXPOLL_*` env), defaults named once.
//! - [`doctor`]: `voxpoll doctor URL`, probes a deployment and advises settings.
//! - [`error`]: [`error::ApiError`] and the one mapping of every domain error to HTTP.
//! - [`fdlimit`]: the file-descriptor budget (`ulimit -n`), raised and checked at start.
//! - [`http`]: warp routes and thin handlers (sessions, WebSocket, one-shot, history, probes).
//! - [`metrics`]: Prometheus metrics (names, buckets, route labels) for `GET /metrics`.
//! - [`oneshot`]: one-shot recognition of a whole upload, recorded in history.
//! - [`provider`]: the provider trait, the configured providers, the embedded whisper.cpp one.
//! - [`secret`]: a string whose `Debug` never shows it.
//! - [`session`]: the session engine (ordering, event log, long-poll, lifecycle, resume).
//! - [`store`]: persistence behind traits: SQLite (one instance) or Redis (many replicas).
//!
//! Dependencies point one way: `http` → `error` → `session`/`oneshot` → `provider`/`store`/
//! `audio` → `clock`/`secret`/`metrics`; nothing in `provider` or `store` knows the engine or HTTP.

pub mod app;
pub mod audio;
pub mod auth;
pub mod client;
pub mod clock;
pub mod config;
pub mod doctor;
pub mod error;
pub mod fdlimit;
pub mod http;
pub mod metrics;
pub mod oneshot;
pub mod provider;
pub mod secret;
pub mod session;
pub mod store;
