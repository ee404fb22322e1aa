//! Prometheus metrics (`GET /metrics`): recorded through the `metrics` crate's macros where
//! things happen, rendered by `metrics-exporter-prometheus` in the text exposition format.
//! Gauges that describe the present (sessions by state, waiting polls, decode queue, file
//! descriptors) are set when the endpoint is scraped. README's "Metrics" table lists every
//! name; histograms are real Prometheus histograms (buckets in seconds) so
//! `histogram_quantile` works on them.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds: 0.5 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Upper bounds of the real-time factor buckets (decode time ÷ audio time).
const RTF_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0,
];

/// HTTP request handling time by route, method and status.
pub const HTTP_DURATION: &str = "voxpoll_http_request_duration_seconds";
/// HTTP responses by route, method and status.
pub const HTTP_RESPONSES: &str = "voxpoll_http_responses_total";
/// Sessions on this instance by state (`open`, `finishing`, `ended`), set at scrape time.
pub const SESSIONS: &str = "voxpoll_sessions";
/// Sessions created on this instance.
pub const SESSIONS_CREATED: &str = "voxpoll_sessions_created_total";
/// Sessions ended by their end reason (`finished`, `cancelled`, `expired`, `failed`).
pub const SESSIONS_ENDED: &str = "voxpoll_sessions_ended_total";
/// Long-polls held now, set at scrape time.
pub const POLLS_WAITING: &str = "voxpoll_polls_waiting";
/// Events handed to clients (long-poll responses and WebSocket messages).
pub const EVENTS_DELIVERED: &str = "voxpoll_events_delivered_total";
/// Chunks by upload outcome (`accepted`, `buffered`, `duplicate`, `out_of_window`, `conflict`).
pub const CHUNKS: &str = "voxpoll_chunks_total";
/// Audio bytes of new chunks (accepted or buffered), not of duplicates.
pub const CHUNK_BYTES: &str = "voxpoll_chunk_bytes_total";
/// Provider streams opened, by provider.
pub const PROVIDER_OPENS: &str = "voxpoll_provider_stream_opens_total";
/// Provider streams reopened after a fault, by provider.
pub const PROVIDER_REOPENS: &str = "voxpoll_provider_stream_reopens_total";
/// Provider errors by provider and voxpoll code (`provider_error`, `provider_auth_failed`, …).
pub const PROVIDER_ERRORS: &str = "voxpoll_provider_errors_total";
/// Time from the moment the audio a result ends at was given to the provider to the result's
/// arrival, by provider and kind (`partial`, `final`).
pub const PROVIDER_RESULT_LATENCY: &str = "voxpoll_provider_result_latency_seconds";
/// Embedded engine decodes waiting for a decode worker, set at scrape time.
pub const DECODE_QUEUE: &str = "voxpoll_decode_queue_depth";
/// Embedded engine real-time factor of each decode (decode time ÷ audio decoded), by kind.
pub const ENGINE_RTF: &str = "voxpoll_engine_rtf";
/// Gauge: file descriptors the process has open (Prometheus's standard process metric name).
pub const OPEN_FDS: &str = "process_open_fds";
/// Gauge: the process's soft file-descriptor limit (`ulimit -n`; standard name).
pub const MAX_FDS: &str = "process_max_fds";
/// Gauge: what the configured limits may hold open ([`crate::fdlimit::needed`]).
pub const FDS_NEEDED: &str = "voxpoll_fds_needed";
/// Time one store write (event batch, progress, end) took to commit, by engine.
pub const STORE_COMMIT: &str = "voxpoll_store_commit_duration_seconds";

/// The process-wide recorder's handle, installed on first use (tests start many servers in one
/// process; they share it). `None` when another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(ENGINE_RTF.into()), RTF_BUCKETS)
                })
                .and_then(PrometheusBuilder::install_recorder);
            match built {
                Ok(h) => {
                    describe();
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Runs the recorder's upkeep (drains histogram samples into buckets) every 5 s, so a server
/// that is never scraped does not grow. Call once per process; later calls do nothing.
pub fn spawn_upkeep() {
    static STARTED: OnceLock<()> = OnceLock::new();
    if STARTED.set(()).is_err() {
        return;
    }
    if let Some(h) = handle() {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                h.run_upkeep();
            }
        });
    }
}

fn describe() {
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request handling time by route, method and status (a long-poll includes its hold)"
    );
    describe_counter!(HTTP_RESPONSES, "HTTP responses by route, method and status");
    describe_gauge!(SESSIONS, "Sessions on this instance by state");
    describe_counter!(SESSIONS_CREATED, "Sessions created on this instance");
    describe_counter!(SESSIONS_ENDED, "Sessions ended, by end reason");
    describe_gauge!(POLLS_WAITING, "Long-polls held now");
    describe_counter!(EVENTS_DELIVERED, "Events handed to clients, by transport");
    describe_counter!(CHUNKS, "Audio chunk uploads by outcome");
    describe_counter!(CHUNK_BYTES, Unit::Bytes, "Bytes of new audio chunks");
    describe_counter!(PROVIDER_OPENS, "Provider streams opened, by provider");
    describe_counter!(
        PROVIDER_REOPENS,
        "Provider streams reopened after a fault, by provider"
    );
    describe_counter!(PROVIDER_ERRORS, "Provider errors by provider and code");
    describe_histogram!(
        PROVIDER_RESULT_LATENCY,
        Unit::Seconds,
        "Audio given to the provider -> result for that audio, by provider and kind"
    );
    describe_gauge!(DECODE_QUEUE, "Embedded engine decodes waiting for a worker");
    describe_gauge!(OPEN_FDS, "Open file descriptors");
    describe_gauge!(
        MAX_FDS,
        "Maximum number of open file descriptors (soft ulimit -n)"
    );
    describe_gauge!(
        FDS_NEEDED,
        "File descriptors the configured limits may hold open (max_connections, max_sessions, store)"
    );
    describe_histogram!(
        ENGINE_RTF,
        "Embedded engine real-time factor per decode, by kind"
    );
    describe_histogram!(
        STORE_COMMIT,
        Unit::Seconds,
        "Store write commit time, by engine"
    );
}

/// The route template of a request path, for labels (ids are replaced, so the label set stays
/// small whatever clients send).
pub fn route_of(path: &str) -> &'static str {
    // At most 5 segments matter; on the stack (this runs for every request).
    let mut parts = [""; 5];
    let mut n = 0;
    for seg in path.trim_end_matches('/').split('/').skip(1) {
        if n == parts.len() {
            return "other";
        }
        parts[n] = seg;
        n += 1;
    }
    match &parts[..n] {
        [""] | [] => "/",
        ["health"] => "/health",
        ["ready"] => "/ready",
        ["metrics"] => "/metrics",
        ["openapi.yaml"] => "/openapi.yaml",
        ["ui", _] => "/ui/{file}",
        ["v1", "sessions"] => "/v1/sessions",
        ["v1", "sessions", _] => "/v1/sessions/{id}",
        ["v1", "sessions", _, "audio"] => "/v1/sessions/{id}/audio",
        ["v1", "sessions", _, "events"] => "/v1/sessions/{id}/events",
        ["v1", "sessions", _, "finish"] => "/v1/sessions/{id}/finish",
        ["v1", "sessions", _, "finalize"] => "/v1/sessions/{id}/finalize",
        ["v1", "sessions", _, "ws"] => "/v1/sessions/{id}/ws",
        ["v1", "recognize"] => "/v1/recognize",
        ["v1", "audio", "transcriptions"] => "/v1/audio/transcriptions",
        ["api", "realtime-voice", "recognize"] => "/api/realtime-voice/recognize",
        ["v1", "history"] => "/v1/history",
        ["v1", "history", ..] => "/v1/history/{id}",
        ["v1", "probe", ..] => "/v1/probe/*",
        _ => "other",
    }
}

/// Records one HTTP response (called by the route tree's log filter). Labels are static
/// strings for every route, method and common status, so recording allocates nothing.
pub fn observe_http(path: &str, method: &str, status: u16, elapsed: Duration) {
    let route = route_of(path);
    let method = match method {
        "GET" => "GET",
        "POST" => "POST",
        "DELETE" => "DELETE",
        "OPTIONS" => "OPTIONS",
        "HEAD" => "HEAD",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        _ => "other",
    };
    let status = status_label(status);
    metrics::counter!(HTTP_RESPONSES, "route" => route, "method" => method, "status" => status.clone())
        .increment(1);
    metrics::histogram!(HTTP_DURATION, "route" => route, "method" => method, "status" => status)
        .record(elapsed.as_secs_f64());
}

/// A status code as a label: static for the codes voxpoll answers, formatted otherwise.
fn status_label(code: u16) -> metrics::SharedString {
    const KNOWN: [(u16, &str); 24] = [
        (101, "101"),
        (200, "200"),
        (201, "201"),
        (204, "204"),
        (206, "206"),
        (304, "304"),
        (400, "400"),
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (405, "405"),
        (406, "406"),
        (408, "408"),
        (409, "409"),
        (410, "410"),
        (411, "411"),
        (413, "413"),
        (415, "415"),
        (422, "422"),
        (429, "429"),
        (431, "431"),
        (500, "500"),
        (503, "503"),
        (504, "504"),
    ];
    match KNOWN.iter().find(|(c, _)| *c == code) {
        Some((_, s)) => metrics::SharedString::const_str(s),
        None => metrics::SharedString::from(code.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_the_codes() {
        for code in [200, 201, 404, 429, 502, 599] {
            assert_eq!(status_label(code).as_ref(), code.to_string());
        }
    }

    #[test]
    fn routes_are_templates_whatever_the_ids() {
        assert_eq!(
            route_of("/v1/sessions/abc/audio"),
            "/v1/sessions/{id}/audio"
        );
        assert_eq!(
            route_of("/v1/sessions/x/events/"),
            "/v1/sessions/{id}/events"
        );
        assert_eq!(route_of("/v1/sessions"), "/v1/sessions");
        assert_eq!(
            route_of("/v1/sessions/abc/finalize"),
            "/v1/sessions/{id}/finalize"
        );
        assert_eq!(route_of("/"), "/");
        assert_eq!(route_of("/v1/sessions/a/b/c/d"), "other");
        assert_eq!(route_of("/../../etc/passwd"), "other");
    }
}
