//! History routes (shared/api.md, "History"): the caller's sessions and one-shot
//! recognitions, newest first. Each caller (JWT `sub` or API key user) sees only its own entries;
//! while auth is off every caller is the same anonymous user.

use super::{respond, with_state, AppState};
use crate::error::ApiError;
use crate::store::Deleted;
use serde::Deserialize;
use serde_json::json;
use warp::reply::Response;
use warp::{Filter, Reply};

/// Largest page.
pub const MAX_LIMIT: usize = 100;

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    /// Cursor from the previous page's `next_before` (`<created_at_ms>_<id>`), or a plain
    /// unix-ms time.
    before: Option<String>,
}

fn parse_cursor(s: &str) -> Result<(u64, String), ApiError> {
    let (ms, id) = s.split_once('_').unwrap_or((s, ""));
    let ms = ms.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_query",
            format!("before={s:?}: use next_before from the previous page or a unix-ms time"),
        )
    })?;
    Ok((ms, id.to_string()))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound {
        code: "history_not_found",
        message: format!("no history entry {id:?}"),
    }
}

pub(super) fn routes(
    state: AppState,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    // GET /v1/history?limit=&before=
    let list = warp::path!("v1" / "history")
        .and(warp::get())
        .and(super::caller(&state))
        .and(warp::query::<ListQuery>())
        .and(with_state(state.clone()))
        .then(list_history)
        .map(respond);
    // GET /v1/history/{id}
    let get = warp::path!("v1" / "history" / String)
        .and(warp::get())
        .and(super::caller(&state))
        .and(with_state(state.clone()))
        .then(get_history)
        .map(respond);
    // DELETE /v1/history/{id}
    let delete = warp::path!("v1" / "history" / String)
        .and(warp::delete())
        .and(super::caller(&state))
        .and(with_state(state))
        .then(delete_history)
        .map(respond);
    list.or(get).unify().or(delete).unify()
}

async fn list_history(
    user: Option<String>,
    q: ListQuery,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1..={MAX_LIMIT}"),
        ));
    }
    let before = q.before.as_deref().map(parse_cursor).transpose()?;
    let items = state.history.history(user, before, limit).await?;
    let next = (items.len() == limit)
        .then(|| {
            items
                .last()
                .map(|i| format!("{}_{}", i.created_at_ms, i.id))
        })
        .flatten();
    Ok(warp::reply::json(
        &json!({ "items": items, "next_before": next }),
    ))
}

async fn get_history(
    id: String,
    user: Option<String>,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    match state.history.history_item(user, &id).await? {
        Some(item) => Ok(warp::reply::json(&item)),
        None => Err(not_found(&id)),
    }
}

async fn delete_history(
    id: String,
    user: Option<String>,
    state: AppState,
) -> Result<impl Reply, ApiError> {
    match state.history.delete_history(user, &id).await? {
        Deleted::Yes => Ok(warp::reply::json(&json!({ "deleted": true }))),
        Deleted::NotFound => Err(not_found(&id)),
        Deleted::StillOpen => Err(ApiError::Conflict {
            code: "session_open",
            message: format!("session {id} is still open; finish or cancel it first"),
        }),
    }
}
