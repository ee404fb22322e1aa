//! Sessions as the store holds them: events to and from their stored JSON, the finals a stored
//! log states, and the answers for sessions no longer (or not) in memory on this instance.

use super::error::SessionError;
use super::event::{Event, EventKind};
use super::state::{check_token_hash, MAX_EVENTS_PER_POLL};
use super::view::{PollResult, Sentence, SessionInfo};
use crate::store::{SessionRecord, SessionStore, StoreError, StoredEvent};
use std::collections::BTreeMap;

/// An event as stored: its seq and its JSON exactly as served.
pub(super) fn stored(ev: &Event) -> StoredEvent {
    StoredEvent {
        seq: ev.seq,
        json: serde_json::to_string(ev).unwrap_or_default(),
    }
}

/// A session's stored events with seq > `after`, ascending.
///
/// # Errors
/// Storage failures; an event whose JSON does not parse.
pub(super) async fn events_after(
    store: &dyn SessionStore,
    id: &str,
    after: u64,
) -> Result<Vec<Event>, StoreError> {
    store
        .events_after(id, after)
        .await?
        .into_iter()
        .map(|e| {
            serde_json::from_str(&e.json)
                .map_err(|err| StoreError::Pool(format!("stored event {}: {err}", e.seq)))
        })
        .collect()
}

/// What the final events of a log state.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Finals {
    /// Non-empty finals by sentence index.
    pub sentences: BTreeMap<u32, Sentence>,
    /// End of the latest final (empty ones included), ms: a replay starts here.
    pub last_end_ms: u64,
    /// One past the highest sentence index finalised.
    pub next_sentence: u32,
}

impl Finals {
    /// The finals among `events`.
    pub fn of(events: &[Event]) -> Self {
        let mut f = Self::default();
        for e in events.iter().filter(|e| e.kind == EventKind::Final) {
            f.last_end_ms = f.last_end_ms.max(e.end_ms);
            f.next_sentence = f.next_sentence.max(e.sentence.saturating_add(1));
            if !e.text.is_empty() {
                f.sentences.insert(e.sentence, Sentence::of(e));
            }
        }
        f
    }
}

/// The stored row of session `id` once `token` matches it.
///
/// # Errors
/// Unknown session, missing or wrong token, storage failure.
pub(super) async fn record(
    store: &dyn SessionStore,
    id: &str,
    token: Option<&str>,
) -> Result<SessionRecord, SessionError> {
    let rec = store
        .get_session(id)
        .await?
        .ok_or_else(|| SessionError::NotFound(id.to_string()))?;
    let token = Some(token.ok_or(SessionError::MissingToken)?);
    let mut expected = [0u8; 32];
    hex::decode_to_slice(&rec.token_sha256, &mut expected).map_err(|_| SessionError::WrongToken)?;
    check_token_hash(&expected, token)?;
    Ok(rec)
}

/// `GET /v1/sessions/{id}` of a session not in memory.
///
/// # Errors
/// As [`record`].
pub(super) async fn info(
    store: &dyn SessionStore,
    id: &str,
    token: Option<&str>,
) -> Result<SessionInfo, SessionError> {
    let rec = record(store, id, token).await?;
    let events = events_after(store, id, 0).await?;
    let last = events.last().map_or(0, |e| e.seq);
    let sentences = Finals::of(&events).sentences.into_values().collect();
    Ok(SessionInfo::new(rec, sentences, last))
}

/// A poll of a session not in memory: its stored events at once, no hold.
///
/// # Errors
/// As [`record`].
pub(super) async fn poll(
    store: &dyn SessionStore,
    id: &str,
    token: Option<&str>,
    after: u64,
) -> Result<PollResult, SessionError> {
    let rec = record(store, id, token).await?;
    let mut events = events_after(store, id, after).await?;
    events.truncate(MAX_EVENTS_PER_POLL);
    let next_cursor = events.last().map_or(after, |e| e.seq);
    let done = rec.ended_at_ms.is_some() && events.last().is_none_or(|e| e.kind == EventKind::End);
    Ok(PollResult {
        events,
        next_cursor,
        status: rec.status,
        epoch: rec.epoch,
        done,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_of(sentence: u32, text: &str, end_ms: u64) -> Event {
        Event {
            sentence,
            text: text.into(),
            end_ms,
            ..Event::new(EventKind::Final)
        }
    }

    #[test]
    fn finals_of_a_log_give_the_transcript_and_where_a_replay_starts() {
        let mut partial = Event::new(EventKind::Partial);
        partial.sentence = 3;
        partial.end_ms = 9_000;
        let events = vec![
            final_of(0, "a", 1_000),
            final_of(1, "", 2_000), // an empty final retracts a partial but still ends audio
            partial,
            final_of(2, "c", 3_000),
        ];
        let f = Finals::of(&events);
        assert_eq!(f.last_end_ms, 3_000);
        assert_eq!(f.next_sentence, 3);
        assert_eq!(
            f.sentences
                .values()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>(),
            ["a", "c"]
        );
        assert_eq!(Finals::of(&[]), Finals::default());
    }
}
