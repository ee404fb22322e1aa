//! One integration-test binary (faster to link, one shared model): the real server on port 0
//! with a real SQLite file, driven over HTTP.

mod auth;
mod bad_input;
mod compressed;
mod durability;
mod fakes;
mod helpers;
mod history;
mod hostile;
mod lifecycle;
mod observability;
mod oneshot;
mod openapi;
mod process;
mod protocol;
mod providers;
mod replicas;
mod speech;
mod store;
mod transport;
