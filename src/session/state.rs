//! One live session: its fixed identity, and the mutable [`State`] behind a short-held mutex
//! that uploads, polls and the worker share. Readers wait on a `watch` of the newest visible
//! event seq and subscribe before they read, so no wake-up is lost.

use super::error::SessionError;
use super::event::{EndReason, Event, EventKind, EventLog, Usage};
use super::ingest::Ingest;
use super::options::SessionLimits;
use super::view::{PollResult, Sentence};
use crate::audio::AudioFormat;
use crate::clock::now_ms;
use crate::store::{SessionProgress, SessionRecord};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;
use subtle::ConstantTimeEq;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Most events one poll returns; the rest follow on the next poll.
pub const MAX_EVENTS_PER_POLL: usize = 500;

/// Where a session is in its life (shared/api.md, "Session status").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Takes audio.
    Open,
    /// The end of the audio is known (`last=1`, finish, a limit); recognising the rest.
    Finishing,
    /// Over, for this reason; the `end` event is in the log.
    Ended(EndReason),
}

impl Status {
    /// The status string of the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Finishing => "finishing",
            Self::Ended(r) => r.status(),
        }
    }

    /// Whether uploads may still add audio.
    pub fn takes_audio(self) -> bool {
        matches!(self, Self::Open | Self::Finishing)
    }
}

/// Upload rate limit of one session: a token bucket of `2 × per_s` refilled at `per_s`.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A full bucket for `per_s` uploads per second.
    pub fn new(per_s: u32) -> Self {
        Self {
            tokens: 2.0 * f64::from(per_s),
            at: Instant::now(),
        }
    }

    /// Takes one upload's token at `now`; false when the bucket is empty.
    pub fn take(&mut self, per_s: u32, now: Instant) -> bool {
        let per_s = f64::from(per_s);
        let tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * per_s).min(2.0 * per_s);
        self.at = now;
        if tokens < 1.0 {
            self.tokens = tokens;
            return false;
        }
        self.tokens = tokens - 1.0;
        true
    }
}

/// Mutable state of one session.
pub(super) struct State {
    /// Highest event seq readers may see: a final, warning, error or end is visible only once
    /// it is stored, so no client ever holds an event a crash could lose.
    pub visible: u64,
    pub rate: RateLimit,
    pub status: Status,
    pub ingest: Ingest,
    /// Seqs whose chunk is committed to the store: only these are acknowledged (a duplicate
    /// of an uncommitted chunk writes it again before it is answered).
    pub committed: Committed,
    pub log: EventLog,
    pub finals: BTreeMap<u32, Sentence>,
    /// Sentences that had a partial in the log (an empty final then retracts it).
    pub partial_shown: HashSet<u32>,
    /// Audio decoded so far, ms.
    pub audio_ms: u64,
    /// Last upload, poll or finish (the idle timeout counts from it).
    pub last_activity: Instant,
    pub updated_at_ms: u64,
    pub ended_at_ms: Option<u64>,
}

impl State {
    /// A new session's state: open, nothing received, nothing logged.
    pub fn fresh(limits: &SessionLimits) -> Self {
        Self::running(
            Status::Open,
            Ingest::new(limits.reorder_window, limits.max_buffered_bytes),
            EventLog::default(),
            BTreeMap::new(),
            0,
            RateLimit::new(limits.max_chunks_per_s),
        )
    }

    /// A running session's state around its ingest buffer and event log (empty for a new
    /// session, rebuilt for a resumed one); every event in the log is visible.
    pub fn running(
        status: Status,
        ingest: Ingest,
        log: EventLog,
        finals: BTreeMap<u32, Sentence>,
        audio_ms: u64,
        rate: RateLimit,
    ) -> Self {
        Self {
            visible: log.last_seq(),
            rate,
            status,
            ingest,
            committed: Committed::default(),
            log,
            finals,
            partial_shown: HashSet::new(),
            audio_ms,
            last_activity: Instant::now(),
            updated_at_ms: now_ms(),
            ended_at_ms: None,
        }
    }
}

/// One live session.
pub struct Session {
    pub(super) id: Uuid,
    /// The row as created (or as resumed, with this process's epoch); its mutable fields are
    /// overlaid from [`State`] by [`Session::record`].
    rec: SessionRecord,
    token_sha256: [u8; 32],
    /// Declared audio container (WAV headers are checked on upload).
    pub(super) format: AudioFormat,
    /// Separator between finals in the transcript ("" for Chinese, " " otherwise).
    joiner: &'static str,
    state: Mutex<State>,
    /// Wakes the worker when chunks become ready or finish is requested.
    pub(super) wake: Notify,
    /// Newest visible event seq; readers subscribe before they read.
    pub(super) log_tx: watch::Sender<u64>,
    /// Cancelled by DELETE.
    pub(super) cancel: CancellationToken,
    /// Cancelled when another replica runs the session now (its lease lapsed, a write was
    /// fenced, or this replica handed it off while draining): the worker stops without
    /// recording an end.
    pub(super) fenced: CancellationToken,
}

impl Session {
    /// The live session of a record (new or resumed) with `state`, under this process's
    /// `epoch`.
    ///
    /// # Errors
    /// A malformed id or token hash in the record.
    pub(super) fn new(
        mut rec: SessionRecord,
        format: AudioFormat,
        epoch: u64,
        state: State,
    ) -> Result<Self, String> {
        let id = Uuid::try_parse(&rec.id).map_err(|e| format!("session id: {e}"))?;
        let token_sha256: [u8; 32] = hex::decode(&rec.token_sha256)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("stored token hash is malformed")?;
        rec.epoch = epoch;
        let last_seq = state.log.last_seq();
        Ok(Self {
            id,
            joiner: super::options::sentence_joiner(&rec.engine),
            rec,
            token_sha256,
            format,
            state: Mutex::new(state),
            wake: Notify::new(),
            log_tx: watch::Sender::new(last_seq),
            cancel: CancellationToken::new(),
            fenced: CancellationToken::new(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Owner (JWT `sub` / API key user); `None` with auth off.
    pub(super) fn user(&self) -> Option<&str> {
        self.rec.user_id.as_deref()
    }

    /// This process's epoch.
    pub(super) fn epoch(&self) -> u64 {
        self.rec.epoch
    }

    /// Whether the session has not ended yet.
    pub(super) fn is_open(&self) -> bool {
        !matches!(self.lock().status, Status::Ended(_))
    }

    pub(super) fn check_token(&self, token: Option<&str>) -> Result<(), SessionError> {
        check_token_hash(&self.token_sha256, token)
    }

    pub(super) fn transcript(&self, st: &State) -> String {
        join_finals(st.finals.values().map(|s| s.text.as_str()), self.joiner)
    }

    /// The session's row as it stands now (what the store holds after the next write).
    pub(super) fn record(&self, st: &State) -> SessionRecord {
        let mut rec = self.rec.clone();
        rec.status = st.status.as_str().to_string();
        rec.end_reason = match st.status {
            Status::Ended(r) => Some(r.status().to_string()),
            _ => None,
        };
        rec.acked_seq = st.ingest.acked_seq();
        rec.audio_ms = st.audio_ms;
        rec.transcript = self.transcript(st);
        rec.updated_at_ms = st.updated_at_ms;
        rec.ended_at_ms = st.ended_at_ms;
        rec
    }

    /// What the session used so far: audio received, audio its finals cover, its provider.
    pub(super) fn usage(&self) -> Usage {
        let st = self.lock();
        let spans = st.finals.values().map(|s| (s.start_ms, s.end_ms));
        Usage::of(st.audio_ms, spans, &self.rec.provider)
    }

    /// The progress row as it stands now; with `end`, as the session ends for that reason.
    pub(super) fn progress(&self, end: Option<EndReason>) -> SessionProgress {
        let rec = self.record(&self.lock());
        SessionProgress {
            status: end.map_or(rec.status, |r| r.status().to_string()),
            acked_seq: rec.acked_seq,
            audio_ms: rec.audio_ms,
            transcript: rec.transcript,
            end_reason: end.map(|r| r.status().to_string()),
            at_ms: now_ms(),
        }
    }

    /// Appends an event and keeps the finals; with `publish`, also makes it visible and wakes
    /// readers (else [`Session::publish`] does, once it is stored). Returns the appended
    /// event, or `None` when it was dropped (an empty final for a sentence never shown).
    pub(super) fn push_event(&self, ev: Event, publish: bool) -> Option<Event> {
        let mut st = self.lock();
        match ev.kind {
            // A sentence announced or guessed at gets its final even when that is empty.
            EventKind::Partial | EventKind::SpeechStart => {
                st.partial_shown.insert(ev.sentence);
            }
            EventKind::Final => {
                if ev.text.is_empty() && !st.partial_shown.contains(&ev.sentence) {
                    return None;
                }
                if !ev.text.is_empty() {
                    st.finals.insert(ev.sentence, Sentence::of(&ev));
                }
            }
            _ => {}
        }
        let seq = st.log.append(ev);
        st.updated_at_ms = now_ms();
        let appended = st.log.after(seq - 1, 1).pop();
        drop(st);
        if publish {
            self.publish(seq);
        }
        appended
    }

    /// Makes every event up to `seq` visible and wakes readers.
    pub(super) fn publish(&self, seq: u64) {
        {
            let mut st = self.lock();
            st.visible = st.visible.max(seq);
        }
        self.log_tx.send_replace(seq);
    }

    /// Counts as activity for the idle timeout.
    pub(super) fn touch(&self) {
        self.lock().last_activity = Instant::now();
    }

    /// Visible events with seq > `after` (at most [`MAX_EVENTS_PER_POLL`]).
    pub(super) fn read_after(&self, after: u64) -> PollResult {
        let st = self.lock();
        let mut events = st.log.after(after, MAX_EVENTS_PER_POLL);
        events.retain(|e| e.seq <= st.visible);
        let next_cursor = events.last().map_or(after, |e| e.seq);
        let done =
            st.log.ended() && st.visible >= st.log.last_seq() && next_cursor >= st.log.last_seq();
        PollResult {
            events,
            next_cursor,
            status: st.status.as_str().to_string(),
            epoch: self.epoch(),
            done,
        }
    }
}

fn join_finals<'a>(parts: impl Iterator<Item = &'a str>, joiner: &str) -> String {
    parts
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(joiner)
}

/// SHA-256 of a session token, as stored.
pub(super) fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Checks `token` against a stored SHA-256 in constant time.
pub(super) fn check_token_hash(
    expected: &[u8; 32],
    token: Option<&str>,
) -> Result<(), SessionError> {
    let token = token.ok_or(SessionError::MissingToken)?;
    if bool::from(sha256(token).ct_eq(expected)) {
        Ok(())
    } else {
        Err(SessionError::WrongToken)
    }
}

/// A session id from a path segment; anything else is an unknown session.
pub(super) fn parse_id(id: &str) -> Result<Uuid, SessionError> {
    Uuid::try_parse(id).map_err(|_| SessionError::NotFound(id.chars().take(64).collect()))
}

/// The set of committed chunk seqs in O(reorder window) memory: every seq below `below` is
/// committed, plus those in `above` (commits finish out of order when uploads overlap). A
/// plain set grew by one entry per chunk for the life of a session.
#[derive(Debug, Default)]
pub struct Committed {
    below: u64,
    above: BTreeSet<u64>,
}

impl Committed {
    /// True once chunk `seq` is committed.
    pub fn contains(&self, seq: u64) -> bool {
        seq < self.below || self.above.contains(&seq)
    }

    /// Records chunk `seq` as committed.
    pub fn insert(&mut self, seq: u64) {
        if seq < self.below {
            return;
        }
        self.above.insert(seq);
        while self.above.remove(&self.below) {
            self.below += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_limit_allows_a_burst_of_twice_the_rate_then_refills() {
        let t0 = Instant::now();
        let mut r = RateLimit {
            tokens: 20.0,
            at: t0,
        };
        for _ in 0..20 {
            assert!(r.take(10, t0));
        }
        assert!(!r.take(10, t0));
        assert!(r.take(10, t0 + Duration::from_millis(100)));
        assert!(!r.take(10, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn statuses_name_themselves_as_the_api_does() {
        assert_eq!(Status::Open.as_str(), "open");
        assert_eq!(Status::Finishing.as_str(), "finishing");
        assert_eq!(Status::Ended(EndReason::Expired).as_str(), "expired");
        assert!(Status::Finishing.takes_audio());
        assert!(!Status::Ended(EndReason::Finished).takes_audio());
    }

    #[test]
    fn tokens_are_checked_against_their_hash() {
        let h = sha256("secret");
        assert!(check_token_hash(&h, Some("secret")).is_ok());
        assert!(matches!(
            check_token_hash(&h, Some("other")),
            Err(SessionError::WrongToken)
        ));
        assert!(matches!(
            check_token_hash(&h, None),
            Err(SessionError::MissingToken)
        ));
    }

    #[test]
    fn committed_seqs_fold_into_a_floor() {
        let mut c = Committed::default();
        for seq in [2, 0, 5, 1] {
            c.insert(seq);
        }
        assert!([0, 1, 2, 5].iter().all(|&s| c.contains(s)));
        assert!(![3, 4, 6].iter().any(|&s| c.contains(s)));
        assert_eq!((c.below, c.above.len()), (3, 1));
        c.insert(1); // a retry of an old one
        c.insert(3);
        c.insert(4);
        assert_eq!((c.below, c.above.len()), (6, 0));
    }
}
