//! [`HistoryStore`] on SQLite: one query over `sessions` and `recognitions`, keyed by owner.
//! `user_id IS ?` matches NULL owners too (auth off: one shared history).

use super::sqlite::{to_i64, Db};
use super::{Deleted, HistoryItem, HistoryStore, RecognitionRecord, StoreError};
use rusqlite::{params, OptionalExtension};

/// Both kinds of entry as one relation with the columns of [`HistoryItem`].
const ENTRIES: &str =
    "SELECT id, 'session' AS kind, provider, engine, transcript AS text, status, \
     audio_ms AS duration_ms, created_at_ms, ended_at_ms, user_id FROM sessions \
     UNION ALL SELECT id, 'recognition', provider, engine, text, 'finished', duration_ms, \
     created_at_ms, created_at_ms, user_id FROM recognitions";

fn row_to_item(r: &rusqlite::Row<'_>) -> Result<HistoryItem, rusqlite::Error> {
    Ok(HistoryItem {
        id: r.get(0)?,
        kind: r.get(1)?,
        provider: r.get(2)?,
        engine: r.get(3)?,
        text: r.get(4)?,
        status: r.get(5)?,
        duration_ms: r.get::<_, i64>(6)? as u64,
        created_at_ms: r.get::<_, i64>(7)? as u64,
        ended_at_ms: r.get::<_, Option<i64>>(8)?.map(|v| v as u64),
        sentences: None,
    })
}

#[async_trait::async_trait]
impl HistoryStore for Db {
    async fn insert_recognition(&self, rec: &RecognitionRecord) -> Result<(), StoreError> {
        let r = rec.clone();
        self.call(move |c| {
            c.execute(
                "INSERT INTO recognitions (id, user_id, provider, engine, text, sentences_json, duration_ms, created_at_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![r.id, r.user_id, r.provider, r.engine, r.text, r.sentences_json,
                    to_i64(r.duration_ms), to_i64(r.created_at_ms)],
            )?;
            Ok(())
        })
        .await
    }

    async fn history(
        &self,
        user: Option<String>,
        before: Option<(u64, String)>,
        limit: usize,
    ) -> Result<Vec<HistoryItem>, StoreError> {
        let (before_ms, before_id) =
            before.map_or((i64::MAX, String::new()), |(ms, id)| (to_i64(ms), id));
        self.call(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT * FROM ({ENTRIES}) WHERE user_id IS ?1 \
                 AND (created_at_ms < ?2 OR (created_at_ms = ?2 AND ?3 != '' AND id < ?3)) \
                 ORDER BY created_at_ms DESC, id DESC LIMIT ?4"
            ))?;
            let rows = st.query_map(
                params![user, before_ms, before_id, limit as i64],
                row_to_item,
            )?;
            rows.collect()
        })
        .await
    }

    async fn history_item(
        &self,
        user: Option<String>,
        id: &str,
    ) -> Result<Option<HistoryItem>, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let item = c
                .query_row(
                    &format!("SELECT * FROM ({ENTRIES}) WHERE user_id IS ?1 AND id = ?2"),
                    params![user, id],
                    row_to_item,
                )
                .optional()?;
            let Some(mut item) = item else {
                return Ok(None);
            };
            let sentences: Vec<serde_json::Value> = if item.kind == "recognition" {
                let json: String = c.query_row(
                    "SELECT sentences_json FROM recognitions WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )?;
                serde_json::from_str(&json).unwrap_or_default()
            } else {
                let mut st = c.prepare_cached(
                    "SELECT event_json FROM session_events WHERE session_id = ?1 ORDER BY seq",
                )?;
                let events: Vec<String> = st
                    .query_map(params![id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                events
                    .iter()
                    .filter_map(|e| super::history_sentence(e))
                    .collect()
            };
            item.sentences = Some(sentences);
            Ok(Some(item))
        })
        .await
    }

    async fn delete_history(&self, user: Option<String>, id: &str) -> Result<Deleted, StoreError> {
        let id = id.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "DELETE FROM recognitions WHERE id = ?1 AND user_id IS ?2",
                params![id, user],
            )?;
            if n > 0 {
                tx.commit()?;
                return Ok(Deleted::Yes);
            }
            let status: Option<String> = tx
                .query_row(
                    "SELECT status FROM sessions WHERE id = ?1 AND user_id IS ?2",
                    params![id, user],
                    |r| r.get(0),
                )
                .optional()?;
            let out = match status.as_deref() {
                None => Deleted::NotFound,
                Some("open" | "finishing") => Deleted::StillOpen,
                Some(_) => {
                    tx.execute(
                        "DELETE FROM session_events WHERE session_id = ?1",
                        params![id],
                    )?;
                    tx.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
                    Deleted::Yes
                }
            };
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    async fn purge(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            let cutoff = to_i64(before_ms);
            tx.execute(
                "DELETE FROM session_events WHERE session_id IN \
                 (SELECT id FROM sessions WHERE ended_at_ms IS NOT NULL AND ended_at_ms < ?1)",
                params![cutoff],
            )?;
            let s = tx.execute(
                "DELETE FROM sessions WHERE ended_at_ms IS NOT NULL AND ended_at_ms < ?1",
                params![cutoff],
            )?;
            let r = tx.execute(
                "DELETE FROM recognitions WHERE created_at_ms < ?1",
                params![cutoff],
            )?;
            tx.commit()?;
            Ok(s + r)
        })
        .await
    }
}
