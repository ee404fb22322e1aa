//! Session events (shared/api.md, "Event") and the per-session ordered event log read by cursor.

use crate::provider::{Recognition, Word};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// Speech began: a sentence opened at `start_ms` (no text yet).
    #[serde(rename = "speech_start")]
    SpeechStart,
    /// Current guess for a sentence.
    Partial,
    /// Stable text of a sentence.
    Final,
    /// Degraded but continuing.
    Warning,
    /// A failure (provider, audio).
    Error,
    /// Terminal: the stream is closed.
    End,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndReason {
    /// All audio recognised after finish / `last=1`.
    Finished,
    /// `DELETE` by the client.
    Cancelled,
    /// Idle timeout or maximum duration.
    Expired,
    /// Provider or audio failure, or server shutdown.
    Failed,
}

impl EndReason {
    /// The session status this reason leaves.
    pub fn status(self) -> &'static str {
        match self {
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::Failed => "failed",
        }
    }
}

/// One event in a session's log. `seq` starts at 1 and increases by one per appended event;
/// a poll with `after=K` returns events with `seq > K`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the log.
    pub seq: u64,
    /// Event type.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// Sentence index (0 for events not about a sentence).
    pub sentence: u32,
    /// Sentence text; for `error`/`warning` the message; for `end` empty.
    pub text: String,
    /// Stream time, ms.
    pub start_ms: u64,
    /// Stream time, ms.
    pub end_ms: u64,
    /// `partial` only: the prefix of `text` that this partial and the one before it (same
    /// sentence) agree on, which a client can show as settled ("" when nothing is agreed yet).
    /// It grows as long as later guesses keep to it (see `stability`); the final replaces it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stable: Option<String>,
    /// Word timings where the provider gives them.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub words: Option<Vec<Word>>,
    /// `error`/`warning` machine code.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub code: Option<String>,
    /// `error`/`warning` human text.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    /// `error` from a provider: the upstream's own code verbatim (Tencent `4008`, TC3
    /// `AuthFailure.SignatureFailure`, an HTTP status).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub provider_code: Option<String>,
    /// `end` only.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<EndReason>,
    /// `end` only: the full transcript.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub transcript: Option<String>,
    /// `end` only: what the session used.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub usage: Option<Usage>,
}

/// What a session used, on its `end` event: the basis for a bill or a quota (Tencent bills
/// real-time ASR by audio duration; OpenAI's transcription API reports `usage.seconds`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Audio received (decoded to 16 kHz mono), ms.
    pub audio_ms: u64,
    /// Audio the final sentences cover (sum of their `end_ms - start_ms`), ms: speech, as
    /// opposed to the silence around it.
    pub recognized_ms: u64,
    /// The provider that recognised it (`embedded`, `tencent`, ...).
    pub provider: String,
}

impl Usage {
    /// The usage of `audio_ms` of audio whose final sentences span `finals` ((start_ms,
    /// end_ms) each), recognised by `provider`.
    pub fn of(audio_ms: u64, finals: impl IntoIterator<Item = (u64, u64)>, provider: &str) -> Self {
        Self {
            audio_ms,
            recognized_ms: finals
                .into_iter()
                .map(|(start, end)| end.saturating_sub(start))
                .sum(),
            provider: provider.to_string(),
        }
    }
}

impl Event {
    /// An event of `kind` with empty fields; `seq` is assigned by [`EventLog::append`].
    pub fn new(kind: EventKind) -> Self {
        Self {
            seq: 0,
            kind,
            sentence: 0,
            text: String::new(),
            start_ms: 0,
            end_ms: 0,
            stable: None,
            words: None,
            code: None,
            message: None,
            provider_code: None,
            reason: None,
            transcript: None,
            usage: None,
        }
    }

    /// A partial or final result of a provider.
    pub fn recognition(kind: EventKind, r: Recognition) -> Self {
        Self {
            sentence: r.sentence,
            text: r.text,
            start_ms: r.start_ms,
            end_ms: r.end_ms,
            words: r.words,
            ..Self::new(kind)
        }
    }

    /// An `error` event; its text is the message.
    pub fn error(code: &str, message: &str) -> Self {
        Self::coded(EventKind::Error, code, message)
    }

    /// A `warning` event; its text is the message.
    pub fn warning(code: &str, message: &str) -> Self {
        Self::coded(EventKind::Warning, code, message)
    }

    fn coded(kind: EventKind, code: &str, message: &str) -> Self {
        Self {
            code: Some(code.into()),
            message: Some(message.into()),
            text: message.into(),
            ..Self::new(kind)
        }
    }
}

/// The ordered log of one session. Superseded partials are coalesced: when a partial or final
/// for sentence S is appended, the earlier partial of S still in the log is dropped, and a
/// final drops S's `speech_start` too, so a backlog carries at most a start and one partial
/// per open sentence. Finals, warnings, errors and the end event are never dropped.
#[derive(Debug, Default)]
pub struct EventLog {
    events: VecDeque<Event>,
    last_seq: u64,
}

impl EventLog {
    /// Seq of the newest event (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Appends `ev`, assigning its seq; returns that seq.
    pub fn append(&mut self, mut ev: Event) -> u64 {
        let sentence = ev.sentence;
        match ev.kind {
            EventKind::Partial => self
                .events
                .retain(|e| !(e.kind == EventKind::Partial && e.sentence == sentence)),
            EventKind::Final => self.events.retain(|e| {
                !(matches!(e.kind, EventKind::Partial | EventKind::SpeechStart)
                    && e.sentence == sentence)
            }),
            _ => {}
        }
        self.last_seq += 1;
        ev.seq = self.last_seq;
        self.events.push_back(ev);
        self.last_seq
    }

    /// A log holding `events` (ascending seqs, as stored), continuing after the last one or
    /// after `at_least`, whichever is higher.
    pub fn restore(events: Vec<Event>, at_least: u64) -> Self {
        let last_seq = events
            .iter()
            .map(|e| e.seq)
            .max()
            .unwrap_or(0)
            .max(at_least);
        Self {
            events: events.into(),
            last_seq,
        }
    }

    /// Events with seq > `after`, ascending, at most `limit`.
    pub fn after(&self, after: u64, limit: usize) -> Vec<Event> {
        let start = self.events.partition_point(|e| e.seq <= after);
        self.events
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Whether the terminal `end` event is in the log.
    pub fn ended(&self) -> bool {
        self.events.back().is_some_and(|e| e.kind == EventKind::End)
    }

    /// Events held in memory.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the log holds no events.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, sentence: u32, text: &str) -> Event {
        Event {
            sentence,
            text: text.into(),
            ..Event::new(kind)
        }
    }

    #[test]
    fn superseded_partials_are_coalesced_and_finals_kept() {
        let mut log = EventLog::default();
        log.append(ev(EventKind::SpeechStart, 0, ""));
        log.append(ev(EventKind::Partial, 0, "he"));
        log.append(ev(EventKind::Partial, 0, "hello"));
        // A partial keeps its sentence's start; the final drops both.
        assert_eq!(log.len(), 2);
        log.append(ev(EventKind::Final, 0, "hello world"));
        log.append(ev(EventKind::SpeechStart, 1, ""));
        log.append(ev(EventKind::Partial, 1, "ag"));
        let all = log.after(0, 100);
        let kinds: Vec<_> = all
            .iter()
            .map(|e| (e.seq, e.kind, e.text.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (4, EventKind::Final, "hello world"),
                (5, EventKind::SpeechStart, ""),
                (6, EventKind::Partial, "ag")
            ]
        );
        assert_eq!(log.after(4, 100).len(), 2);
        assert_eq!(log.after(6, 100).len(), 0);
        assert_eq!(log.last_seq(), 6);
    }

    #[test]
    fn same_cursor_gives_same_events() {
        let mut log = EventLog::default();
        for i in 0..5 {
            log.append(ev(EventKind::Final, i, "x"));
        }
        assert_eq!(log.after(2, 100), log.after(2, 100));
        assert_eq!(
            log.after(2, 2).iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4]
        );
    }
}
