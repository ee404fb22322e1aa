//! Operations routes (shared/api.md, "Operations"): liveness, readiness, Prometheus metrics and
//! the OpenAPI document.

use super::{with_state, AppState};
use crate::error::ApiError;
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

/// `GET /health`, `GET /ready`, `GET /metrics` and `GET /openapi.yaml`.
pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    // GET /health: liveness, no dependencies.
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({ "status": "ok" })).into_response());
    // GET /ready: the database is writable and the default provider can take sessions.
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_state(state.clone()))
        .then(ready);
    // GET /metrics: Prometheus text exposition (README "Metrics").
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(warp::header::optional::<String>("authorization"))
        .and(with_state(state))
        .map(metrics);
    // GET /openapi.yaml: the API contract (openapi.yaml at the repository root).
    let openapi = warp::path!("openapi.yaml").and(warp::get()).map(|| {
        let mut r = OPENAPI.into_response();
        r.headers_mut().insert(
            warp::http::header::CONTENT_TYPE,
            warp::http::HeaderValue::from_static("application/yaml"),
        );
        r
    });
    health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(openapi)
        .unify()
}

/// The OpenAPI 3.1 document of every route, compiled in.
const OPENAPI: &str = include_str!("../../openapi.yaml");

fn metrics(authorization: Option<String>, state: AppState) -> Response {
    if let Some(token) = &state.config.metrics_token {
        let given = authorization
            .as_deref()
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default();
        let ok: bool =
            subtle::ConstantTimeEq::ct_eq(given.as_bytes(), token.expose().as_bytes()).into();
        if !ok {
            return ApiError::Unauthorized {
                code: "invalid_metrics_token",
                message: "GET /metrics needs Authorization: Bearer <VOXPOLL_METRICS_TOKEN>".into(),
            }
            .into_response();
        }
    }
    let Some(handle) = crate::metrics::handle() else {
        return ApiError::Unavailable {
            code: "not_ready",
            message: "the metrics recorder is not installed".into(),
        }
        .into_response();
    };
    let by_state = state.sessions.counts_by_state();
    for (name, n) in by_state {
        metrics::gauge!(crate::metrics::SESSIONS, "state" => name).set(n as f64);
    }
    metrics::gauge!(crate::metrics::POLLS_WAITING).set(state.sessions.polls_waiting() as f64);
    for (name, p) in &state.sessions.providers().by_name {
        if let Some(depth) = p
            .readiness()
            .stats
            .as_ref()
            .map(|s| {
                ["queued_finals", "queued_partials"]
                    .map(|k| s.get(k).and_then(serde_json::Value::as_f64))
            })
            .and_then(|[f, p]| Some(f? + p?))
        {
            metrics::gauge!(crate::metrics::DECODE_QUEUE, "provider" => name.clone()).set(depth);
        }
    }
    let fds = crate::fdlimit::FdBudget::now(&state.config);
    if let Some(open) = fds.open {
        metrics::gauge!(crate::metrics::OPEN_FDS).set(open as f64);
    }
    if let Some(limit) = fds.limit {
        metrics::gauge!(crate::metrics::MAX_FDS).set(limit as f64);
    }
    metrics::gauge!(crate::metrics::FDS_NEEDED).set(fds.needed as f64);
    let mut resp = handle.render().into_response();
    resp.headers_mut().insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

async fn ready(state: AppState) -> Response {
    let db = state.sessions.store().check_writable().await;
    let providers = state.sessions.providers();
    let mut list = serde_json::Map::new();
    for (name, p) in &providers.by_name {
        list.insert(
            name.clone(),
            serde_json::to_value(p.readiness()).unwrap_or_default(),
        );
    }
    let default_ready = providers
        .by_name
        .get(&providers.default)
        .is_some_and(|p| p.readiness().ready);
    let ok = db.is_ok() && default_ready;
    let body = json!({
        "status": if ok { "ready" } else { "not_ready" },
        "database": match &db { Ok(()) => json!({"writable": true}), Err(e) => json!({"writable": false, "error": e.to_string()}) },
        "default_provider": providers.default,
        "providers": list,
        "sessions_open": state.sessions.open_count(),
        "polls_waiting": state.sessions.polls_waiting(),
        "epoch": state.sessions.epoch(),
        "file_descriptors": crate::fdlimit::FdBudget::now(&state.config),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}
