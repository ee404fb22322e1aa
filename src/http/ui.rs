//! The demo page at `GET /` (README "Try it in a browser"): static files compiled into the
//! binary (no build step, nothing fetched from a CDN). The page runs the mini-program client
//! `clients/miniprogram/voxpoll.js` itself, with a browser `wx` (`ui/wx-browser.js`: fetch,
//! WebSocket, an AudioWorklet recorder at 16 kHz), so there is one protocol implementation.

use warp::http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use warp::reply::Response;
use warp::{Filter, Reply};

/// (path under `/ui/`, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "wx-browser.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/wx-browser.js"),
    ),
    (
        "recorder-worklet.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/recorder-worklet.js"),
    ),
    (
        "voxpoll.js",
        "text/javascript; charset=utf-8",
        include_str!("../../clients/miniprogram/voxpoll.js"),
    ),
];

const INDEX: &str = include_str!("ui/index.html");

/// `GET /` and `GET /ui/{file}`.
pub(super) fn routes() -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    let index = warp::path::end()
        .and(warp::get())
        .map(|| asset("text/html; charset=utf-8", INDEX));
    let files = warp::path!("ui" / String)
        .and(warp::get())
        .and_then(|name: String| async move {
            ASSETS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, ct, body)| asset(ct, body))
                .ok_or_else(warp::reject::not_found)
        });
    index.or(files).unify()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
