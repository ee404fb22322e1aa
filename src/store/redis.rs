//! [`SessionStore`] on Redis 7+ / Valkey (crate `redis`, tokio + its auto-reconnecting
//! `ConnectionManager`): the shared engine several replicas will use (issue 12). Every key of
//! one session carries the session id as its hash tag, so one session's writes stay in one
//! Cluster slot and each multi-key write is one Lua script (atomic):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `voxpoll:{<id>}:s` | hash | the [`SessionRecord`] fields, plus `seq_reserved` |
//! | `voxpoll:{<id>}:e` | sorted set | stored events: score = seq, member = the event JSON |
//! | `voxpoll:{<id>}:c` | hash | chunks not yet consumed: field = seq, value = `last` byte + bytes |
//! | `voxpoll:unfinished` | set | ids of sessions not yet ended (for [`SessionStore::unfinished`]) |
//!
//! "Acknowledged means stored" holds as far as Redis persists what it acknowledged: run it with
//! `appendonly yes` and `appendfsync everysec` (at most 1 s of acknowledged chunks lost on a
//! power cut) or `always` (none). The semantics match the SQLite store: writes are idempotent
//! on (session, seq), a status never goes back, ending drops the chunks.

use super::{ChunkRecord, SessionProgress, SessionRecord, SessionStore, StoreError, StoredEvent};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Longest wait for one command's answer or one connection attempt: past it the call fails
/// (the engine answers 503 `store_unavailable`) instead of hanging while Redis is away.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// Index of sessions not yet ended.
const UNFINISHED: &str = "voxpoll:unfinished";

/// Channel every stored event is announced on, as `<session id> <seq>`: replicas holding a
/// long-poll for that session wake up (see `redis_coord`).
pub const EVENTS_CHANNEL: &str = "voxpoll:ev";

/// Lua shared by the write scripts:
/// - `fenced(s, fence)`: true when a writer bound to epoch `fence` (a non-empty, non-zero
///   string) is no longer the session's owner: the session hash's `epoch` moved on because
///   another replica took the session over. Such writes are refused with a `FENCED` error.
/// - `progress(s, a)`: writes a progress snapshot (a 1..6: status, acked_seq or "", audio_ms,
///   transcript, end_reason or "", at_ms); a status never goes back (see
///   `sqlite::write_progress`).
/// - `event(e, p, seq, json)`: stores an event once per seq; a partial or final of sentence k
///   replaces the partial of k stored before, and a final also drops k's `speech_start` (as
///   `EventLog::append` coalesces them in memory), so the stored log never holds more than one
///   partial per sentence. `p` maps `k` to the seq of k's partial and `s<k>` to its start.
const PROGRESS_LUA: &str = r"
local function fenced(key, fence)
  if fence == nil or fence == '' or fence == '0' then return false end
  local cur = redis.call('HGET', key, 'epoch')
  return cur and cur ~= fence
end
local function progress(key, a)
  if redis.call('EXISTS', key) == 0 then return 0 end
  local status = a[1]
  local cur = redis.call('HGET', key, 'status')
  if redis.call('HEXISTS', key, 'ended_at_ms') == 1 then status = cur
  elseif cur == 'finishing' and a[1] == 'open' then status = cur end
  redis.call('HSET', key, 'status', status, 'audio_ms', a[3], 'transcript', a[4], 'updated_at_ms', a[6])
  if a[2] == '' then redis.call('HDEL', key, 'acked_seq') else redis.call('HSET', key, 'acked_seq', a[2]) end
  if a[5] ~= '' then redis.call('HSET', key, 'end_reason', a[5], 'ended_at_ms', a[6]) end
  return 1
end
local function event(key, pkey, seq, json)
  if redis.call('ZCOUNT', key, seq, seq) ~= 0 then return end
  local ok, ev = pcall(cjson.decode, json)
  if ok and type(ev) == 'table' then
    local sentence = tostring(ev.sentence)
    local drop = {}
    if ev.type == 'partial' or ev.type == 'final' then drop[#drop + 1] = sentence end
    if ev.type == 'final' then drop[#drop + 1] = 's' .. sentence end
    for _, field in ipairs(drop) do
      local old = redis.call('HGET', pkey, field)
      if old then redis.call('ZREMRANGEBYSCORE', key, old, old) redis.call('HDEL', pkey, field) end
    end
    if ev.type == 'partial' then redis.call('HSET', pkey, sentence, seq) end
    if ev.type == 'speech_start' then redis.call('HSET', pkey, 's' .. sentence, seq) end
  end
  redis.call('ZADD', key, seq, json)
end
local function refuse() return redis.error_reply('FENCED the session was taken over by another replica') end
";

/// Set of the open sessions of one user (`None`: auth off), for the cluster-wide
/// `max_sessions_per_user`.
pub(super) fn user_open_key(user: Option<&str>) -> String {
    format!("voxpoll:u:{{{}}}:open", user.unwrap_or(""))
}

/// A Redis-backed session store.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    /// The epoch this handle writes under ([`SessionStore::fenced`]); `None`: unfenced.
    fence: Option<u64>,
    scripts: std::sync::Arc<Scripts>,
}

struct Scripts {
    update: Script,
    end: Script,
    insert: Script,
    event: Script,
    reserve: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://[user:password@]host[:port][/db]`, `rediss://…` for TLS,
    /// `redis+unix:///path/to/socket`) and checks the server answers. The connection is
    /// re-established in the background after a loss; until then calls fail within
    /// [`REDIS_TIMEOUT`].
    ///
    /// # Errors
    /// A malformed URL, or a server that cannot be reached or refuses the credentials.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_factor(100)
            .set_max_delay(1_000)
            .set_connection_timeout(REDIS_TIMEOUT)
            .set_response_timeout(REDIS_TIMEOUT);
        let mut conn = ConnectionManager::new_with_config(client.clone(), config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        let scripts = Scripts {
            update: Script::new(&format!(
                "{PROGRESS_LUA} if fenced(KEYS[1], ARGV[7]) then return refuse() end \
                 return progress(KEYS[1], ARGV)"
            )),
            // KEYS: s, e, c, p, unfinished, the user's open set; ARGV: progress 1..6, end seq,
            // end json, fence, id. One script: once the end is visible, the session is out of
            // the unfinished index and its user's budget (a create right after a cancel fits).
            end: Script::new(&format!(
                "{PROGRESS_LUA} if fenced(KEYS[1], ARGV[9]) then return refuse() end \
                 event(KEYS[2], KEYS[4], ARGV[7], ARGV[8]) \
                 local r = progress(KEYS[1], ARGV) redis.call('DEL', KEYS[3], KEYS[4]) \
                 redis.call('SREM', KEYS[5], ARGV[10]) redis.call('SREM', KEYS[6], ARGV[10]) \
                 redis.call('PUBLISH', '{EVENTS_CHANNEL}', ARGV[10] .. ' ' .. ARGV[7]) return r"
            )),
            insert: Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then \
                   return redis.error_reply('session ' .. KEYS[1] .. ' exists') end \
                 redis.call('HSET', KEYS[1], unpack(ARGV)) return 1",
            ),
            // KEYS: e, s, p; ARGV: seq, json, fence, id.
            event: Script::new(&format!(
                "{PROGRESS_LUA} if fenced(KEYS[2], ARGV[3]) then return refuse() end \
                 event(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) \
                 redis.call('PUBLISH', '{EVENTS_CHANNEL}', ARGV[4] .. ' ' .. ARGV[1]) return 1"
            )),
            reserve: Script::new(&format!(
                "{PROGRESS_LUA} if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 if fenced(KEYS[1], ARGV[2]) then return refuse() end \
                 local cur = tonumber(redis.call('HGET', KEYS[1], 'seq_reserved') or '0') \
                 if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'seq_reserved', ARGV[1]) end \
                 return 1"
            )),
        };
        Ok(Self {
            client,
            conn,
            fence: None,
            scripts: std::sync::Arc::new(scripts),
        })
    }

    pub(super) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The client, for connections of their own (pub/sub).
    pub(super) fn client(&self) -> &redis::Client {
        &self.client
    }

    fn fence_arg(&self) -> String {
        self.fence.map(|e| e.to_string()).unwrap_or_default()
    }
}

/// A script's answer, with a `FENCED` refusal told apart.
fn scripted<T>(r: Result<T, redis::RedisError>) -> Result<T, StoreError> {
    r.map_err(|e| {
        if e.code() == Some("FENCED") {
            StoreError::Fenced
        } else {
            StoreError::Redis(e)
        }
    })
}

pub(super) fn session_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:s")
}

pub(super) fn events_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:e")
}

pub(super) fn chunks_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:c")
}

/// Sentence → seq of its stored partial.
pub(super) fn partials_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:p")
}

/// The ARGV 1..6 of [`PROGRESS_LUA`].
fn progress_args(p: &SessionProgress) -> [String; 6] {
    [
        p.status.clone(),
        p.acked_seq.map(|s| s.to_string()).unwrap_or_default(),
        p.audio_ms.to_string(),
        p.transcript.clone(),
        p.end_reason.clone().unwrap_or_default(),
        p.at_ms.to_string(),
    ]
}

/// A session record as hash fields (absent options are left out).
fn record_fields(r: &SessionRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", r.id.clone()),
        ("token_sha256", r.token_sha256.clone()),
        ("provider", r.provider.clone()),
        ("engine", r.engine.clone()),
        ("options_json", r.options_json.clone()),
        ("status", r.status.clone()),
        ("epoch", r.epoch.to_string()),
        ("audio_ms", r.audio_ms.to_string()),
        ("transcript", r.transcript.clone()),
        ("created_at_ms", r.created_at_ms.to_string()),
        ("updated_at_ms", r.updated_at_ms.to_string()),
        ("seq_reserved", "0".into()),
    ];
    let optional = [
        ("user_id", r.user_id.clone()),
        ("acked_seq", r.acked_seq.map(|v| v.to_string())),
        ("end_reason", r.end_reason.clone()),
        ("ended_at_ms", r.ended_at_ms.map(|v| v.to_string())),
    ];
    f.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))));
    f
}

/// Reads a record back from its hash fields.
pub(super) fn record_from_hash(
    mut h: HashMap<String, String>,
) -> Result<SessionRecord, StoreError> {
    let bad = |field: &str| StoreError::Corrupt(format!("session field {field} missing or bad"));
    let mut text = |k: &str| h.remove(k).ok_or_else(|| bad(k));
    let id = text("id")?;
    let token_sha256 = text("token_sha256")?;
    let provider = text("provider")?;
    let engine = text("engine")?;
    let options_json = text("options_json")?;
    let status = text("status")?;
    let transcript = text("transcript")?;
    let num = |h: &HashMap<String, String>, k: &str| -> Result<Option<u64>, StoreError> {
        h.get(k).map(|v| v.parse().map_err(|_| bad(k))).transpose()
    };
    // Under replicas the chunk log's own count (`in_next`, see `redis_coord`) is the truth.
    let acked_seq = match num(&h, "in_next")? {
        Some(next) => next.checked_sub(1),
        None => num(&h, "acked_seq")?,
    };
    Ok(SessionRecord {
        epoch: num(&h, "epoch")?.ok_or_else(|| bad("epoch"))?,
        acked_seq,
        audio_ms: num(&h, "audio_ms")?.unwrap_or(0),
        created_at_ms: num(&h, "created_at_ms")?.ok_or_else(|| bad("created_at_ms"))?,
        updated_at_ms: num(&h, "updated_at_ms")?.unwrap_or(0),
        ended_at_ms: num(&h, "ended_at_ms")?,
        user_id: h.remove("user_id"),
        end_reason: h.remove("end_reason"),
        id,
        token_sha256,
        provider,
        engine,
        options_json,
        status,
        transcript,
    })
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    async fn insert_session(&self, rec: &SessionRecord) -> Result<(), StoreError> {
        let mut inv = self.scripts.insert.key(session_key(&rec.id));
        for (k, v) in record_fields(rec) {
            inv.arg(k).arg(v);
        }
        let mut conn = self.conn();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        if rec.ended_at_ms.is_none() {
            let _: i64 = conn.sadd(UNFINISHED, &rec.id).await?;
        }
        // The history index (history_redis.rs).
        let member = format!("s:{}", rec.id);
        let user = rec.user_id.as_deref();
        let _: i64 = conn
            .zadd(
                super::history_redis::history_key(user),
                &member,
                rec.created_at_ms,
            )
            .await?;
        let _: i64 = conn
            .zadd(
                "voxpoll:h:all",
                super::history_redis::all_member(user, &member),
                rec.created_at_ms,
            )
            .await?;
        Ok(())
    }

    async fn update_progress(&self, id: &str, p: &SessionProgress) -> Result<(), StoreError> {
        let r: Result<i64, _> = self
            .scripts
            .update
            .key(session_key(id))
            .arg(&progress_args(p))
            .arg(self.fence_arg())
            .invoke_async(&mut self.conn())
            .await;
        scripted(r).map(drop)
    }

    async fn append_event(&self, id: &str, ev: &StoredEvent) -> Result<(), StoreError> {
        let r: Result<i64, _> = self
            .scripts
            .event
            .key(events_key(id))
            .key(session_key(id))
            .key(partials_key(id))
            .arg(ev.seq)
            .arg(&ev.json)
            .arg(self.fence_arg())
            .arg(id)
            .invoke_async(&mut self.conn())
            .await;
        scripted(r).map(drop)
    }

    async fn end_session(
        &self,
        id: &str,
        p: &SessionProgress,
        end: &StoredEvent,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let user: Option<String> = conn.hget(session_key(id), "user_id").await?;
        let r: Result<i64, _> = self
            .scripts
            .end
            .key(session_key(id))
            .key(events_key(id))
            .key(chunks_key(id))
            .key(partials_key(id))
            .key(UNFINISHED)
            .key(user_open_key(user.as_deref()))
            .arg(&progress_args(p))
            .arg(end.seq)
            .arg(&end.json)
            .arg(self.fence_arg())
            .arg(id)
            .invoke_async(&mut conn)
            .await;
        scripted(r).map(drop)
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let h: HashMap<String, String> = self.conn().hgetall(session_key(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        record_from_hash(h).map(Some)
    }

    async fn events_after(&self, id: &str, after: u64) -> Result<Vec<StoredEvent>, StoreError> {
        let rows: Vec<(String, u64)> = self
            .conn()
            .zrangebyscore_withscores(events_key(id), format!("({after}"), "+inf")
            .await?;
        Ok(rows
            .into_iter()
            .map(|(json, seq)| StoredEvent { seq, json })
            .collect())
    }

    async fn unfinished(&self) -> Result<Vec<(SessionRecord, u64)>, StoreError> {
        let ids: Vec<String> = self.conn().smembers(UNFINISHED).await?;
        let mut out = Vec::new();
        for id in ids {
            let Some(rec) = self.get_session(&id).await? else {
                continue;
            };
            if rec.status != "open" && rec.status != "finishing" {
                continue;
            }
            let last: Vec<(String, u64)> = self
                .conn()
                .zrange_withscores(events_key(&id), -1, -1)
                .await?;
            out.push((rec, last.first().map_or(0, |(_, s)| *s)));
        }
        out.sort_by_key(|(r, _)| r.created_at_ms);
        Ok(out)
    }

    fn fenced(&self, epoch: u64) -> std::sync::Arc<dyn SessionStore> {
        std::sync::Arc::new(Self {
            fence: Some(epoch),
            ..self.clone()
        })
    }

    async fn check_writable(&self) -> Result<(), StoreError> {
        let _: () = self
            .conn()
            .set_ex("voxpoll:writable", crate::clock::now_ms(), 60)
            .await?;
        Ok(())
    }

    async fn put_chunks(&self, chunks: Vec<ChunkRecord>) -> Result<(), StoreError> {
        // One MULTI per session: atomic where a Cluster can be (one slot).
        let mut by_session: BTreeMap<&str, Vec<&ChunkRecord>> = BTreeMap::new();
        for c in &chunks {
            by_session.entry(&c.session_id).or_default().push(c);
        }
        let mut conn = self.conn();
        for (id, list) in by_session {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for c in list {
                let mut value = Vec::with_capacity(c.data.len() + 1);
                value.push(u8::from(c.last));
                value.extend_from_slice(&c.data);
                pipe.hset_nx(chunks_key(id), c.seq, value).ignore();
            }
            let _: () = pipe.query_async(&mut conn).await?;
        }
        Ok(())
    }

    async fn chunks(&self, id: &str) -> Result<Vec<ChunkRecord>, StoreError> {
        let h: HashMap<u64, Vec<u8>> = self.conn().hgetall(chunks_key(id)).await?;
        let mut out: Vec<ChunkRecord> = h
            .into_iter()
            .map(|(seq, v)| ChunkRecord {
                session_id: id.to_string(),
                seq,
                last: v.first() == Some(&1),
                data: bytes::Bytes::copy_from_slice(v.get(1..).unwrap_or_default()),
            })
            .collect();
        out.sort_by_key(|c| c.seq);
        Ok(out)
    }

    async fn reserve_seqs(&self, id: &str, upto: u64) -> Result<(), StoreError> {
        let r: Result<i64, _> = self
            .scripts
            .reserve
            .key(session_key(id))
            .arg(upto)
            .arg(self.fence_arg())
            .invoke_async(&mut self.conn())
            .await;
        scripted(r).map(drop)
    }

    async fn reserved_seqs(&self, id: &str) -> Result<u64, StoreError> {
        let v: Option<u64> = self.conn().hget(session_key(id), "seq_reserved").await?;
        Ok(v.unwrap_or(0))
    }
}
