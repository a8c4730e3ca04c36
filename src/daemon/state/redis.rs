//! The Redis backend of the per-subject state (issue 18): the escalation matrix of
//! `daemon::escalation`, the RULE-MIST-010 rate limit, the Level-2 review queue and GCRA limits,
//! shared exactly across replicas.
//!
//! # Connection and timeouts
//!
//! One [`redis::aio::ConnectionManager`] per backend (cloned, never re-created): it is built with
//! `ConnectionManager::new_lazy_with_config`, so [`RedisBackend::new`] neither connects nor needs
//! Redis to be up (it must run inside a Tokio runtime: the manager spawns a task). The first call
//! connects; when a call fails with an I/O error (refused, reset, timed out) the manager starts a
//! new connection in the background and the next calls wait on it. Every call is bounded twice:
//! by `tokio::time::timeout(timeout)` around the whole call, and by the manager's connection and
//! response timeouts (set to the same value), so no call waits longer than `timeout`; a call past
//! it is [`StateError::Timeout`], a failed one [`StateError::Unavailable`], and either counts in
//! `mistguard_state_redis_errors_total{op}`. Error texts never contain the URL's password.
//!
//! # Key layout (`{P}` = the prefix, default `mistguard:`; `{S}` = a subject hash)
//!
//! | key | type | content | expiry |
//! |---|---|---|---|
//! | `{P}sus:{S}` | string | suspended until (ms since the epoch) | PX the suspension |
//! | `{P}rl:{S}` | string | rate-limited (RULE-MIST-010) until | PX `rate_limit_ms` |
//! | `{P}hit:{S}` | string | `1`: a hit within the level-2 window | PX `level2_window_ms` |
//! | `{P}win:{S}` | sorted set | decision ids of severe decisions, scored by time; at most `level2_hits` | PX `level2_window_ms` |
//! | `{P}ev:{S}` | sorted set | `<rule id>\n<decision id>` per rule of each decision, scored by time; at most 1,024 | PX `level2_window_ms` |
//! | `{P}rev:{S}` | string | the review entry (JSON [`ReviewEntry`]) | PX the suspension |
//! | `{P}reviews` | sorted set | suspended subjects scored by suspension time | pruned (below) |
//! | `{P}l3` | sorted set | subjects that reached level 2, scored by time; at most `level3_subjects` | PX `level3_window_ms` |
//! | `{P}l3alert` | string | set NX when the level-3 alert fires | PX `level3_window_ms` |
//! | `{P}<key>` | string | GCRA theoretical arrival time, `<ms>:<remainder>` | PX its distance from now |
//!
//! The review entry's rule counts are the decisions (severe or not) in the window since the
//! subject's last suspension that each rule fired in; its record ids are the severe decisions in
//! the window. `until_unix_ms` is read from `{P}sus:{S}` when listed, so a merged, longer
//! suspension shows its real end.
//!
//! One deliberate difference from the in-memory matrix: while a subject is suspended its
//! decisions add nothing to its windows (in memory, severe decisions made during a suspension
//! stay in the window and may count toward the next one).
//!
//! The review queue is bounded: every suspension drops the oldest queue members whose entry has
//! expired (up to 16 at a time), [`RedisBackend::reviews`] drops every expired one it walks over,
//! and the queue is cut to its newest 100,000 members.
//!
//! # Scripts
//!
//! Each state change is one Lua script run by EVALSHA (`redis::Script` loads it again after
//! NOSCRIPT, e.g. when Redis restarted), so it is atomic across replicas:
//!
//! - `RECORD`: the whole of [`RedisBackend::record`] (any-hit marker, rate limit, windows,
//!   suspension, review entry, level 3 and its alert);
//! - `MERGE_SUSPENSION`, `MERGE_RATE_LIMIT`: write back state made locally during an outage,
//!   only ever raising it;
//! - `REVIEWS`: reads the queue oldest first and prunes expired members;
//! - `LIFT`: removes a suspension and its review entry;
//! - `GCRA`: one limit decision.
//!
//! [`RedisBackend::check`] is one MGET.
//!
//! # Invariants
//!
//! - Atomicity: every decision is one script, so concurrent replicas see one order: exactly one
//!   decision suspends a subject, exactly one raises the level-3 alert per `level3_window`, and
//!   exactly `amount` units of a limit pass at one instant.
//! - Times are the callers' (`now_ms`), for scores, windows and `until`s; Redis's clock only runs
//!   the PX expiries (and the level-3 alert's once-per-window key). Nothing here reads the clock
//!   except the call timeouts.
//! - Levels only go up: the merges never shorten a suspension or a rate limit.
//! - What is stored: subject hashes (32 hex digits), rule ids, decision ids, times and counts.
//!   Never text, never a raw subject.
//!
//! The keys of one call are not in one hash slot (the queue and level-3 keys are global), so
//! this needs a single Redis (or a primary with replicas), not Redis Cluster.

use super::{
    EscalationParams, Quota, RecordOutcome, RetryAfter, ReviewEntry, SubjectGate, Violation,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisResult, Script};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// The default bound on every call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "mistguard:";

/// Why a call did not answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateError {
    /// No answer within the timeout.
    Timeout,
    /// Redis refused or failed (the text never holds the URL's password).
    Unavailable(String),
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Timeout => write!(f, "redis state: timed out"),
            StateError::Unavailable(e) => write!(f, "redis state unavailable: {e}"),
        }
    }
}

impl std::error::Error for StateError {}

/// The Redis backend: cheap to clone (one shared connection manager).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    timeout: Duration,
    prefix: String,
    /// The URL's password, scrubbed from error texts.
    secret: Option<String>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// The most `rule \n decision id` members kept per subject for the review entry's counts.
const RULE_EVENTS_CAP: u32 = 1024;
/// The most members of the review queue.
const REVIEW_QUEUE_CAP: u32 = 100_000;
/// Where the rules start among `RECORD`'s arguments.
const RECORD_RULES_AT: usize = 16;

static RECORD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
-- KEYS: 1 sus, 2 rl, 3 hit, 4 win, 5 ev, 6 rev, 7 reviews, 8 l3, 9 l3alert
-- ARGV: 1 subject, 2 decision id, 3 severe (1/0), 4 now, 5 level2_hits, 6 window px,
--       7 window floor, 8 suspension px, 9 suspended until, 10 rate-limit px (0: none),
--       11 rate-limited until, 12 level3_subjects, 13 level3 px, 14 level3 floor, 15 prefix,
--       16.. rules
local now = tonumber(ARGV[4])
local hits = tonumber(ARGV[5])
local first = {rules_at}
if #ARGV < first then
  local s = tonumber(redis.call('GET', KEYS[1]))
  if s and s > now then return {{2, 0, 0, 0}} end
  return {{redis.call('EXISTS', KEYS[3]), 0, 0, 0}}
end
local csam, extraction = false, false
for i = first, #ARGV do
  if ARGV[i] == 'RULE-MIST-005' then csam = true end
  if ARGV[i] == 'RULE-MIST-010' then extraction = true end
end
redis.call('SET', KEYS[3], '1', 'PX', ARGV[6])
if extraction and tonumber(ARGV[10]) > 0 then
  local cur = tonumber(redis.call('GET', KEYS[2]))
  if (not cur) or cur < tonumber(ARGV[11]) then
    redis.call('SET', KEYS[2], ARGV[11], 'PX', ARGV[10])
  end
end
local s = tonumber(redis.call('GET', KEYS[1]))
if s and s > now then
  return {{2, 0, 0, 0}}
end
local floor = '(' .. ARGV[7]
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', floor)
for i = first, #ARGV do
  redis.call('ZADD', KEYS[5], ARGV[4], ARGV[i] .. '\n' .. ARGV[2])
end
redis.call('ZREMRANGEBYRANK', KEYS[5], 0, -({ev_cap} + 1))
redis.call('PEXPIRE', KEYS[5], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', floor)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
  redis.call('ZREMRANGEBYRANK', KEYS[4], 0, -(hits + 1))
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
local count = redis.call('ZCARD', KEYS[4])
if not (csam or count >= hits) then
  return {{1, 0, 0, count}}
end
-- Suspend: the review entry lists the rules with their counts and the window's decision ids.
local ids = redis.call('ZRANGE', KEYS[4], 0, -1)
local counts, names = {{}}, {{}}
for _, m in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  local r = string.match(m, '^([^\n]*)\n')
  if r then
    if not counts[r] then counts[r] = 0; table.insert(names, r) end
    counts[r] = counts[r] + 1
  end
end
table.sort(names)
local rules = {{}}
for _, r in ipairs(names) do
  table.insert(rules, '[' .. cjson.encode(r) .. ',' .. string.format('%d', counts[r]) .. ']')
end
local quoted = {{}}
for _, d in ipairs(ids) do table.insert(quoted, cjson.encode(d)) end
local entry = '{{"subject":' .. cjson.encode(ARGV[1]) .. ',"rules":[' .. table.concat(rules, ',')
  .. '],"suspended_unix_ms":' .. ARGV[4] .. ',"until_unix_ms":' .. ARGV[9]
  .. ',"record_ids":[' .. table.concat(quoted, ',') .. ']}}'
redis.call('SET', KEYS[1], ARGV[9], 'PX', ARGV[8])
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('SET', KEYS[6], entry, 'PX', ARGV[8])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
for _, m in ipairs(redis.call('ZRANGE', KEYS[7], 0, 15)) do
  if redis.call('EXISTS', ARGV[15] .. 'rev:' .. m) == 0 then redis.call('ZREM', KEYS[7], m) end
end
redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -({queue_cap} + 1))
-- Level 3: distinct subjects that reached level 2 within the window; the alert once per window.
local l3n = tonumber(ARGV[12])
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', '(' .. ARGV[14])
redis.call('ZADD', KEYS[8], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -(l3n + 1))
redis.call('PEXPIRE', KEYS[8], ARGV[13])
if redis.call('ZCARD', KEYS[8]) >= l3n then
  if redis.call('SET', KEYS[9], ARGV[4], 'NX', 'PX', ARGV[13]) then
    return {{3, 1, 1, 0}}
  end
end
return {{2, 1, 0, 0}}
"#,
        rules_at = RECORD_RULES_AT,
        ev_cap = RULE_EVENTS_CAP,
        queue_cap = REVIEW_QUEUE_CAP,
    ))
});

static MERGE_SUSPENSION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: 1 sus, 2 rev, 3 reviews, 4 win, 5 ev
-- ARGV: 1 until, 2 px, 3 subject, 4 entry (JSON), 5 suspended at
local cur = tonumber(redis.call('GET', KEYS[1]))
if (not cur) or cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('DEL', KEYS[4], KEYS[5])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl <= 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl)
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[3])
elseif redis.call('PTTL', KEYS[2]) < ttl then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('ZADD', KEYS[3], 'NX', ARGV[5], ARGV[3])
end
return 1
"#,
    )
});

static MERGE_RATE_LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: 1 rl; ARGV: 1 until, 2 px
local cur = tonumber(redis.call('GET', KEYS[1]))
if (not cur) or cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#,
    )
});

static REVIEWS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: 1 reviews; ARGV: 1 prefix, 2 limit, 3 now
-- Returns entry, until, entry, until, ... oldest first; drops members whose entry expired.
local limit = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local out = {}
local start = 0
while #out < 2 * limit do
  local batch = redis.call('ZRANGE', KEYS[1], start, start + 99)
  if #batch == 0 then break end
  local kept = 0
  for _, subject in ipairs(batch) do
    local untilv = redis.call('GET', ARGV[1] .. 'sus:' .. subject)
    local entry = redis.call('GET', ARGV[1] .. 'rev:' .. subject)
    if not untilv then
      redis.call('ZREM', KEYS[1], subject)
      if entry then redis.call('DEL', ARGV[1] .. 'rev:' .. subject) end
    elseif not entry then
      redis.call('ZREM', KEYS[1], subject)
    else
      kept = kept + 1
      if tonumber(untilv) > now and #out < 2 * limit then
        table.insert(out, entry)
        table.insert(out, untilv)
      end
    end
  end
  start = start + kept
end
return out
"#,
    )
});

static LIFT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: 1 sus, 2 rev, 3 reviews; ARGV: 1 subject
local n = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
return n
"#,
    )
});

static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
-- KEYS: 1 the limit's key
-- ARGV: 1 now (ms), 2 period (ms), 3 amount, 4 q, 5 r, where cost * period = q * amount + r.
-- The TAT is ms + rem / amount (0 <= rem < amount), exact in integers. Returns -1 when within
-- the limit, else the retry-after in microseconds.
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local amount = tonumber(ARGV[3])
local ms, rem = now, 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local a, b = string.match(stored, '^(%-?%d+):(%d+)$')
  if a then
    ms, rem = tonumber(a), tonumber(b)
    if rem >= amount then
      ms = ms + math.floor(rem / amount)
      rem = rem % amount
    end
    if ms < now then ms, rem = now, 0 end
  end
end
ms = ms + tonumber(ARGV[4])
rem = rem + tonumber(ARGV[5])
if rem >= amount then ms = ms + 1; rem = rem - amount end
-- Allowed at (new TAT - period): within when that is not after now.
local allow = ms - period
if allow < now or (allow == now and rem == 0) then
  redis.call('SET', KEYS[1], string.format('%d:%d', ms, rem), 'PX', string.format('%d', ms - now + 1))
  return -1
end
return string.format('%d', (allow - now) * 1000 + math.ceil(rem * 1000 / amount))
"#,
    )
});

/// The password in a URL's user info, if any.
fn password_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// The URL with its password replaced by `***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a URL>".to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://{user}@{host}{path}")
            }
        }
        None => url.to_string(),
    }
}

fn scrub(text: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) => text.replace(s, "***"),
        None => text.to_string(),
    }
}

fn parse_ms(v: Option<String>) -> Option<u64> {
    v.and_then(|s| s.parse().ok())
}

impl RedisBackend {
    /// A backend for `url` (`redis://[user:password@]host:port/db`; `rediss://` is refused: no
    /// TLS in this build), every call bounded by `timeout`, every key under `prefix`.
    ///
    /// Does not connect: the connection manager is lazy (`new_lazy_with_config`), so this works
    /// while Redis is down, and the calls work once it is up. Must be called inside a Tokio
    /// runtime.
    pub fn new(url: &str, timeout: Duration, prefix: &str) -> Result<RedisBackend, String> {
        let shown = redact_url(url);
        let secret = password_of(url);
        if url.starts_with("rediss://") {
            return Err(format!(
                "Redis URL {shown}: TLS (rediss://) is not supported in this build; use redis://"
            ));
        }
        if timeout.is_zero() {
            return Err("the Redis timeout must be above zero".to_string());
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("the Redis backend must be created inside a Tokio runtime".to_string());
        }
        let client = Client::open(url).map_err(|e| {
            format!(
                "invalid Redis URL {shown}: {}",
                scrub(&e.to_string(), secret.as_deref())
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One quick retry per connection attempt: a call that finds the connection failed
            // starts a new attempt, so a Redis that comes back is found by the next calls.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(|e| {
            format!(
                "Redis URL {shown}: {}",
                scrub(&e.to_string(), secret.as_deref())
            )
        })?;
        Ok(RedisBackend {
            inner: Arc::new(Inner {
                conn,
                timeout,
                prefix: prefix.to_string(),
                secret,
            }),
        })
    }

    fn key(&self, kind: &str, subject: &str) -> String {
        format!("{}{kind}:{subject}", self.inner.prefix)
    }

    fn global(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// Runs one call under the timeout; counts and maps its failure.
    async fn run<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StateError> {
        let err = match tokio::time::timeout(self.inner.timeout, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if e.is_timeout() => StateError::Timeout,
            Ok(Err(e)) => {
                StateError::Unavailable(scrub(&e.to_string(), self.inner.secret.as_deref()))
            }
            Err(_) => StateError::Timeout,
        };
        metrics::counter!("mistguard_state_redis_errors_total", "op" => op).increment(1);
        Err(err)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn();
        self.run("ping", async move {
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map(|_| ())
        })
        .await
    }

    /// The subject's gate, in one round trip (MGET); expiries are Redis's (PX).
    pub async fn check(&self, subject: &str) -> Result<SubjectGate, StateError> {
        let mut conn = self.conn();
        let keys = [
            self.key("sus", subject),
            self.key("rl", subject),
            self.key("hit", subject),
        ];
        let (sus, rl, hit): (Option<String>, Option<String>, Option<String>) = self
            .run("check", async move {
                redis::cmd("MGET").arg(&keys).query_async(&mut conn).await
            })
            .await?;
        Ok(SubjectGate {
            suspended_until_ms: parse_ms(sus),
            rate_limited_until_ms: parse_ms(rl),
            any_hit: hit.is_some(),
        })
    }

    /// Records one decision with hits, atomically (one script): the semantics of
    /// `daemon::escalation`, except that nothing counts toward a new suspension while the
    /// subject is suspended.
    pub async fn record(
        &self,
        p: &EscalationParams,
        v: &Violation<'_>,
    ) -> Result<RecordOutcome, StateError> {
        let s = v.subject;
        let now = v.now_ms;
        let keys = [
            self.key("sus", s),
            self.key("rl", s),
            self.key("hit", s),
            self.key("win", s),
            self.key("ev", s),
            self.key("rev", s),
            self.global("reviews"),
            self.global("l3"),
            self.global("l3alert"),
        ];
        let mut inv = RECORD.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(s)
            .arg(v.decision_id)
            .arg(if v.severe { "1" } else { "0" })
            .arg(now)
            .arg(p.level2_hits)
            .arg(p.level2_window_ms.max(1))
            .arg(now.saturating_sub(p.level2_window_ms))
            .arg(p.suspension_ms.max(1))
            .arg(now.saturating_add(p.suspension_ms))
            .arg(p.rate_limit_ms)
            .arg(now.saturating_add(p.rate_limit_ms))
            .arg(p.level3_subjects)
            .arg(p.level3_window_ms.max(1))
            .arg(now.saturating_sub(p.level3_window_ms))
            .arg(&self.inner.prefix);
        for r in v.rules {
            inv.arg(*r);
        }
        let mut conn = self.conn();
        let r: Vec<i64> = self
            .run("record", async move { inv.invoke_async(&mut conn).await })
            .await?;
        let [level, suspended_now, alert, severe_count] = r[..] else {
            return Err(StateError::Unavailable(
                "record: unexpected reply from the script".to_string(),
            ));
        };
        Ok(RecordOutcome {
            level: level as u32,
            suspended_now: suspended_now == 1,
            alert: alert == 1,
            severe_count: severe_count as u32,
        })
    }

    /// Writes back a suspension made locally while Redis was unreachable: Redis keeps the later
    /// `until` (never lowered, and capped at `now_ms + suspension_ms`); the entry joins the
    /// review queue unless the subject has one there.
    pub async fn merge_suspension(
        &self,
        p: &EscalationParams,
        entry: &ReviewEntry,
        now_ms: u64,
    ) -> Result<(), StateError> {
        let until = entry
            .until_unix_ms
            .min(now_ms.saturating_add(p.suspension_ms));
        if until <= now_ms {
            return Ok(());
        }
        let json = serde_json::to_string(entry)
            .map_err(|e| StateError::Unavailable(format!("merge_suspension: {e}")))?;
        let s = entry.subject.as_str();
        let keys = [
            self.key("sus", s),
            self.key("rev", s),
            self.global("reviews"),
            self.key("win", s),
            self.key("ev", s),
        ];
        let mut inv = MERGE_SUSPENSION.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        inv.arg(until)
            .arg(until - now_ms)
            .arg(s)
            .arg(json)
            .arg(entry.suspended_unix_ms);
        let mut conn = self.conn();
        self.run("merge_suspension", async move {
            inv.invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// Writes back a rate limit made locally while Redis was unreachable (the later one wins).
    pub async fn merge_rate_limit(
        &self,
        subject: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), StateError> {
        if until_ms <= now_ms {
            return Ok(());
        }
        let key = self.key("rl", subject);
        let mut inv = MERGE_RATE_LIMIT.prepare_invoke();
        inv.key(key).arg(until_ms).arg(until_ms - now_ms);
        let mut conn = self.conn();
        self.run("merge_rate_limit", async move {
            inv.invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(|_| ())
    }

    /// The Level-2 review queue, oldest suspension first, at most `limit` entries of subjects
    /// still suspended at `now_ms` (`until_unix_ms` is the suspension's current end).
    pub async fn reviews(&self, limit: usize, now_ms: u64) -> Result<Vec<ReviewEntry>, StateError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut inv = REVIEWS.prepare_invoke();
        inv.key(self.global("reviews"))
            .arg(&self.inner.prefix)
            .arg(limit)
            .arg(now_ms);
        let mut conn = self.conn();
        let flat: Vec<String> = self
            .run("reviews", async move { inv.invoke_async(&mut conn).await })
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            match serde_json::from_str::<ReviewEntry>(&pair[0]) {
                Ok(mut e) => {
                    if let Ok(until) = pair[1].parse() {
                        e.until_unix_ms = until;
                    }
                    out.push(e);
                }
                Err(e) => tracing::warn!(error = %e, "redis state: unreadable review entry"),
            }
        }
        Ok(out)
    }

    /// Lifts the subject's suspension and removes its review entry; true when it was suspended.
    pub async fn lift(&self, subject: &str) -> Result<bool, StateError> {
        let mut inv = LIFT.prepare_invoke();
        inv.key(self.key("sus", subject))
            .key(self.key("rev", subject))
            .key(self.global("reviews"))
            .arg(subject);
        let mut conn = self.conn();
        let n: i64 = self
            .run("lift", async move { inv.invoke_async(&mut conn).await })
            .await?;
        Ok(n > 0)
    }

    /// A GCRA limit under `prefix + key`: `quota.amount` units per `quota.period`, up to
    /// `amount` at once; this call takes `cost` units. Within: the call is counted, `None`.
    /// Over: nothing is counted, `Some(retry_after)`.
    ///
    /// Edge cases, decided here without Redis: `cost == 0` or a zero period is always within;
    /// a zero amount, or a `cost` above the whole quota, never fits and answers
    /// `Some(period)`. The period counts in whole milliseconds (rounded up); a quota whose
    /// `amount × period_ms` exceeds 2^53 is scaled down (amount and cost halved together) to
    /// stay exact in Lua's numbers.
    pub async fn limit(
        &self,
        key: &str,
        quota: Quota,
        cost: u64,
        now_ms: u64,
    ) -> Result<RetryAfter, StateError> {
        if cost == 0 || quota.period.is_zero() {
            return Ok(None);
        }
        if quota.amount == 0 || cost > quota.amount {
            return Ok(Some(quota.period));
        }
        let period_ms = (quota.period.as_micros().div_ceil(1000)).min(1 << 40) as u64;
        let (mut amount, mut cost) = (quota.amount, cost);
        while u128::from(amount) * u128::from(period_ms) > 1 << 53 {
            amount = amount.div_ceil(2);
            cost = cost.div_ceil(2);
        }
        let units = u128::from(cost) * u128::from(period_ms);
        let (q, r) = (units / u128::from(amount), units % u128::from(amount));
        let mut inv = GCRA.prepare_invoke();
        inv.key(self.global(key))
            .arg(now_ms)
            .arg(period_ms)
            .arg(amount)
            .arg(q as u64)
            .arg(r as u64);
        let mut conn = self.conn();
        let micros: i64 = self
            .run("limit", async move { inv.invoke_async(&mut conn).await })
            .await?;
        Ok((micros >= 0).then(|| Duration::from_micros(micros as u64)))
    }
}

/// The `redis` backend of the trait: the inherent methods above.
#[tonic::async_trait]
impl super::SubjectStore for RedisBackend {
    async fn ping(&self) -> Result<(), StateError> {
        RedisBackend::ping(self).await
    }

    async fn check(&self, subject: &str, _now_ms: u64) -> Result<SubjectGate, StateError> {
        RedisBackend::check(self, subject).await
    }

    async fn record(
        &self,
        p: &EscalationParams,
        v: &Violation<'_>,
    ) -> Result<RecordOutcome, StateError> {
        RedisBackend::record(self, p, v).await
    }

    async fn merge_suspension(
        &self,
        p: &EscalationParams,
        entry: &ReviewEntry,
        now_ms: u64,
    ) -> Result<(), StateError> {
        RedisBackend::merge_suspension(self, p, entry, now_ms).await
    }

    async fn merge_rate_limit(
        &self,
        subject: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), StateError> {
        RedisBackend::merge_rate_limit(self, subject, until_ms, now_ms).await
    }

    async fn reviews(&self, limit: usize, now_ms: u64) -> Result<Vec<ReviewEntry>, StateError> {
        RedisBackend::reviews(self, limit, now_ms).await
    }

    async fn lift(&self, subject: &str, _now_ms: u64) -> Result<bool, StateError> {
        RedisBackend::lift(self, subject).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::redis_test_server::{free_port, RedisServer as TestRedis};
    use std::collections::HashSet;
    use std::time::{SystemTime, UNIX_EPOCH};

    const LONG: Duration = Duration::from_secs(10);

    fn params() -> EscalationParams {
        EscalationParams {
            level2_hits: 3,
            level2_window_ms: 300_000,
            suspension_ms: 900_000,
            rate_limit_ms: 300_000,
            level3_subjects: 2,
            level3_window_ms: 3_600_000,
        }
    }

    fn t0() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    fn subj(n: u32) -> String {
        format!("{n:032x}")
    }

    fn backend(r: &TestRedis, timeout: Duration) -> RedisBackend {
        RedisBackend::new(&r.url(), timeout, DEFAULT_PREFIX).unwrap()
    }

    async fn rec(
        b: &RedisBackend,
        p: &EscalationParams,
        s: &str,
        id: &str,
        severe: bool,
        rules: &[&str],
        now: u64,
    ) -> RecordOutcome {
        b.record(
            p,
            &Violation {
                subject: s,
                decision_id: id,
                severe,
                rules,
                now_ms: now,
            },
        )
        .await
        .unwrap()
    }

    #[test]
    fn urls_never_echo_the_password() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let _g = rt.enter();
        let e = RedisBackend::new("redis://u:s3cret@host:notaport/0", DEFAULT_TIMEOUT, "p:")
            .unwrap_err();
        assert!(e.contains("invalid Redis URL"), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
        let e =
            RedisBackend::new("rediss://:s3cret@host:6379/0", DEFAULT_TIMEOUT, "p:").unwrap_err();
        assert!(!e.contains("s3cret") && e.contains("TLS"), "{e}");
        let e = RedisBackend::new("http://x", DEFAULT_TIMEOUT, "p:").unwrap_err();
        assert!(e.contains("invalid Redis URL"), "{e}");
        assert_eq!(
            redact_url("redis://user:pw@h:1/2"),
            "redis://user:***@h:1/2"
        );
        assert_eq!(password_of("redis://:pw@h:1/2").as_deref(), Some("pw"));
        assert!(RedisBackend::new("redis://127.0.0.1:1/0", DEFAULT_TIMEOUT, "p:").is_ok());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn suspension_at_exactly_level2_hits_with_review_entry() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = params();
        let (s, t) = (subj(1), t0());
        assert_eq!(b.check(&s).await.unwrap(), SubjectGate::default());
        let o = rec(&b, &p, &s, "d0", false, &["RULE-MIST-008"], t).await;
        assert_eq!((o.level, o.suspended_now, o.severe_count), (1, false, 0));
        assert!(b.check(&s).await.unwrap().any_hit);
        let o = rec(&b, &p, &s, "d1", true, &["RULE-MIST-001"], t).await;
        assert_eq!((o.level, o.suspended_now, o.severe_count), (1, false, 1));
        let rules = ["RULE-MIST-001", "RULE-MIST-006"];
        let o = rec(&b, &p, &s, "d2", true, &rules, t + 60_000).await;
        assert_eq!((o.level, o.suspended_now, o.severe_count), (1, false, 2));
        let o = rec(&b, &p, &s, "d3", true, &["RULE-MIST-006"], t + 120_000).await;
        assert_eq!(
            o,
            RecordOutcome {
                level: 2,
                suspended_now: true,
                alert: false,
                severe_count: 0
            }
        );
        let g = b.check(&s).await.unwrap();
        assert_eq!(g.suspended_until_ms, Some(t + 120_000 + 900_000));
        assert_eq!(g.rate_limited_until_ms, None);
        let reviews = b.reviews(10, t + 121_000).await.unwrap();
        assert_eq!(
            reviews,
            vec![ReviewEntry {
                subject: s.clone(),
                rules: vec![
                    ("RULE-MIST-001".to_string(), 2),
                    ("RULE-MIST-006".to_string(), 2),
                    ("RULE-MIST-008".to_string(), 1),
                ],
                suspended_unix_ms: t + 120_000,
                until_unix_ms: t + 1_020_000,
                record_ids: vec!["d1".into(), "d2".into(), "d3".into()],
            }]
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_window_uses_the_callers_times() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = params();
        let t = t0();
        // Spread beyond the window: never suspended.
        let s = subj(1);
        for i in 0..5u64 {
            let o = rec(&b, &p, &s, &format!("a{i}"), true, &["R"], t + i * 400_000).await;
            assert_eq!((o.level, o.suspended_now, o.severe_count), (1, false, 1));
        }
        // One millisecond past the window: the first two no longer count.
        let s = subj(2);
        rec(&b, &p, &s, "b0", true, &["R"], t).await;
        rec(&b, &p, &s, "b1", true, &["R"], t).await;
        let o = rec(&b, &p, &s, "b2", true, &["R"], t + 300_001).await;
        assert_eq!((o.suspended_now, o.severe_count), (false, 1));
        // Exactly at the window's end they still count (as in memory: dropped when > window).
        let s = subj(3);
        rec(&b, &p, &s, "c0", true, &["R"], t).await;
        rec(&b, &p, &s, "c1", true, &["R"], t).await;
        assert!(
            rec(&b, &p, &s, "c2", true, &["R"], t + 300_000)
                .await
                .suspended_now
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn csam_suspends_at_once_extraction_rate_limits_and_lift() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = params();
        let t = t0();
        let s = subj(5);
        let o = rec(&b, &p, &s, "x1", true, &["RULE-MIST-005"], t).await;
        assert_eq!((o.level, o.suspended_now), (2, true));
        assert_eq!(
            b.check(&s).await.unwrap().suspended_until_ms,
            Some(t + 900_000)
        );
        // Already suspended: no new suspension, nothing counts.
        let o = rec(&b, &p, &s, "x2", true, &["RULE-MIST-005"], t + 1).await;
        assert_eq!((o.level, o.suspended_now, o.severe_count), (2, false, 0));
        for i in 0..5 {
            let o = rec(&b, &p, &s, &format!("y{i}"), true, &["R"], t + 2).await;
            assert_eq!((o.level, o.suspended_now, o.severe_count), (2, false, 0));
        }
        let reviews = b.reviews(10, t + 3).await.unwrap();
        assert_eq!(reviews.len(), 1);
        assert_eq!(reviews[0].rules, vec![("RULE-MIST-005".to_string(), 1)]);
        assert_eq!(reviews[0].record_ids, vec!["x1".to_string()]);
        // Lift.
        assert!(b.lift(&s).await.unwrap());
        assert!(!b.lift(&s).await.unwrap());
        let g = b.check(&s).await.unwrap();
        assert_eq!(g.suspended_until_ms, None);
        assert!(g.any_hit);
        assert!(b.reviews(10, t + 3).await.unwrap().is_empty());
        // The severe decisions made while suspended did not count.
        let o = rec(&b, &p, &s, "z1", true, &["R"], t + 4).await;
        assert_eq!((o.level, o.severe_count), (1, 1));

        // RULE-MIST-010 rate-limits.
        let s = subj(10);
        let o = rec(&b, &p, &s, "e1", false, &["RULE-MIST-010"], t).await;
        assert_eq!((o.level, o.suspended_now), (1, false));
        let g = b.check(&s).await.unwrap();
        assert_eq!(g.rate_limited_until_ms, Some(t + 300_000));
        assert_eq!(g.suspended_until_ms, None);
        // An earlier one never shortens it.
        rec(&b, &p, &s, "e2", false, &["RULE-MIST-010"], t - 1000).await;
        assert_eq!(
            b.check(&s).await.unwrap().rate_limited_until_ms,
            Some(t + 300_000)
        );
        // Not with rate_limit_ms = 0.
        let s = subj(11);
        let p0 = EscalationParams {
            rate_limit_ms: 0,
            ..params()
        };
        rec(&b, &p0, &s, "e3", false, &["RULE-MIST-010"], t).await;
        assert_eq!(b.check(&s).await.unwrap().rate_limited_until_ms, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn reviews_are_ordered_limited_and_expire() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = params();
        let t = t0();
        for i in 0..5u32 {
            let s = subj(100 + i);
            rec(
                &b,
                &p,
                &s,
                &format!("r{i}"),
                true,
                &["RULE-MIST-005"],
                t + u64::from(5 - i),
            )
            .await;
        }
        let all = b.reviews(10, t + 10).await.unwrap();
        let order: Vec<_> = all.iter().map(|e| e.subject.clone()).collect();
        let expect: Vec<_> = (0..5u32).rev().map(|i| subj(100 + i)).collect();
        assert_eq!(order, expect);
        assert_eq!(b.reviews(2, t + 10).await.unwrap().len(), 2);
        // Past the suspensions (caller's time): none listed.
        assert!(b.reviews(10, t + 1_000_000).await.unwrap().is_empty());
        // Redis expires them with their suspension, and the queue drops them.
        let short = EscalationParams {
            suspension_ms: 200,
            ..params()
        };
        let s = subj(200);
        rec(&b, &short, &s, "q", true, &["RULE-MIST-005"], t).await;
        assert_eq!(b.reviews(10, t + 10).await.unwrap().len(), 6);
        tokio::time::sleep(Duration::from_millis(400)).await;
        let left = b.reviews(10, t + 10).await.unwrap();
        assert_eq!(left.len(), 5);
        assert!(left.iter().all(|e| e.subject != s));
        assert!(b.check(&s).await.unwrap().suspended_until_ms.is_none());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn level3_alert_once_and_counts_distinct_subjects() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = EscalationParams {
            level3_subjects: 3,
            ..params()
        };
        let t = t0();
        let csam = ["RULE-MIST-005"];
        let o = rec(&b, &p, &subj(1), "a", true, &csam, t).await;
        assert_eq!((o.level, o.alert), (2, false));
        // The same subject again counts once.
        assert!(b.lift(&subj(1)).await.unwrap());
        let o = rec(&b, &p, &subj(1), "b", true, &csam, t + 1).await;
        assert_eq!((o.suspended_now, o.alert), (true, false));
        let o = rec(&b, &p, &subj(2), "c", true, &csam, t + 2).await;
        assert_eq!((o.level, o.alert), (2, false));
        let o = rec(&b, &p, &subj(3), "d", true, &csam, t + 3).await;
        assert_eq!((o.level, o.suspended_now, o.alert), (3, true, true));
        let o = rec(&b, &p, &subj(4), "e", true, &csam, t + 4).await;
        assert_eq!((o.level, o.alert), (2, false));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn exact_across_replicas() {
        let r = TestRedis::start();
        let backends: Vec<_> = (0..3).map(|_| backend(&r, LONG)).collect();
        let p = EscalationParams {
            level2_hits: 50,
            level3_subjects: 20,
            ..params()
        };
        let t = t0();
        let s = subj(42);
        let mut tasks = Vec::new();
        for i in 0..3000u64 {
            let b = backends[(i % 3) as usize].clone();
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("dec{i}");
                b.record(
                    &p,
                    &Violation {
                        subject: &s,
                        decision_id: &id,
                        severe: true,
                        rules: &["RULE-MIST-001"],
                        now_ms: t + i % 7,
                    },
                )
                .await
                .unwrap()
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        assert_eq!(outcomes.iter().filter(|o| o.suspended_now).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| o.level == 1).count(), 49);
        assert_eq!(outcomes.iter().filter(|o| o.level == 2).count(), 2951);
        let mut counts: Vec<_> = outcomes
            .iter()
            .filter(|o| o.level == 1)
            .map(|o| o.severe_count)
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, (1..=49).collect::<Vec<_>>());
        let reviews = backends[1].reviews(10, t + 10).await.unwrap();
        assert_eq!(reviews.len(), 1);
        let ids: HashSet<_> = reviews[0].record_ids.iter().collect();
        assert_eq!((reviews[0].record_ids.len(), ids.len()), (50, 50));
        assert_eq!(reviews[0].rules, vec![("RULE-MIST-001".to_string(), 50)]);

        // Many distinct subjects suspended at once from three replicas: one level-3 alert.
        let mut tasks = Vec::new();
        for i in 0..300u32 {
            let b = backends[(i % 3) as usize].clone();
            tasks.push(tokio::spawn(async move {
                let (s, id) = (subj(1000 + i), format!("c{i}"));
                b.record(
                    &p,
                    &Violation {
                        subject: &s,
                        decision_id: &id,
                        severe: true,
                        rules: &["RULE-MIST-005"],
                        now_ms: t,
                    },
                )
                .await
                .unwrap()
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        assert!(outcomes.iter().all(|o| o.suspended_now));
        assert_eq!(outcomes.iter().filter(|o| o.alert).count(), 1);
        assert_eq!(outcomes.iter().filter(|o| o.level == 3).count(), 1);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn gcra_limits() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let t = t0();
        let q = Quota {
            amount: 10,
            period: Duration::from_secs(1),
        };
        let key = format!("lim:input:req:{}", subj(1));
        for _ in 0..10 {
            assert_eq!(b.limit(&key, q, 1, t).await.unwrap(), None);
        }
        assert_eq!(
            b.limit(&key, q, 1, t).await.unwrap(),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            b.limit(&key, q, 1, t + 50).await.unwrap(),
            Some(Duration::from_millis(50))
        );
        assert_eq!(b.limit(&key, q, 1, t + 100).await.unwrap(), None);
        assert_eq!(
            b.limit(&key, q, 1, t + 100).await.unwrap(),
            Some(Duration::from_millis(100))
        );
        // Idle for a period: the whole burst again.
        for _ in 0..10 {
            assert_eq!(b.limit(&key, q, 1, t + 1100).await.unwrap(), None);
        }
        assert!(b.limit(&key, q, 1, t + 1100).await.unwrap().is_some());

        // A byte budget: the cost is the byte count.
        let bytes = Quota {
            amount: 1000,
            period: Duration::from_secs(1),
        };
        let key = format!("lim:input:bytes:{}", subj(1));
        assert_eq!(b.limit(&key, bytes, 600, t).await.unwrap(), None);
        assert_eq!(
            b.limit(&key, bytes, 600, t).await.unwrap(),
            Some(Duration::from_millis(200))
        );
        assert_eq!(b.limit(&key, bytes, 400, t).await.unwrap(), None);
        assert!(b.limit(&key, bytes, 1, t).await.unwrap().is_some());
        assert_eq!(
            b.limit(&key, bytes, 1, t + 1).await.unwrap(),
            None,
            "1 ms brings back 1 byte"
        );
        // More than the whole quota never fits.
        let fresh = format!("lim:input:bytes:{}", subj(2));
        assert_eq!(
            b.limit(&fresh, bytes, 1001, t).await.unwrap(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(b.limit(&fresh, bytes, 1000, t).await.unwrap(), None);
        // A period that does not divide evenly stays exact: 3 per second, 3 at once.
        let third = Quota {
            amount: 3,
            period: Duration::from_secs(1),
        };
        let key = format!("lim:x:{}", subj(3));
        for _ in 0..3 {
            assert_eq!(b.limit(&key, third, 1, t).await.unwrap(), None);
        }
        assert_eq!(
            b.limit(&key, third, 1, t).await.unwrap(),
            Some(Duration::from_micros(333_334))
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn gcra_is_exact_across_replicas() {
        let r = TestRedis::start();
        let backends: Vec<_> = (0..3).map(|_| backend(&r, LONG)).collect();
        let t = t0();
        let q = Quota {
            amount: 50,
            period: Duration::from_secs(60),
        };
        let mut tasks = Vec::new();
        for i in 0..600usize {
            let b = backends[i % 3].clone();
            tasks.push(tokio::spawn(async move {
                b.limit("lim:input:req:shared", q, 1, t).await.unwrap()
            }));
        }
        let mut passed = 0;
        for task in tasks {
            passed += usize::from(task.await.unwrap().is_none());
        }
        assert_eq!(passed, 50);
    }

    /// Retries `f` with short sleeps until it succeeds (at most ~10 s).
    async fn until_ok<T, F, Fut>(mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StateError>>,
    {
        for _ in 0..200 {
            if let Ok(v) = f().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the backend did not recover");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn outage_errors_quickly_then_recovers() {
        let mut r = TestRedis::start();
        let b = backend(&r, DEFAULT_TIMEOUT);
        let p = params();
        let t = t0();
        let s = subj(7);
        until_ok(|| b.ping()).await;
        until_ok(|| b.check(&s)).await;
        r.stop();
        let q = Quota {
            amount: 1,
            period: Duration::from_secs(1),
        };
        for _ in 0..5 {
            // Bounded by the backend's own timeout; the outer one only keeps a bug from hanging.
            let v = Violation {
                subject: &s,
                decision_id: "o",
                severe: true,
                rules: &["R"],
                now_ms: t,
            };
            let calls = async {
                assert!(b.ping().await.is_err());
                assert!(b.check(&s).await.is_err());
                assert!(b.record(&p, &v).await.is_err());
                assert!(b.limit("lim:o", q, 1, t).await.is_err());
                assert!(b.reviews(5, t).await.is_err());
            };
            tokio::time::timeout(Duration::from_secs(5), calls)
                .await
                .expect("calls return while Redis is down");
        }
        r.restart();
        until_ok(|| b.ping()).await;
        // Scripts are loaded again after the restart (NOSCRIPT).
        let v = Violation {
            subject: &s,
            decision_id: "after",
            severe: true,
            rules: &["RULE-MIST-005"],
            now_ms: t,
        };
        let o = until_ok(|| b.record(&p, &v)).await;
        assert!(o.suspended_now);
        assert!(b.check(&s).await.unwrap().suspended_until_ms.is_some());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn created_while_redis_is_down_then_works() {
        let port = free_port();
        let b = RedisBackend::new(
            &format!("redis://127.0.0.1:{port}/0"),
            DEFAULT_TIMEOUT,
            DEFAULT_PREFIX,
        )
        .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), b.ping())
            .await
            .expect("returns");
        assert!(e.is_err());
        assert!(b.check(&subj(1)).await.is_err());
        let _r = TestRedis::start_on(port);
        until_ok(|| b.ping()).await;
        assert_eq!(b.check(&subj(1)).await.unwrap(), SubjectGate::default());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn merges_never_lower_anything() {
        let r = TestRedis::start();
        let b = backend(&r, LONG);
        let p = params();
        let t = t0();
        let entry = |s: &str, at: u64, until: u64, id: &str| ReviewEntry {
            subject: s.to_string(),
            rules: vec![("RULE-MIST-001".to_string(), 3)],
            suspended_unix_ms: at,
            until_unix_ms: until,
            record_ids: vec![id.to_string()],
        };
        // None in Redis: written, and queued.
        let a = subj(1);
        b.merge_suspension(&p, &entry(&a, t - 1000, t + 899_000, "local-a"), t)
            .await
            .unwrap();
        assert_eq!(
            b.check(&a).await.unwrap().suspended_until_ms,
            Some(t + 899_000)
        );
        // A longer one in Redis: kept, with its own review entry.
        let c = subj(2);
        rec(&b, &p, &c, "redis-c", true, &["RULE-MIST-005"], t).await;
        b.merge_suspension(&p, &entry(&c, t - 100_000, t + 800_000, "local-c"), t + 10)
            .await
            .unwrap();
        assert_eq!(
            b.check(&c).await.unwrap().suspended_until_ms,
            Some(t + 900_000)
        );
        // A shorter one in Redis: lengthened; the review entry there stays.
        let d = subj(3);
        rec(&b, &p, &d, "redis-d", true, &["RULE-MIST-005"], t).await;
        b.merge_suspension(
            &p,
            &entry(&d, t + 40_000, t + 940_000, "local-d"),
            t + 50_000,
        )
        .await
        .unwrap();
        assert_eq!(
            b.check(&d).await.unwrap().suspended_until_ms,
            Some(t + 940_000)
        );
        let reviews = b.reviews(10, t + 50_000).await.unwrap();
        let by: std::collections::HashMap<_, _> =
            reviews.iter().map(|e| (e.subject.clone(), e)).collect();
        assert_eq!(reviews.len(), 3);
        assert_eq!(by[&a].record_ids, vec!["local-a".to_string()]);
        assert_eq!(by[&c].record_ids, vec!["redis-c".to_string()]);
        assert_eq!(by[&d].record_ids, vec!["redis-d".to_string()]);
        assert_eq!(by[&d].until_unix_ms, t + 940_000);
        // Merging twice adds nothing.
        b.merge_suspension(&p, &entry(&a, t - 1000, t + 899_000, "local-a"), t)
            .await
            .unwrap();
        assert_eq!(b.reviews(10, t + 50_000).await.unwrap().len(), 3);

        // Rate limits: the later until wins.
        let e = subj(4);
        b.merge_rate_limit(&e, t + 200_000, t).await.unwrap();
        assert_eq!(
            b.check(&e).await.unwrap().rate_limited_until_ms,
            Some(t + 200_000)
        );
        b.merge_rate_limit(&e, t + 100_000, t).await.unwrap();
        assert_eq!(
            b.check(&e).await.unwrap().rate_limited_until_ms,
            Some(t + 200_000)
        );
        b.merge_rate_limit(&e, t + 250_000, t).await.unwrap();
        assert_eq!(
            b.check(&e).await.unwrap().rate_limited_until_ms,
            Some(t + 250_000)
        );
    }
}
