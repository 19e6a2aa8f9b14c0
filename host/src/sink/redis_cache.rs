//! Redis, the remote cache (and the store of `cache-only` groups).
//!
//! One hash per (group, entity) at `fh:<group>#<entity>`:
//! - one field per live feature, holding its value as plain JSON (what serving clients read
//!   with `HGET`/`HMGET`);
//! - `__v`: the store version the entry reflects;
//! - `__s`: the full state (values, event times, positions) as JSON, for typed reads;
//! - `__inv`: present on an invalidation marker (write-around): readers treat it as a miss.
//!
//! Field/value pairs are passed to `HSET` in chunks: Lua's `unpack` is limited to ~8000
//! values. All writes are Lua scripts that check `__v` server-side, so a delayed writer or reader can
//! never replace a newer entry with an older one.

use super::{Cache, CacheFill, Loaded, SinkError, Store, Swap, Target};
use crate::feature::{EntityState, Versioned};
use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionManager;
use std::sync::LazyLock;
use std::time::Duration;

const BACKEND: &str = "Redis";

/// Replace the hash with the given fields if its version is older (an invalidation marker at
/// the same version also yields). ARGV: version, ttl ms (0 = none), field, value, ...
static PUT_IF_NEWER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.pcall('HMGET', KEYS[1], '__v', '__inv')
local v = tonumber(ARGV[1])
-- A key of another type, or a version that is not a number, is not this host's entry: a
-- cache in front of a store replaces it.
if type(cur) == 'table' and cur[1] then
  local cv = tonumber(cur[1])
  if cv and ((cur[2] and v < cv) or ((not cur[2]) and v <= cv)) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '__v', ARGV[1])
for i = 3, #ARGV, 1000 do redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV))) end
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#,
    )
});

/// Replace the hash with an invalidation marker at version ARGV[1] unless it holds a newer
/// version. ARGV: version, ttl ms.
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = redis.pcall('HGET', KEYS[1], '__v')
local cv = type(cur) == 'string' and tonumber(cur) or 0
if cv > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], '__v', ARGV[1], '__inv', '1')
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"#,
    )
});

/// Compare-and-swap for `cache-only` groups, a batch of swaps in one script call: one round
/// trip and one script invocation per call rather than per entity. Swaps are judged in their
/// order, each on its own: a key of another type answers -1 (`pcall`), the others are still
/// swapped; any other refusal fails the call as a whole. One call touches many keys, so it
/// needs one Redis primary holding them all (not Redis Cluster, where they would span
/// slots). A swap that knows the state at its expected version removes only the fields of
/// the features gone since: every script of this host writes an entry's hash whole, as `__v`,
/// `__s` and one field per live feature, so at that version it holds that state's fields
/// (and whatever another client added since, which stays). A swap that does not know it,
/// and every first write, replaces the hash (`DEL`), a command more.
/// KEYS: one per swap. ARGV per swap: expected version ('0' = absent), expire-at Unix seconds
/// (0 = none), n, m (-1: replace), then n field/value items starting with `__v` and the new
/// version, then m fields to remove. Answers: 1 swapped, 0 lost, -1 another type.
static CAS_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out, a = {}, 1
for k = 1, #KEYS do
  local key, expected, expire_at = KEYS[k], ARGV[a], ARGV[a + 1]
  local n, m = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local first, last = a + 4, a + 3 + n
  local gone = last + math.max(m, 0)
  a = gone + 1
  local cur = redis.pcall('HGET', key, '__v')
  if type(cur) == 'table' then
    -- Another writer's key is that swap's failure; any other refusal (an ACL, say) the
    -- call's, as an outage.
    if string.find(cur.err, 'WRONGTYPE', 1, true) ~= 1 then return cur end
    out[k] = -1
  elseif (cur == false and expected ~= '0') or (cur ~= false and cur ~= expected) then
    out[k] = 0
  else
    if m < 0 then
      redis.call('DEL', key)
    else
      for i = last + 1, gone, 1000 do redis.call('HDEL', key, unpack(ARGV, i, math.min(i + 999, gone))) end
    end
    for i = first, last, 1000 do redis.call('HSET', key, unpack(ARGV, i, math.min(i + 999, last))) end
    if tonumber(expire_at) > 0 then
      redis.call('EXPIREAT', key, expire_at)
    elseif m >= 0 then
      redis.call('PERSIST', key)
    end
    out[k] = 1
  end
end
return out
"#,
    )
});

pub struct RedisCache {
    conn: ConnectionManager,
}

fn unavailable(e: redis::RedisError) -> SinkError {
    SinkError::Unavailable {
        backend: BACKEND,
        message: e.to_string(),
    }
}

impl RedisCache {
    /// Connect to `url` (`redis://host:port/db`). The connection reconnects by itself.
    pub async fn connect(url: &str) -> anyhow::Result<RedisCache> {
        // The URL may carry the password: shown redacted.
        let shown = crate::text::redact_url(url);
        let client = redis::Client::open(url)
            .map_err(|e| anyhow::anyhow!("invalid Redis URL {shown}: {e}"))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to Redis at {shown}: {e}"))?;
        Ok(RedisCache { conn })
    }

    /// The Redis key of a store key.
    pub fn redis_key(key: &str) -> String {
        format!("fh:{key}")
    }

    /// The hash fields (name, value, …) of an entry: `__s` (the full state) and one field
    /// per live feature. `__v` is set separately.
    pub fn fields(entry: &Versioned) -> Result<Vec<String>, SinkError> {
        let mut out = Vec::with_capacity(2 + entry.state.features.len() * 2);
        out.push("__s".into());
        out.push(
            serde_json::to_string(&entry.state).map_err(|e| SinkError::Rejected {
                backend: BACKEND,
                message: e.to_string(),
            })?,
        );
        for (name, value) in entry.state.values() {
            out.push(name.to_owned());
            out.push(value.to_json().to_string());
        }
        Ok(out)
    }

    async fn read(&self, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        let mut pipe = redis::pipe();
        for k in keys {
            pipe.cmd("HMGET")
                .arg(Self::redis_key(k))
                .arg("__v")
                .arg("__s")
                .arg("__inv");
        }
        // Per key (`decode_row`): one key of another type must not fail the others.
        let rows: Vec<redis::RedisResult<Row>> = pipe
            .ignore_errors()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .zip(keys)
            .map(|(row, key)| decode_row(key, row))
            .collect())
    }
}

/// What a read asks of each key: `HMGET __v __s __inv`.
type Row = (Option<String>, Option<String>, Option<String>);

/// One key's [`Row`]. Another writer's key of another type, or a `__v` that is
/// not a version, is unreadable: its own entity fails, not the batch.
fn decode_row(key: &str, row: redis::RedisResult<Row>) -> Loaded {
    let unreadable = |why: &dyn std::fmt::Display| SinkError::unreadable(BACKEND, key, why);
    let (v, s, inv) = row.map_err(|e| match e.code() {
        Some("WRONGTYPE") => unreadable(&e),
        _ => unavailable(e),
    })?;
    let version = match v {
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| unreadable(&format!("__v {v:?} is not a version")))?,
        ),
        None => None,
    };
    match (version, s, inv) {
        (Some(version), Some(state), None) => EntityState::from_stored_json(state.as_bytes())
            .map(|state| Some(Versioned { version, state }))
            .map_err(|why| unreadable(&why)),
        _ => Ok(None),
    }
}

#[async_trait]
impl Cache for RedisCache {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn put_if_newer(&self, fills: &[CacheFill]) -> Result<(), SinkError> {
        if fills.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&PUT_IF_NEWER).ignore();
        for f in fills {
            let mut inv = PUT_IF_NEWER.key(Self::redis_key(&f.key));
            inv.arg(f.entry.version)
                .arg(f.ttl.as_millis() as u64)
                .arg(Self::fields(&f.entry)?);
            pipe.invoke_script(&inv).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn invalidate(&self, keys: &[(String, u64)], ttl: Duration) -> Result<(), SinkError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.load_script(&INVALIDATE).ignore();
        for (key, version) in keys {
            let mut inv = INVALIDATE.key(Self::redis_key(key));
            inv.arg(*version).arg(ttl.as_millis() as u64);
            pipe.invoke_script(&inv).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, SinkError> {
        self.read(&[key.to_owned()])
            .await?
            .pop()
            .unwrap_or(Ok(None))
    }
}

#[async_trait]
impl Store for RedisCache {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn load(&self, _target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        self.read(keys).await
    }

    async fn compare_and_swap(
        &self,
        target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        let swap = Swap {
            key,
            expected,
            next,
            previous: None,
        };
        self.compare_and_swap_many(target, &[swap])
            .await?
            .pop()
            .unwrap_or_else(|| Err(not_sent()))
    }

    /// The batch's swaps as script calls of at most [`SWAPS_PER_CALL`] swaps and
    /// [`CALL_BYTES`] of values (one, for batches of small entities), each in a pipeline
    /// behind a `SCRIPT LOAD`: one round trip per call. A key of another type fails only
    /// its entity. The bounds keep each call short for Redis, which runs a script alone,
    /// so that serving reads and other groups' requests get in between calls.
    async fn compare_and_swap_many(
        &self,
        _target: &Target,
        swaps: &[Swap<'_>],
    ) -> Result<Vec<Result<bool, SinkError>>, SinkError> {
        let mut answers: Vec<Option<Result<bool, SinkError>>> = vec![None; swaps.len()];
        let mut call = Call::default();
        for (i, s) in swaps.iter().enumerate() {
            let fields = match RedisCache::fields(s.next) {
                Ok(fields) => fields,
                Err(e) => {
                    answers[i] = Some(Err(e));
                    continue;
                }
            };
            let size: usize = fields.iter().map(String::len).sum();
            if !call.swaps.is_empty()
                && (call.swaps.len() == SWAPS_PER_CALL || call.bytes + size > CALL_BYTES)
            {
                self.swap_call(std::mem::take(&mut call), &mut answers)
                    .await?;
            }
            call.push(i, s, fields, size);
        }
        if !call.swaps.is_empty() {
            self.swap_call(call, &mut answers).await?;
        }
        Ok(answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(not_sent())))
            .collect())
    }
}

/// Swaps per script call, and bytes of field values (see
/// [`RedisCache::compare_and_swap_many`]).
const SWAPS_PER_CALL: usize = 256;
const CALL_BYTES: usize = 4 << 20;

fn not_sent() -> SinkError {
    SinkError::Unavailable {
        backend: BACKEND,
        message: "a swap was not sent".into(),
    }
}

/// One [`CAS_MANY`] call being gathered: its keys and arguments, and the index in the
/// batch of each of its swaps.
struct Call {
    invocation: redis::ScriptInvocation<'static>,
    swaps: Vec<usize>,
    bytes: usize,
}

impl Default for Call {
    fn default() -> Call {
        Call {
            invocation: CAS_MANY.prepare_invoke(),
            swaps: Vec::new(),
            bytes: 0,
        }
    }
}

impl Call {
    fn push(&mut self, index: usize, swap: &Swap<'_>, fields: Vec<String>, size: usize) {
        self.invocation
            .key(RedisCache::redis_key(swap.key))
            .arg(swap.expected)
            .arg(swap.next.state.expires_at.unwrap_or(0))
            .arg(fields.len() + 2);
        // A first write replaces the hash: a key without `__v` reads as absent, and
        // whatever it holds is no state's.
        let previous = swap.previous.filter(|_| swap.expected != 0);
        let gone: Option<Vec<&str>> = previous.map(|previous| {
            previous
                .values()
                .map(|(name, _)| name)
                .filter(|name| {
                    let cell = swap.next.state.features.get(*name);
                    cell.is_none_or(|c| c.value.is_none())
                })
                .collect()
        });
        self.invocation
            .arg(gone.as_ref().map_or(-1, |g| g.len() as i64))
            .arg("__v")
            .arg(swap.next.version)
            .arg(fields);
        if let Some(gone) = gone {
            self.invocation.arg(gone);
        }
        self.swaps.push(index);
        self.bytes += size;
    }
}

impl RedisCache {
    /// One script call of swaps, in a pipeline behind `SCRIPT LOAD`; each answer put at its
    /// swap's index. A call that finds no script because the load failed (an ACL refusing
    /// `SCRIPT`) fails under the load's reason rather than a bare `NOSCRIPT`. A call that
    /// fails as a whole (a command the ACL refuses inside the script, a lost connection)
    /// fails each of its swaps as an outage: the swaps before the failure may have been
    /// applied, and the positions they wrote make their events' retries replays.
    async fn swap_call(
        &self,
        call: Call,
        answers: &mut [Option<Result<bool, SinkError>>],
    ) -> Result<(), SinkError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors()
            .load_script(&CAS_MANY)
            .invoke_script(&call.invocation);
        let mut replies: Vec<redis::RedisResult<redis::Value>> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let (load, reply) = match (replies.pop(), replies.pop()) {
            (Some(reply), Some(load)) if replies.is_empty() => (load.err(), reply),
            _ => {
                return Err(SinkError::Unavailable {
                    backend: BACKEND,
                    message: format!("answered none of {} swaps", call.swaps.len()),
                });
            }
        };
        let codes = reply
            .and_then(|v| redis::from_redis_value::<Vec<i64>>(v).map_err(Into::into))
            .map_err(|e| match &load {
                // The script is not there because it could not be loaded: that is the
                // cause to show. (Where it was there already, the call ran.)
                Some(why) if e.code() == Some("NOSCRIPT") => SinkError::Unavailable {
                    backend: BACKEND,
                    message: format!("cannot load the compare-and-swap script: {why}"),
                },
                _ => unavailable(e),
            });
        let codes = match codes {
            Ok(codes) if codes.len() == call.swaps.len() => codes,
            Ok(codes) => {
                let e = SinkError::Unavailable {
                    backend: BACKEND,
                    message: format!("answered {} of {} swaps", codes.len(), call.swaps.len()),
                };
                for i in call.swaps {
                    answers[i] = Some(Err(e.clone()));
                }
                return Ok(());
            }
            Err(e) => {
                for i in call.swaps {
                    answers[i] = Some(Err(e.clone()));
                }
                return Ok(());
            }
        };
        for (i, code) in call.swaps.into_iter().zip(codes) {
            answers[i] = Some(match code {
                1 => Ok(true),
                0 => Ok(false),
                // Data, not an outage: that entity fails, the others are written.
                -1 => Err(SinkError::Rejected {
                    backend: BACKEND,
                    message: "the key holds a value of another type than this host's hash \
                              (WRONGTYPE): another writer's key; rename or delete it"
                        .into(),
                }),
                other => Err(SinkError::Unavailable {
                    backend: BACKEND,
                    message: format!("the compare-and-swap script answered {other}"),
                }),
            });
        }
        Ok(())
    }
}
