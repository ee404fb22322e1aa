//! What replicas sharing sessions through Redis coordinate on, beside the [`SessionStore`]
//! rows of `redis.rs` (issue 12): the chunk log any replica appends to, the owner lease with its
//! fencing epoch, cross-replica wake-ups, and the cluster-wide per-user session budget.
//!
//! Extra keys of one session (same `{<id>}` hash tag as the rest):
//!
//! | key / field | holds |
//! |---|---|
//! | `voxpoll:{<id>}:l` | the lease, `<replica> <epoch>`, expiring after `lease_ms` unless renewed |
//! | `s` field `in_next` | next chunk seq expected (every seq below it is in `c`) |
//! | `s` fields `in_end`, `in_finish`, `in_max`, `in_buffered` | end of the audio, finish requested, highest seq stored, bytes not yet taken by the owner |
//! | `s` fields `rl_tokens`, `rl_at` | the session's upload token bucket (`max_chunks_per_s`) |
//! | `s` field `cancel` | `1` once a cancel was requested (the owner, or a taker-over, honours it) |
//! | `s` field `ends` | seqs after which a client asked a sentence to end (`finalize`), space-separated, until the owner takes them |
//! | `voxpoll:u:{<user>}:open` | set of the user's open session ids |
//!
//! Channels: [`EVENTS_CHANNEL`] (`<id> <seq>` per stored event) and [`WAKE_CHANNEL`]
//! (`<id> chunk` / `<id> cancel`, for the session's owner).
//!
//! The ingest script follows `session::ingest::Ingest` rule for rule (duplicates, conflicts,
//! window, after-last, buffered bytes), so a chunk gets the same answer on any replica.

use super::redis::{chunks_key, session_key, user_open_key, RedisStore, EVENTS_CHANNEL};
use super::{ChunkRecord, StoreError};
use redis::{AsyncCommands, Script};
use std::sync::LazyLock;

/// Channel on which a session's owner hears of new chunks (`<id> chunk`) and cancels
/// (`<id> cancel`).
pub const WAKE_CHANNEL: &str = "voxpoll:wake";

fn lease_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:l")
}

/// What the ingest script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Stored; `acked` is the highest contiguous seq.
    New {
        /// Highest contiguous seq stored.
        acked: Option<u64>,
    },
    /// Same seq and bytes as before.
    Duplicate {
        /// Highest contiguous seq stored.
        acked: Option<u64>,
    },
    /// Different bytes for a stored seq (409 `seq_conflict`).
    Conflict,
    /// Beyond the reorder window (409 `seq_out_of_window`).
    OutOfWindow {
        /// Next seq expected.
        expected: u64,
    },
    /// After the chunk that ended the audio (409 `seq_after_last`): (offending, last).
    AfterLast(u64, u64),
    /// Over `max_buffered_bytes` not yet taken by the owner (429 `backpressure`).
    Backpressure {
        /// Bytes held.
        buffered: usize,
    },
    /// Over `max_chunks_per_s` (429 `rate_limited`).
    RateLimited,
    /// The session ended with this status.
    Closed(String),
    /// No such session.
    Gone,
}

/// Limits the ingest script applies (the session engine's own, see `SessionLimits`).
#[derive(Debug, Clone, Copy)]
pub struct IngestLimits {
    /// Reorder window, chunks.
    pub window: u64,
    /// Bytes accepted but not yet taken by the owner.
    pub max_buffered: usize,
    /// Uploads per second (bursts of twice that).
    pub per_s: u32,
}

/// Chunks the owner takes from the log, and where the audio's end stands.
#[derive(Debug, Clone, Default)]
pub struct Taken {
    /// Contiguous chunks from the seq asked for, ascending.
    pub chunks: Vec<ChunkRecord>,
    /// Finish was requested (`last=1` or finish).
    pub finish: bool,
    /// Every chunk up to the end is stored (take the rest, then the audio is complete).
    pub complete: bool,
    /// Seqs after which clients asked a sentence to end since the last take.
    pub sentence_ends: Vec<u64>,
}

/// What [`RedisStore::request_sentence_end`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SentenceEnd {
    /// Recorded: the sentence ends after this seq.
    After(u64),
    /// No chunk yet: nothing to end.
    NoAudio,
    /// The session is not open (its status).
    NotOpen(String),
    /// After the last chunk (its seq).
    AfterLast(u64),
    /// Beyond the window (the next seq expected).
    OutOfWindow(u64),
}

/// KEYS: s, c. ARGV: seq, last (0/1), data, window, max_buffered, per_s.
static OFFER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s, c = KEYS[1], KEYS[2]
local seq, last, data = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local window, maxbuf, per_s = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', s, 'status', 'in_next', 'in_end', 'in_finish', 'in_buffered', 'in_max', 'rl_tokens', 'rl_at')
if not h[1] then return {'gone'} end
local status = h[1]
local nxt = tonumber(h[2] or '0')
local endseq = h[3] and tonumber(h[3]) or nil
local finish = h[4] == '1'
local buffered = tonumber(h[5] or '0')
local maxseq = h[6] and tonumber(h[6]) or nil
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cap = 2 * per_s
local tokens = tonumber(h[7] or tostring(cap))
local at = tonumber(h[8] or tostring(now))
tokens = math.min(cap, tokens + math.max(0, now - at) / 1000 * per_s)
if tokens < 1 then
  redis.call('HSET', s, 'rl_tokens', tostring(tokens), 'rl_at', now)
  return {'rate'}
end
redis.call('HSET', s, 'rl_tokens', tostring(tokens - 1), 'rl_at', now)
local running = status == 'open' or status == 'finishing'
local prev = redis.call('HGET', c, seq)
if not running then
  if prev and string.sub(prev, 2) == data then return {'dup', nxt - 1} end
  return {'closed', status}
end
if prev then
  if string.sub(prev, 2) ~= data then return {'conflict'} end
  if last and endseq and endseq ~= seq then return {'conflict'} end
  if last and not finish then
    redis.call('HSET', s, 'in_end', seq, 'in_finish', '1')
    if status == 'open' then redis.call('HSET', s, 'status', 'finishing') end
  end
  return {'dup', nxt - 1}
end
if endseq and seq > endseq then return {'after_last', seq, endseq} end
if seq >= nxt + window then return {'window', nxt} end
if last and maxseq and maxseq > seq then return {'after_last', maxseq, seq} end
if buffered + #data > maxbuf then return {'backpressure', buffered} end
redis.call('HSET', c, seq, (last and '\1' or '\0') .. data)
buffered = buffered + #data
if not maxseq or seq > maxseq then maxseq = seq end
if last then endseq = seq finish = true end
while redis.call('HEXISTS', c, nxt) == 1 do nxt = nxt + 1 end
redis.call('HSET', s, 'in_next', nxt, 'in_buffered', buffered, 'in_max', maxseq)
if endseq then redis.call('HSET', s, 'in_end', endseq) end
if finish then
  redis.call('HSET', s, 'in_finish', '1')
  if status == 'open' then redis.call('HSET', s, 'status', 'finishing') end
end
return {'new', nxt - 1}
",
    )
});

/// KEYS: s. Ends the audio at the highest seq stored (finish without `last=1`).
static FINISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = KEYS[1]
local h = redis.call('HMGET', s, 'status', 'in_finish', 'in_max')
if not h[1] or (h[1] ~= 'open' and h[1] ~= 'finishing') then return 0 end
if h[2] ~= '1' then
  redis.call('HSET', s, 'in_finish', '1')
  if h[3] then redis.call('HSET', s, 'in_end', h[3]) end
end
if h[1] == 'open' then redis.call('HSET', s, 'status', 'finishing') end
return 1
",
    )
});

/// KEYS: s. ARGV: seq or '', window. Records a sentence end after seq (default: the highest
/// contiguous seq) with `Ingest::request_sentence_end`'s checks. Returns {0, seq}, {1, ''} (no
/// audio yet), {2, status} (not open), {3, last} (after the last chunk), {4, next} (beyond the
/// window).
static FINALIZE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s = KEYS[1]
local h = redis.call('HMGET', s, 'status', 'in_next', 'in_end', 'ends')
if not h[1] then return {2, 'unknown'} end
if h[1] ~= 'open' then return {2, h[1]} end
local nxt = tonumber(h[2] or '0')
local seq = tonumber(ARGV[1])
if not seq then
  if nxt == 0 then return {1, ''} end
  seq = nxt - 1
end
if h[3] and seq > tonumber(h[3]) then return {3, h[3]} end
if seq >= nxt + tonumber(ARGV[2]) then return {4, tostring(nxt)} end
local ends = h[4] or ''
local n = 0
for _ in string.gmatch(ends, '%S+') do n = n + 1 end
if n < tonumber(ARGV[2]) then redis.call('HSET', s, 'ends', ends .. ' ' .. seq) end
return {0, tostring(seq)}
",
    )
});

/// KEYS: s, c. ARGV: from seq, most chunks. Returns {in_next, finish, end or -1, sentence
/// ends (taken), values…}.
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s, c = KEYS[1], KEYS[2]
local from, most = tonumber(ARGV[1]), tonumber(ARGV[2])
local h = redis.call('HMGET', s, 'in_next', 'in_finish', 'in_end', 'ends')
local nxt = tonumber(h[1] or '0')
local out = {tostring(nxt), h[2] == '1' and '1' or '0', h[3] or '-1', h[4] or ''}
if h[4] then redis.call('HDEL', s, 'ends') end
local taken = 0
local seq = from
while seq < nxt and seq < from + most do
  local v = redis.call('HGET', c, seq)
  if not v then break end
  out[#out + 1] = v
  taken = taken + #v - 1
  seq = seq + 1
end
if taken > 0 then
  local b = tonumber(redis.call('HGET', s, 'in_buffered') or '0') - taken
  redis.call('HSET', s, 'in_buffered', math.max(0, b))
end
return out
",
    )
});

/// KEYS: s, l. ARGV: replica, lease_ms. Takes an unleased, unfinished session over: a new
/// epoch above the old one (and at least now in ms), the lease. Returns the epoch or 0.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local s, l = KEYS[1], KEYS[2]
if redis.call('EXISTS', l) == 1 then return 0 end
local h = redis.call('HMGET', s, 'status', 'epoch')
if not h[1] or (h[1] ~= 'open' and h[1] ~= 'finishing') then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = math.max(tonumber(h[2] or '0') + 1, now)
redis.call('HSET', s, 'epoch', string.format('%d', epoch), 'owner', ARGV[1], 'in_buffered', 0)
redis.call('SET', l, ARGV[1] .. ' ' .. string.format('%d', epoch), 'PX', ARGV[2])
return epoch
",
    )
});

/// KEYS: l. ARGV: holder value, lease_ms. 1 when renewed, 0 when the lease is not ours.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then \
           redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end return 0",
    )
});

/// KEYS: l. ARGV: holder value. Drops the lease when it is ours.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end \
         return 0",
    )
});

/// KEYS: user set. ARGV: id, max. Adds the session unless the user has `max` open.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local n = redis.call('SCARD', KEYS[1]) \
         if n >= tonumber(ARGV[2]) then return n end \
         redis.call('SADD', KEYS[1], ARGV[1]) return -1",
    )
});

fn holder(replica: &str, epoch: u64) -> String {
    format!("{replica} {epoch}")
}

fn seq_of(v: Option<&String>) -> Option<u64> {
    v.and_then(|s| s.parse::<i64>().ok())
        .and_then(|n| u64::try_from(n).ok())
}

impl RedisStore {
    /// Appends chunk `seq` to the session's chunk log under the ingest rules and `limits`.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn offer_chunk(
        &self,
        id: &str,
        seq: u64,
        last: bool,
        data: &[u8],
        limits: IngestLimits,
    ) -> Result<Offer, StoreError> {
        let r: Vec<String> = OFFER
            .key(session_key(id))
            .key(chunks_key(id))
            .arg(seq)
            .arg(u8::from(last))
            .arg(data)
            .arg(limits.window.max(1))
            .arg(limits.max_buffered)
            .arg(limits.per_s)
            .invoke_async(&mut self.conn())
            .await?;
        let n = |i: usize| seq_of(r.get(i));
        Ok(match r.first().map(String::as_str) {
            Some("new") => Offer::New { acked: n(1) },
            Some("dup") => Offer::Duplicate { acked: n(1) },
            Some("conflict") => Offer::Conflict,
            Some("window") => Offer::OutOfWindow {
                expected: n(1).unwrap_or(0),
            },
            Some("after_last") => Offer::AfterLast(n(1).unwrap_or(0), n(2).unwrap_or(0)),
            Some("backpressure") => Offer::Backpressure {
                buffered: usize::try_from(n(1).unwrap_or(0)).unwrap_or(usize::MAX),
            },
            Some("rate") => Offer::RateLimited,
            Some("closed") => Offer::Closed(r.get(1).cloned().unwrap_or_default()),
            Some("gone") => Offer::Gone,
            other => return Err(StoreError::Corrupt(format!("ingest answered {other:?}"))),
        })
    }

    /// Ends a session's audio at the highest seq stored (idempotent).
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn request_finish(&self, id: &str) -> Result<(), StoreError> {
        let _: i64 = FINISH
            .key(session_key(id))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Up to `most` contiguous chunks from seq `from` for the session's owner; their bytes stop
    /// counting against `max_buffered_bytes`.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn take_chunks(&self, id: &str, from: u64, most: u64) -> Result<Taken, StoreError> {
        let r: Vec<Vec<u8>> = TAKE
            .key(session_key(id))
            .key(chunks_key(id))
            .arg(from)
            .arg(most)
            .invoke_async(&mut self.conn())
            .await?;
        let text = |i: usize| r.get(i).map(|v| String::from_utf8_lossy(v).into_owned());
        let next = seq_of(text(0).as_ref()).unwrap_or(0);
        let finish = text(1).as_deref() == Some("1");
        let end = seq_of(text(2).as_ref());
        let sentence_ends = text(3)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let chunks: Vec<ChunkRecord> = r
            .iter()
            .skip(4)
            .zip(from..)
            .map(|(v, seq)| ChunkRecord {
                session_id: id.to_string(),
                seq,
                last: v.first() == Some(&1),
                data: bytes::Bytes::copy_from_slice(v.get(1..).unwrap_or_default()),
            })
            .collect();
        let taken_to = from + chunks.len() as u64;
        let complete = finish && end.is_none_or(|e| next > e) && taken_to >= next;
        Ok(Taken {
            chunks,
            finish,
            complete,
            sentence_ends,
        })
    }

    /// Records a client's request to end the current sentence after chunk `seq` (default: the
    /// highest contiguous seq) for the session's owner, who takes it with the chunks. At most
    /// `window` wait at once (more are answered but not recorded: the ones waiting end the
    /// sentence anyway).
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn request_sentence_end(
        &self,
        id: &str,
        seq: Option<u64>,
        window: u64,
    ) -> Result<SentenceEnd, StoreError> {
        let (code, v): (i64, Option<String>) = FINALIZE
            .key(session_key(id))
            .arg(seq.map(|s| s.to_string()).unwrap_or_default())
            .arg(window)
            .invoke_async(&mut self.conn())
            .await?;
        let n = || seq_of(v.as_ref()).unwrap_or(0);
        Ok(match code {
            0 => SentenceEnd::After(n()),
            1 => SentenceEnd::NoAudio,
            2 => SentenceEnd::NotOpen(v.unwrap_or_default()),
            3 => SentenceEnd::AfterLast(n()),
            _ => SentenceEnd::OutOfWindow(n()),
        })
    }

    /// Takes the lease of a new session for `replica` at `epoch` (before its row is inserted:
    /// see `SessionManager::create`).
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn acquire(
        &self,
        id: &str,
        replica: &str,
        epoch: u64,
        lease_ms: u64,
    ) -> Result<(), StoreError> {
        let _: () = redis::cmd("SET")
            .arg(lease_key(id))
            .arg(holder(replica, epoch))
            .arg("PX")
            .arg(lease_ms)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Takes over an unfinished session nobody holds the lease of: its new epoch, or `None`
    /// when it is held or ended.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn claim(
        &self,
        id: &str,
        replica: &str,
        lease_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let epoch: u64 = CLAIM
            .key(session_key(id))
            .key(lease_key(id))
            .arg(replica)
            .arg(lease_ms)
            .invoke_async(&mut self.conn())
            .await?;
        Ok((epoch > 0).then_some(epoch))
    }

    /// Renews the leases `replica` holds (session id, epoch); false for each that is lost.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn renew(
        &self,
        replica: &str,
        held: &[(String, u64)],
        lease_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        // One script call per lease over the multiplexed connection: they are pipelined.
        let calls = held.iter().map(|(id, epoch)| {
            let mut conn = self.conn();
            let mut inv = RENEW.key(lease_key(id));
            inv.arg(holder(replica, *epoch)).arg(lease_ms);
            async move { inv.invoke_async::<i64>(&mut conn).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        answers
            .into_iter()
            .map(|r| r.map(|v| v == 1).map_err(StoreError::from))
            .collect()
    }

    /// Drops a lease `replica` holds, so another replica takes the session over at once.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn release(&self, id: &str, replica: &str, epoch: u64) -> Result<(), StoreError> {
        let _: i64 = RELEASE
            .key(lease_key(id))
            .arg(holder(replica, epoch))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Ids of unfinished sessions whose lease lapsed (candidates for [`RedisStore::claim`]).
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn unleased(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let ids: Vec<String> = conn.smembers("voxpoll:unfinished").await?;
        let mut out = Vec::new();
        for batch in ids.chunks(256) {
            let mut pipe = redis::pipe();
            for id in batch {
                pipe.exists(lease_key(id));
            }
            let held: Vec<bool> = pipe.query_async(&mut conn).await?;
            out.extend(
                batch
                    .iter()
                    .zip(held)
                    .filter(|(_, h)| !h)
                    .map(|(id, _)| id.clone()),
            );
        }
        Ok(out)
    }

    /// Counts a new session of `user` against `max` open sessions cluster-wide: `Err(open)`
    /// when the user already has `max`.
    ///
    /// # Errors
    /// Redis unreachable or failing (outer).
    pub async fn admit_user(
        &self,
        user: Option<&str>,
        id: &str,
        max: usize,
    ) -> Result<Result<(), usize>, StoreError> {
        let n: i64 = ADMIT
            .key(user_open_key(user))
            .arg(id)
            .arg(max)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(usize::try_from(n).map_or(Ok(()), Err))
    }

    /// Undoes [`RedisStore::admit_user`] for a session that was not created.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn unadmit_user(&self, user: Option<&str>, id: &str) -> Result<(), StoreError> {
        let _: i64 = self.conn().srem(user_open_key(user), id).await?;
        Ok(())
    }

    /// Records a cancel request (honoured by whichever replica runs the session, now or
    /// after a takeover) and tells the owner.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let _: i64 = conn.hset(session_key(id), "cancel", 1).await?;
        self.publish_wake(id, "cancel").await
    }

    /// Whether a cancel was requested for the session.
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn cancel_requested(&self, id: &str) -> Result<bool, StoreError> {
        let v: Option<String> = self.conn().hget(session_key(id), "cancel").await?;
        Ok(v.as_deref() == Some("1"))
    }

    /// Tells the session's owner of `what` (`chunk` or `cancel`) on [`WAKE_CHANNEL`].
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn publish_wake(&self, id: &str, what: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .conn()
            .publish(WAKE_CHANNEL, format!("{id} {what}"))
            .await?;
        Ok(())
    }

    /// A connection subscribed to [`EVENTS_CHANNEL`] and [`WAKE_CHANNEL`].
    ///
    /// # Errors
    /// Redis unreachable or failing.
    pub async fn subscribe(&self) -> Result<redis::aio::PubSub, StoreError> {
        let mut ps = self.client().get_async_pubsub().await?;
        ps.subscribe(&[EVENTS_CHANNEL, WAKE_CHANNEL]).await?;
        Ok(ps)
    }
}
