//! Operations routes (shared/api.md, "Operations"): liveness and readiness.

use super::{with_state, AppState};
use serde_json::json;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

/// `GET /health` and `GET /ready`.
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
        .and(with_state(state))
        .then(ready);
    health.or(ready).unify()
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
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}
