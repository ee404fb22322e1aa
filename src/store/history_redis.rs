//! [`HistoryStore`] on Redis, for replicas sharing sessions (issue 12): every replica lists,
//! reads and deletes the same history.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `voxpoll:h:{<user>}` | sorted set | the user's entries: score = `created_at_ms`, member = `s:<id>` (session) or `r:<id>` (recognition); `<user>` is empty with auth off |
//! | `voxpoll:h:all` | sorted set | every entry as `<user>\n<member>`, score = `created_at_ms` (for the purge) |
//! | `voxpoll:{<id>}:r` | string | a recognition's [`RecognitionRecord`] as JSON |
//!
//! Sessions are the session hashes of `redis.rs`; [`SessionStore::insert_session`] indexes them.
//! Entries are ordered newest first, ties by id descending, as on SQLite.

use super::redis::{
    chunks_key, events_key, partials_key, record_from_hash, session_key, RedisStore,
};
use super::{Deleted, HistoryItem, HistoryStore, RecognitionRecord, StoreError};
use redis::AsyncCommands;
use std::collections::HashMap;

const ALL: &str = "voxpoll:h:all";

/// The user's history index.
pub(super) fn history_key(user: Option<&str>) -> String {
    format!("voxpoll:h:{{{}}}", user.unwrap_or(""))
}

/// The purge index member of an entry.
pub(super) fn all_member(user: Option<&str>, member: &str) -> String {
    format!("{}\n{member}", user.unwrap_or(""))
}

fn recognition_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:r")
}

impl RedisStore {
    /// One entry by its index member (`s:<id>` / `r:<id>`), without sentences; `None` when gone.
    async fn entry(&self, member: &str) -> Result<Option<HistoryItem>, StoreError> {
        let mut conn = self.conn();
        if let Some(id) = member.strip_prefix("r:") {
            let json: Option<String> = conn.get(recognition_key(id)).await?;
            let Some(json) = json else { return Ok(None) };
            let r: RecognitionRecord =
                serde_json::from_str(&json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            return Ok(Some(HistoryItem {
                id: r.id,
                kind: "recognition".into(),
                provider: r.provider,
                engine: r.engine,
                text: r.text,
                status: "finished".into(),
                duration_ms: r.duration_ms,
                created_at_ms: r.created_at_ms,
                ended_at_ms: Some(r.created_at_ms),
                sentences: None,
            }));
        }
        let id = member.strip_prefix("s:").unwrap_or(member);
        let h: HashMap<String, String> = conn.hgetall(session_key(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let rec = record_from_hash(h)?;
        Ok(Some(HistoryItem {
            id: rec.id,
            kind: "session".into(),
            provider: rec.provider,
            engine: rec.engine,
            text: rec.transcript,
            status: rec.status,
            duration_ms: rec.audio_ms,
            created_at_ms: rec.created_at_ms,
            ended_at_ms: rec.ended_at_ms,
            sentences: None,
        }))
    }

    /// The index member of entry `id` in `user`'s history (`r:<id>` or `s:<id>`), if it is there.
    async fn member_of(&self, user: Option<&str>, id: &str) -> Result<Option<String>, StoreError> {
        let key = history_key(user);
        let mut conn = self.conn();
        for member in [format!("r:{id}"), format!("s:{id}")] {
            let score: Option<f64> = conn.zscore(&key, &member).await?;
            if score.is_some() {
                return Ok(Some(member));
            }
        }
        Ok(None)
    }

    /// Removes an entry's data and its index members.
    async fn remove_entry(&self, user: Option<&str>, member: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        match member.strip_prefix("r:") {
            Some(id) => {
                let _: i64 = conn.del(recognition_key(id)).await?;
            }
            None => {
                let id = member.strip_prefix("s:").unwrap_or(member);
                let keys = [
                    session_key(id),
                    events_key(id),
                    chunks_key(id),
                    partials_key(id),
                ];
                let _: i64 = conn.del(&keys[..]).await?;
            }
        }
        let _: i64 = conn.zrem(history_key(user), member).await?;
        let _: i64 = conn.zrem(ALL, all_member(user, member)).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl HistoryStore for RedisStore {
    async fn insert_recognition(&self, rec: &RecognitionRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let member = format!("r:{}", rec.id);
        let user = rec.user_id.as_deref();
        let mut conn = self.conn();
        let _: () = conn.set(recognition_key(&rec.id), json).await?;
        let _: i64 = conn
            .zadd(history_key(user), &member, rec.created_at_ms)
            .await?;
        let _: i64 = conn
            .zadd(ALL, all_member(user, &member), rec.created_at_ms)
            .await?;
        Ok(())
    }

    async fn history(
        &self,
        user: Option<String>,
        before: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        let key = history_key(user.as_deref());
        let mut conn = self.conn();
        let max = before
            .as_ref()
            .map_or_else(|| "+inf".to_string(), |(ms, _)| ms.to_string());
        // Ties at the cursor's own time come first in the range: fetch enough to pass them.
        let ties: usize = match &before {
            Some((ms, _)) => conn.zcount(&key, ms, ms).await?,
            None => 0,
        };
        let rows: Vec<(String, u64)> = redis::cmd("ZRANGE")
            .arg(&key)
            .arg(&max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit + ties)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        let mut out = Vec::new();
        for (member, score) in rows {
            let id = member.get(2..).unwrap_or_default();
            if let Some((ms, before_id)) = &before {
                if score == *ms && (before_id.is_empty() || id >= before_id.as_str()) {
                    continue;
                }
            }
            if let Some(item) = self.entry(&member).await? {
                out.push(item);
            }
            if out.len() == limit {
                break;
            }
        }
        Ok(out)
    }

    async fn history_item(
        &self,
        user: Option<String>,
        id: &str,
    ) -> Result<Option<HistoryItem>, StoreError> {
        let mut conn = self.conn();
        if let Some(member) = self.member_of(user.as_deref(), id).await? {
            let Some(mut item) = self.entry(&member).await? else {
                return Ok(None);
            };
            let sentences = if item.kind == "recognition" {
                let json: Option<String> = conn.get(recognition_key(id)).await?;
                json.and_then(|j| serde_json::from_str::<RecognitionRecord>(&j).ok())
                    .and_then(|r| serde_json::from_str(&r.sentences_json).ok())
                    .unwrap_or_default()
            } else {
                let events: Vec<String> = conn.zrange(events_key(id), 0, -1).await?;
                events
                    .iter()
                    .filter_map(|e| super::history_sentence(e))
                    .collect()
            };
            item.sentences = Some(sentences);
            return Ok(Some(item));
        }
        Ok(None)
    }

    async fn delete_history(&self, user: Option<String>, id: &str) -> Result<Deleted, StoreError> {
        if let Some(member) = self.member_of(user.as_deref(), id).await? {
            if let Some(item) = self.entry(&member).await? {
                if item.status == "open" || item.status == "finishing" {
                    return Ok(Deleted::StillOpen);
                }
            }
            self.remove_entry(user.as_deref(), &member).await?;
            return Ok(Deleted::Yes);
        }
        Ok(Deleted::NotFound)
    }

    async fn purge(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let old: Vec<String> = conn
            .zrangebyscore(ALL, "-inf", format!("({before_ms}"))
            .await?;
        let mut n = 0;
        for entry in old {
            let Some((user, member)) = entry.split_once('\n') else {
                continue;
            };
            let user = (!user.is_empty()).then_some(user);
            match self.entry(member).await? {
                // A session is purged once it ended before the cutoff.
                Some(item) if item.ended_at_ms.is_none_or(|e| e >= before_ms) => continue,
                _ => {}
            }
            self.remove_entry(user, member).await?;
            n += 1;
        }
        Ok(n)
    }
}
