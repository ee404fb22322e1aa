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

/// Lua: writes a progress snapshot (ARGV 1..6: status, acked_seq or "", audio_ms, transcript,
/// end_reason or "", at_ms) to the session hash KEYS[1]; a status never goes back (see
/// `sqlite::write_progress`). Shared by `update_progress` and `end_session`.
const PROGRESS_LUA: &str = r"
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
local function event(key, seq, json)
  if redis.call('ZCOUNT', key, seq, seq) == 0 then redis.call('ZADD', key, seq, json) end
end
";

/// A Redis-backed session store.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
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
        let mut conn = ConnectionManager::new_with_config(client, config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(Self {
            conn,
            update: Script::new(&format!("{PROGRESS_LUA} return progress(KEYS[1], ARGV)")),
            end: Script::new(&format!(
                "{PROGRESS_LUA} event(KEYS[2], ARGV[7], ARGV[8]) \
                 local r = progress(KEYS[1], ARGV) redis.call('DEL', KEYS[3]) return r"
            )),
            insert: Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 1 then \
                   return redis.error_reply('session ' .. KEYS[1] .. ' exists') end \
                 redis.call('HSET', KEYS[1], unpack(ARGV)) return 1",
            ),
            event: Script::new(&format!("{PROGRESS_LUA} event(KEYS[1], ARGV[1], ARGV[2]) return 1")),
            reserve: Script::new(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end \
                 local cur = tonumber(redis.call('HGET', KEYS[1], 'seq_reserved') or '0') \
                 if tonumber(ARGV[1]) > cur then redis.call('HSET', KEYS[1], 'seq_reserved', ARGV[1]) end \
                 return 1",
            ),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

fn session_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:s")
}

fn events_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:e")
}

fn chunks_key(id: &str) -> String {
    format!("voxpoll:{{{id}}}:c")
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
fn record_from(mut h: HashMap<String, String>) -> Result<SessionRecord, StoreError> {
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
    Ok(SessionRecord {
        epoch: num(&h, "epoch")?.ok_or_else(|| bad("epoch"))?,
        acked_seq: num(&h, "acked_seq")?,
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
        let mut inv = self.insert.key(session_key(&rec.id));
        for (k, v) in record_fields(rec) {
            inv.arg(k).arg(v);
        }
        let mut conn = self.conn();
        let _: i64 = inv.invoke_async(&mut conn).await?;
        if rec.ended_at_ms.is_none() {
            let _: i64 = conn.sadd(UNFINISHED, &rec.id).await?;
        }
        Ok(())
    }

    async fn update_progress(&self, id: &str, p: &SessionProgress) -> Result<(), StoreError> {
        let _: i64 = self
            .update
            .key(session_key(id))
            .arg(&progress_args(p))
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn append_event(&self, id: &str, ev: &StoredEvent) -> Result<(), StoreError> {
        let _: i64 = self
            .event
            .key(events_key(id))
            .arg(ev.seq)
            .arg(&ev.json)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn end_session(
        &self,
        id: &str,
        p: &SessionProgress,
        end: &StoredEvent,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let _: i64 = self
            .end
            .key(session_key(id))
            .key(events_key(id))
            .key(chunks_key(id))
            .arg(&progress_args(p))
            .arg(end.seq)
            .arg(&end.json)
            .invoke_async(&mut conn)
            .await?;
        // Outside the script (another slot in a Cluster); `unfinished` also checks the status.
        let _: i64 = conn.srem(UNFINISHED, id).await?;
        Ok(())
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let h: HashMap<String, String> = self.conn().hgetall(session_key(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        record_from(h).map(Some)
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
                data: v.get(1..).unwrap_or_default().to_vec(),
            })
            .collect();
        out.sort_by_key(|c| c.seq);
        Ok(out)
    }

    async fn reserve_seqs(&self, id: &str, upto: u64) -> Result<(), StoreError> {
        let _: i64 = self
            .reserve
            .key(session_key(id))
            .arg(upto)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    async fn reserved_seqs(&self, id: &str) -> Result<u64, StoreError> {
        let v: Option<u64> = self.conn().hget(session_key(id), "seq_reserved").await?;
        Ok(v.unwrap_or(0))
    }
}
