//! Approvals in Redis (issue 18): [`RedisApprovalStore`], so that every replica of the daemon
//! sees the same approvals: one replica creates an approval, an admin decides it through
//! another, the caller resumes through a third.
//!
//! Redis only stores: each approval is the JSON of the same record the other stores keep, and
//! every change is computed by the state machine in [`super::approvals`] (`Record`'s methods),
//! then written back with a compare-and-set script that writes only if the stored JSON is still
//! byte-for-byte the one the change was computed from; on a conflict the store reads again and
//! recomputes (a bounded number of times). So "used once" holds across replicas: of any number
//! of concurrent resumes, through any number of stores, exactly one gets
//! [`Resume::Allow`].
//!
//! Layout, under a prefix (default [`DEFAULT_PREFIX`]):
//! - `<prefix>approval:<id>`: the record's JSON, with a Redis expiry (`PX`) at the time after
//!   which `sweep` with the store's `keep` ([`DEFAULT_KEEP`], [`RedisApprovalStore::with_keep`])
//!   would drop it: a backstop, `sweep` still drops entries itself;
//! - `<prefix>approvals`: a sorted set of every id, scored by creation time (ms), which `list` and
//!   `sweep` walk;
//! - `<prefix>approvals:pending`: a sorted set of the pending ids, scored by expiry (ms), changed
//!   in the same script as the record: `pending` and the [`MAX_PENDING`] bound count it (from
//!   the `now` they are given) without reading any record. `create` checks the bound and writes
//!   in one script, so replicas cannot overshoot it together.
//!
//! **An outage fails closed.** Every Redis round trip is bounded by the store's timeout
//! (default [`DEFAULT_TIMEOUT`]); a timeout or connection error is an `Err` (never a hang or a
//! panic), which the daemon answers with UNAVAILABLE, not allowing the call: an approval must
//! never be granted twice, and a replica cannot know what the others did while it could not reach Redis. The
//! connection is re-established by itself (a store made while Redis is down works once it is
//! up). Error messages name the server's address, never the URL's password. A change whose
//! answer did not come in time may still have been made: a resume that failed that way may have
//! used the approval up, which also fails closed.
//!
//! Durability is the server's: "durable before answering" (as [`super::approvals::RedbStore`]
//! promises) holds with `appendonly yes` and `appendfsync always`; with Redis's defaults an
//! answer may be lost in a crash of the Redis server (not of a replica). The scripts touch
//! several keys, so the store needs one Redis server (or a primary with its replicas), not a
//! Redis Cluster.
//!
//! The trait is synchronous. Called from a task of a multi-thread tokio runtime (the daemon),
//! the store blocks in place on that runtime; called outside any runtime (plain tests, tools)
//! it uses a small current-thread runtime of its own, made on first use; called from a
//! current-thread runtime it runs its own runtime on a helper thread. The connection is made
//! for the first multi-thread runtime that uses the store: one store serves one daemon runtime.

use std::fmt;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};

use super::approvals::{
    duration_ms, new_id, new_record, unix_ms, unknown, valid_id, Approval, ApprovalStore, Approver,
    Binding, DecideError, Record, Resume, Selector, MAX_PENDING,
};

/// The key prefix the daemon uses.
pub const DEFAULT_PREFIX: &str = "mistguard:";

/// How long the daemon waits for one Redis round trip.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// How long an ended approval stays in Redis before its key expires by itself: the `keep` the
/// daemon sweeps with.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(24 * 3600);

/// Compare-and-set attempts before a change is given up (another store kept changing the same
/// approval).
const CAS_ATTEMPTS: usize = 16;

/// Fresh ids `create` tries when the one it drew is taken.
const CREATE_ATTEMPTS: usize = 4;

/// Pause before trying a round trip again after a connection error (the connection manager
/// reconnects meanwhile), within the round trip's timeout.
const RETRY_PAUSE: Duration = Duration::from_millis(5);

/// Records read per MGET by `list` and `sweep`.
const SCAN_CHUNK: usize = 500;

/// Least and most Redis expiry given to a record (ms): an entry past its sweep time still reads
/// for a minute (until `sweep` or Redis drops it); a huge `keep` stays within what Redis takes.
const MIN_PX_MS: u64 = 60_000;
const MAX_PX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Creates a record unless the bound is reached. KEYS: record, all, pending. ARGV: json, px, id,
/// created ms, expires ms, now ms, bound. Answers "ok" (also when the record is there already
/// with the same JSON: a retry after a lost answer), "taken" (the id holds another record) or
/// "full".
const CREATE_LUA: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  if cur == ARGV[1] then return 'ok' end
  return 'taken'
end
if redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[6], '+inf') >= tonumber(ARGV[7]) then
  return 'full'
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[3])
return 'ok'
";

/// Replaces (or, with an empty new value, deletes) a record only if it is still byte-equal to
/// the old JSON, keeping the pending index in step. KEYS: record, all, pending. ARGV: old json,
/// new json or "", px, id, "1" if the new record is pending, its expiry ms. Answers 1 when
/// written, 0 on a conflict.
const CAS_LUA: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[4])
  redis.call('ZREM', KEYS[3], ARGV[4])
  return 1
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[4])
else
  redis.call('ZREM', KEYS[3], ARGV[4])
end
return 1
";

/// What a change does to the stored record.
enum Change {
    Keep,
    Put(Box<Record>),
    Drop,
}

/// The store's own runtime, for callers outside a multi-thread runtime, and the connection made
/// on it.
struct Own {
    runtime: tokio::runtime::Runtime,
    conn: ConnectionManager,
}

/// Approvals in Redis, shared by every replica pointed at the same server and prefix. See the
/// module documentation.
pub struct RedisApprovalStore {
    client: Client,
    /// `redis <host:port> db <n>`: how messages name the server (no credentials).
    shown: String,
    /// The URL's user information (and password), cut out of any message.
    secrets: Vec<String>,
    timeout: Duration,
    keep: Duration,
    record_prefix: String,
    all_key: String,
    pending_key: String,
    pub(crate) max_pending: usize,
    create_script: Script,
    cas_script: Script,
    /// The connection for the daemon's (multi-thread) runtime, made on first use there.
    ambient: OnceLock<ConnectionManager>,
    /// The store's own runtime and connection, made on first use outside a runtime.
    own: OnceLock<Own>,
    init: Mutex<()>,
}

impl fmt::Debug for RedisApprovalStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisApprovalStore")
            .field("server", &self.shown)
            .field("timeout", &self.timeout)
            .field("prefix", &self.all_key)
            .finish_non_exhaustive()
    }
}

/// The user information of a URL (`user:password` in `redis://user:password@host/`), if any.
fn userinfo(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    authority.rfind('@').map(|at| &authority[..at])
}

/// `text` with every non-empty secret replaced by `***`.
fn scrub(mut text: String, secrets: &[String]) -> String {
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(s.as_str(), "***");
    }
    text
}

/// Whether a failed round trip may be tried again: the connection failed (the manager
/// reconnects), not the command.
fn retryable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

/// One Redis round trip (`$e`, a future, built again for each try), bounded by the store's
/// timeout; tried again after a connection error while time is left.
macro_rules! io {
    ($self:ident, $what:expr, $e:expr) => {{
        let deadline = tokio::time::Instant::now() + $self.timeout;
        loop {
            match tokio::time::timeout_at(deadline, $e).await {
                Ok(Ok(v)) => break Ok(v),
                Ok(Err(e))
                    if retryable(&e) && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) => break Err($self.fail($what, e)),
                Err(_) => {
                    break Err(
                        $self.fail($what, format_args!("no answer within {:?}", $self.timeout))
                    )
                }
            }
        }
    }};
}

impl RedisApprovalStore {
    /// A store on the Redis server at `url` (`redis://[[user]:password@]host[:port][/db]`),
    /// with keys under `prefix` ([`DEFAULT_PREFIX`] in the daemon), waiting at most `timeout`
    /// ([`DEFAULT_TIMEOUT`] in the daemon) for each round trip. Connects on first use, not
    /// here: a store made while Redis is down works once it is up.
    ///
    /// # Errors
    /// When the URL is not a Redis URL or `timeout` is zero (the message never holds the
    /// URL's password).
    pub fn new(url: &str, timeout: Duration, prefix: &str) -> Result<Self, String> {
        let mut secrets: Vec<String> = Vec::new();
        if let Some(info) = userinfo(url) {
            secrets.push(info.to_owned());
            if let Some((_, password)) = info.split_once(':') {
                secrets.push(password.to_owned());
            }
        }
        let client = Client::open(url).map_err(|e| {
            scrub(
                format!("approval store: the Redis URL is not valid: {e}"),
                &secrets,
            )
        })?;
        let info = client.get_connection_info();
        if let Some(password) = info.redis_settings().password() {
            secrets.push(password.to_owned());
        }
        // Longest first, so a password inside the user information is not cut out alone.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        if timeout.is_zero() {
            return Err("approval store: the Redis timeout is zero".into());
        }
        let shown = format!("redis {} db {}", info.addr(), info.redis_settings().db());
        Ok(RedisApprovalStore {
            client,
            shown: scrub(shown, &secrets),
            secrets,
            timeout,
            keep: DEFAULT_KEEP,
            record_prefix: format!("{prefix}approval:"),
            all_key: format!("{prefix}approvals"),
            pending_key: format!("{prefix}approvals:pending"),
            max_pending: MAX_PENDING,
            create_script: Script::new(CREATE_LUA),
            cas_script: Script::new(CAS_LUA),
            ambient: OnceLock::new(),
            own: OnceLock::new(),
            init: Mutex::new(()),
        })
    }

    /// Ended approvals expire from Redis `keep` after they ended (default [`DEFAULT_KEEP`]);
    /// `sweep` with a shorter `keep` drops them earlier. Use the daemon's sweep `keep`, or more.
    pub fn with_keep(mut self, keep: Duration) -> Self {
        self.keep = keep;
        self
    }

    fn fail(&self, what: &str, e: impl fmt::Display) -> String {
        scrub(
            format!("approval store {}: {what}: {e}", self.shown),
            &self.secrets,
        )
    }

    fn record_key(&self, id: &str) -> String {
        format!("{}{id}", self.record_prefix)
    }

    /// A connection manager for the runtime we are in (it spawns its tasks there); connects
    /// lazily.
    fn manager(&self) -> Result<ConnectionManager, String> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            // One connection attempt per round trip; the `io!` loop tries again while its
            // timeout allows.
            .set_number_of_retries(0)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| self.fail("connection", e))
    }

    fn ambient(&self) -> Result<ConnectionManager, String> {
        if let Some(c) = self.ambient.get() {
            return Ok(c.clone());
        }
        let _init = self.init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = self.ambient.get() {
            return Ok(c.clone());
        }
        let conn = self.manager()?;
        Ok(self.ambient.get_or_init(move || conn).clone())
    }

    fn own(&self) -> Result<&Own, String> {
        if let Some(o) = self.own.get() {
            return Ok(o);
        }
        let _init = self.init.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = self.own.get() {
            return Ok(o);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.fail("runtime", e))?;
        let conn = {
            let _entered = runtime.enter();
            self.manager()?
        };
        Ok(self.own.get_or_init(move || Own { runtime, conn }))
    }

    fn on_own<T, F>(&self, op: impl FnOnce(ConnectionManager) -> F) -> Result<T, String>
    where
        F: Future<Output = Result<T, String>>,
    {
        let own = self.own()?;
        own.runtime.block_on(op(own.conn.clone()))
    }

    /// Runs `op` to completion from synchronous code (see the module documentation).
    fn block<T, F>(&self, op: impl FnOnce(ConnectionManager) -> F + Send) -> Result<T, String>
    where
        F: Future<Output = Result<T, String>>,
        T: Send,
    {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                let conn = self.ambient()?;
                tokio::task::block_in_place(|| handle.block_on(op(conn)))
            }
            // A current-thread runtime cannot block in place, nor can a runtime start on its
            // thread: run ours on another.
            Ok(_) => std::thread::scope(|s| {
                s.spawn(|| self.on_own(op))
                    .join()
                    .unwrap_or_else(|_| Err(self.fail("call", "panicked")))
            }),
            Err(_) => self.on_own(op),
        }
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(bytes).map_err(|e| self.fail(&format!("entry {id}"), e))
    }

    fn encode(&self, rec: &Record) -> Result<Vec<u8>, String> {
        serde_json::to_vec(rec).map_err(|e| self.fail("encode", e))
    }

    /// The Redis expiry of a record written at `now_ms`: when `sweep` with the store's `keep`
    /// would drop it.
    fn px(&self, rec: &Record, now_ms: u64) -> u64 {
        let drop_at = rec.ends_by().saturating_add(duration_ms(self.keep));
        drop_at.saturating_sub(now_ms).clamp(MIN_PX_MS, MAX_PX_MS)
    }

    async fn get_raw(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
    ) -> Result<Option<Vec<u8>>, String> {
        let key = self.record_key(id);
        io!(
            self,
            "GET",
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<Vec<u8>>>(&mut *conn)
        )
    }

    async fn ids(&self, conn: &mut ConnectionManager) -> Result<Vec<String>, String> {
        io!(
            self,
            "ZRANGE",
            redis::cmd("ZRANGE")
                .arg(&self.all_key)
                .arg(0)
                .arg(-1)
                .query_async::<Vec<String>>(&mut *conn)
        )
    }

    async fn mget(
        &self,
        conn: &mut ConnectionManager,
        ids: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, String> {
        let keys: Vec<String> = ids.iter().map(|id| self.record_key(id)).collect();
        let values: Vec<Option<Vec<u8>>> = io!(
            self,
            "MGET",
            redis::cmd("MGET")
                .arg(&keys)
                .query_async::<Vec<Option<Vec<u8>>>>(&mut *conn)
        )?;
        if values.len() != ids.len() {
            return Err(self.fail("MGET", "wrong number of values"));
        }
        Ok(values)
    }

    async fn create_async(
        &self,
        mut conn: ConnectionManager,
        mut rec: Record,
        now_ms: u64,
    ) -> Result<Approval, String> {
        for _ in 0..CREATE_ATTEMPTS {
            let id = rec.approval.id.clone();
            let json = self.encode(&rec)?;
            let mut call = self.create_script.prepare_invoke();
            call.key(self.record_key(&id))
                .key(&self.all_key)
                .key(&self.pending_key)
                .arg(&json)
                .arg(self.px(&rec, now_ms))
                .arg(&id)
                .arg(rec.approval.created_unix_ms)
                .arg(rec.approval.expires_unix_ms)
                .arg(now_ms)
                .arg(self.max_pending);
            let answer: String = io!(self, "create", call.invoke_async::<String>(&mut conn))?;
            match answer.as_str() {
                "ok" => return Ok(rec.approval),
                "full" => {
                    return Err(format!(
                        "{} approvals are pending already",
                        self.max_pending
                    ))
                }
                "taken" => rec.approval.id = new_id()?,
                other => return Err(self.fail("create", format_args!("unexpected {other:?}"))),
            }
        }
        Err(self.fail("create", "no free approval id"))
    }

    /// Reads the record with this id (or starts from `raw`, its JSON read already), lets `f`
    /// decide the change, and writes it if the record is unchanged meanwhile; else reads again.
    /// `None` when there is no such record.
    async fn modify<T>(
        &self,
        conn: &mut ConnectionManager,
        id: &str,
        mut raw: Option<Vec<u8>>,
        now_ms: u64,
        mut f: impl FnMut(Record) -> (T, Change),
    ) -> Result<Option<T>, String> {
        for _ in 0..CAS_ATTEMPTS {
            let old = match raw.take() {
                Some(bytes) => bytes,
                None => match self.get_raw(conn, id).await? {
                    Some(bytes) => bytes,
                    None => return Ok(None),
                },
            };
            let (out, change) = f(self.decode(id, &old)?);
            let (new, px, pending, expires) = match change {
                Change::Keep => return Ok(Some(out)),
                Change::Drop => (Vec::new(), 0, false, 0),
                Change::Put(rec) => (
                    self.encode(&rec)?,
                    self.px(&rec, now_ms),
                    rec.is_pending(),
                    rec.approval.expires_unix_ms,
                ),
            };
            let mut call = self.cas_script.prepare_invoke();
            call.key(self.record_key(id))
                .key(&self.all_key)
                .key(&self.pending_key)
                .arg(&old)
                .arg(&new)
                .arg(px)
                .arg(id)
                .arg(if pending { "1" } else { "0" })
                .arg(expires);
            let written: i64 = io!(self, "update", call.invoke_async::<i64>(&mut *conn))?;
            if written == 1 {
                return Ok(Some(out));
            }
        }
        Err(self.fail(
            "update",
            format_args!("approval {id} changed under us {CAS_ATTEMPTS} times in a row"),
        ))
    }

    /// Applies `g` (a `Record` method) to the record with this id, writing it if `g` changed
    /// it. `None` when there is no such record.
    fn update<T: Send>(
        &self,
        id: &str,
        now_ms: u64,
        mut g: impl FnMut(&mut Record) -> T + Send,
    ) -> Result<Option<T>, String> {
        if !valid_id(id) {
            return Ok(None);
        }
        self.block(|mut conn| async move {
            self.modify(&mut conn, id, None, now_ms, |mut rec| {
                let before = rec.clone();
                let out = g(&mut rec);
                let change = if rec == before {
                    Change::Keep
                } else {
                    Change::Put(Box::new(rec))
                };
                (out, change)
            })
            .await
        })
    }
}

impl Drop for RedisApprovalStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime: let it go instead.
        if let Some(own) = self.own.take() {
            drop(own.conn);
            own.runtime.shutdown_background();
        }
    }
}

impl ApprovalStore for RedisApprovalStore {
    fn create(
        &self,
        binding: Binding,
        policy: &str,
        reason: &str,
        approvers: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Approval, String> {
        let rec = new_record(new_id()?, binding, policy, reason, approvers, ttl, now)?;
        let now_ms = unix_ms(now);
        self.block(|conn| self.create_async(conn, rec, now_ms))
    }

    fn get(&self, id: &str, now: SystemTime) -> Result<Option<Approval>, String> {
        let now_ms = unix_ms(now);
        self.update(id, now_ms, |r| {
            r.expire(now_ms);
            r.approval.clone()
        })
    }

    fn decide(
        &self,
        id: &str,
        approve: bool,
        approver: &Approver,
        approver_subject_hash: &str,
        note: &str,
        now: SystemTime,
    ) -> Result<Approval, DecideError> {
        let now_ms = unix_ms(now);
        self.update(id, now_ms, |r| {
            r.decide(approve, approver, approver_subject_hash, note, now_ms)
        })
        .map_err(DecideError::Store)?
        .unwrap_or(Err(DecideError::Unknown))
    }

    fn resume(&self, id: &str, binding: &Binding, now: SystemTime) -> Result<Resume, String> {
        let now_ms = unix_ms(now);
        Ok(self
            .update(id, now_ms, |r| r.resume(binding, now_ms))?
            .unwrap_or_else(unknown))
    }

    fn list(
        &self,
        recent: Duration,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<Approval>, String> {
        let now_ms = unix_ms(now);
        self.block(|mut conn| async move {
            let mut sel = Selector::new(recent, limit, now_ms);
            let ids = self.ids(&mut conn).await?;
            for chunk in ids.chunks(SCAN_CHUNK) {
                let values = self.mget(&mut conn, chunk).await?;
                for (id, value) in chunk.iter().zip(values) {
                    // None: Redis expired it (past its sweep time) since the ZRANGE.
                    if let Some(bytes) = value {
                        sel.offer(&self.decode(id, &bytes)?);
                    }
                }
            }
            Ok(sel.finish())
        })
    }

    fn pending(&self, now: SystemTime) -> Result<usize, String> {
        let now_ms = unix_ms(now);
        self.block(|mut conn| async move {
            let since = format!("({now_ms}");
            io!(
                self,
                "ZCOUNT",
                redis::cmd("ZCOUNT")
                    .arg(&self.pending_key)
                    .arg(&since)
                    .arg("+inf")
                    .query_async::<usize>(&mut conn)
            )
        })
    }

    fn sweep(&self, keep: Duration, now: SystemTime) -> Result<usize, String> {
        let (keep_ms, now_ms) = (duration_ms(keep), unix_ms(now));
        self.block(|mut conn| async move {
            let mut dropped = 0;
            let mut gone = Vec::new();
            let ids = self.ids(&mut conn).await?;
            for chunk in ids.chunks(SCAN_CHUNK) {
                let values = self.mget(&mut conn, chunk).await?;
                for (id, value) in chunk.iter().zip(values) {
                    let Some(bytes) = value else {
                        // Expired by Redis: only its index entries are left.
                        gone.push(id.clone());
                        continue;
                    };
                    let swept = self
                        .modify(&mut conn, id, Some(bytes), now_ms, |rec| {
                            if rec.sweepable(keep_ms, now_ms) {
                                return (true, Change::Drop);
                            }
                            let at = rec.at(now_ms);
                            if at == rec {
                                (false, Change::Keep)
                            } else {
                                (false, Change::Put(Box::new(at)))
                            }
                        })
                        .await?;
                    if swept == Some(true) {
                        dropped += 1;
                    }
                }
            }
            for chunk in gone.chunks(SCAN_CHUNK) {
                for key in [&self.all_key, &self.pending_key] {
                    io!(
                        self,
                        "ZREM",
                        redis::cmd("ZREM")
                            .arg(key)
                            .arg(chunk)
                            .query_async::<i64>(&mut conn)
                    )?;
                }
            }
            Ok(dropped)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::approvals::tests::{approve, at, binding, create, sec};
    use crate::daemon::approvals::ApprovalState;
    use crate::daemon::redis_test_server::{free_port, RedisServer};
    use std::sync::Barrier;
    use std::time::Instant;

    const T: Duration = Duration::from_secs(2);

    fn store(server: &RedisServer) -> RedisApprovalStore {
        RedisApprovalStore::new(&server.url(), T, DEFAULT_PREFIX).unwrap()
    }

    #[test]
    fn three_stores_resume_once() {
        let server = RedisServer::start();
        let stores = [store(&server), store(&server), store(&server)];
        let a = create(&stores[0], "c1", 0);
        approve(&stores[1], &a.id, 1);
        assert_eq!(
            stores[2].get(&a.id, at(1)).unwrap().unwrap().state,
            ApprovalState::Approved
        );
        let barrier = Barrier::new(9);
        let answers: Vec<Resume> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..9)
                .map(|i| {
                    let (s, barrier, id) = (&stores[i % 3], &barrier, &a.id);
                    scope.spawn(move || {
                        barrier.wait();
                        s.resume(id, &binding("c1"), at(2)).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let allowed = answers
            .iter()
            .filter(|r| matches!(r, Resume::Allow(_)))
            .count();
        assert_eq!(allowed, 1, "{answers:?}");
        assert!(answers
            .iter()
            .all(|r| matches!(r, Resume::Allow(_)) || *r == Resume::Deny("already used".into())));
        for s in &stores {
            assert_eq!(
                s.get(&a.id, at(3)).unwrap().unwrap().state,
                ApprovalState::Consumed
            );
        }
    }

    #[test]
    fn survives_a_redis_restart() {
        let mut server = RedisServer::start_persistent();
        let s = store(&server);
        let approved = create(&s, "c1", 0);
        approve(&s, &approved.id, 1_000);
        let pending = create(&s, "c2", 0);
        let port = server.port();
        server.restart();
        assert_eq!(server.port(), port);
        // The same store (its connection broke) and a new one both see what was there.
        let fresh = store(&server);
        for st in [&s, &fresh] {
            assert_eq!(st.pending(at(2_000)).unwrap(), 1);
            assert_eq!(st.get(&pending.id, at(2_000)).unwrap().unwrap(), pending);
        }
        match s.resume(&approved.id, &binding("c1"), at(2_000)).unwrap() {
            Resume::Allow(a) => assert_eq!(a.decided_by, "alice"),
            other => panic!("{other:?}"),
        }
        server.restart();
        assert_eq!(
            fresh
                .resume(&approved.id, &binding("c1"), at(3_000))
                .unwrap(),
            Resume::Deny("already used".into())
        );

        // A store made while Redis is down fails, then works once it is up.
        server.stop();
        let early = store(&server);
        assert!(early.pending(at(3_000)).is_err());
        server.restart();
        assert_eq!(early.pending(at(3_000)).unwrap(), 1);
        assert_eq!(
            early
                .list(Duration::from_secs(3600), 10, at(3_000))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn unreachable_redis_is_an_error() {
        let port = free_port();
        let url = format!("redis://admin:hunter2secret@127.0.0.1:{port}/");
        let s = RedisApprovalStore::new(&url, Duration::from_millis(200), DEFAULT_PREFIX).unwrap();
        let check = move |s: &RedisApprovalStore| {
            let started = Instant::now();
            let errors = [
                s.create(
                    binding("c1"),
                    "p",
                    "r",
                    &["security".into()],
                    Duration::from_secs(60),
                    at(0),
                )
                .map(|_| ())
                .unwrap_err(),
                s.get("0123456789abcdef0123456789abcdef", at(0))
                    .unwrap_err(),
                s.resume("0123456789abcdef0123456789abcdef", &binding("c1"), at(0))
                    .unwrap_err(),
                s.pending(at(0)).unwrap_err(),
                s.list(Duration::ZERO, 10, at(0)).unwrap_err(),
                s.sweep(Duration::ZERO, at(0)).unwrap_err(),
                match s.decide(
                    "0123456789abcdef0123456789abcdef",
                    true,
                    &sec(),
                    "",
                    "",
                    at(0),
                ) {
                    Err(DecideError::Store(e)) => e,
                    other => panic!("{other:?}"),
                },
            ];
            for e in &errors {
                assert!(!e.contains("hunter2secret"), "{e}");
                assert!(!e.contains("admin:"), "{e}");
                assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
        };
        // Outside a runtime, in the daemon's kind of runtime, and in a current-thread one.
        check(&s);
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let shared = std::sync::Arc::new(s);
        let s2 = shared.clone();
        multi
            .block_on(multi.spawn(async move { check(&s2) }))
            .unwrap();
        let single = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        single.block_on(async { check(&shared) });
        // Dropped inside a runtime, it does not panic for its own runtime.
        single.block_on(async move { drop(shared) });
    }

    #[test]
    fn a_hung_redis_times_out() {
        let server = RedisServer::start();
        let s = RedisApprovalStore::new(&server.url(), Duration::from_millis(100), "x:").unwrap();
        let a = create(&s, "c1", 0);
        approve(&s, &a.id, 1);
        server.pause();
        let started = Instant::now();
        let e = s.resume(&a.id, &binding("c1"), at(2)).unwrap_err();
        // Ours or the connection's response timeout, whichever comes first.
        assert!(e.starts_with("approval store redis 127.0.0.1:"), "{e}");
        assert!(s.pending(at(2)).is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        server.unpause();
        // The resume that timed out was never sent a write (its GET got no answer): the
        // approval is still there to use, once.
        assert!(matches!(
            s.resume(&a.id, &binding("c1"), at(3)).unwrap(),
            Resume::Allow(_)
        ));
        assert_eq!(
            s.resume(&a.id, &binding("c1"), at(4)).unwrap(),
            Resume::Deny("already used".into())
        );
    }

    #[test]
    fn bad_urls_do_not_show_the_password() {
        for url in [
            "http://u:hunter2secret@127.0.0.1/",
            "redis://u:hunter2secret@127.0.0.1:99999999/",
            "redis://:hunter2secret@[::1/",
        ] {
            let e = RedisApprovalStore::new(url, T, DEFAULT_PREFIX).unwrap_err();
            assert!(!e.contains("hunter2secret"), "{e}");
        }
        assert!(
            RedisApprovalStore::new("redis://127.0.0.1/", Duration::ZERO, DEFAULT_PREFIX).is_err()
        );
        let s = RedisApprovalStore::new("redis://:hunter2secret@127.0.0.1:1/", T, "x:").unwrap();
        assert!(!format!("{s:?}").contains("hunter2secret"));
    }

    #[test]
    fn works_from_the_daemons_runtime() {
        let server = RedisServer::start();
        let s = std::sync::Arc::new(store(&server));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..6)
            .map(|i| {
                let s = s.clone();
                runtime.spawn(async move {
                    let a = create(&*s, &format!("c{i}"), 0);
                    approve(&*s, &a.id, 1);
                    s.resume(&a.id, &binding(&format!("c{i}")), at(2)).unwrap()
                })
            })
            .collect();
        for t in tasks {
            assert!(matches!(runtime.block_on(t).unwrap(), Resume::Allow(_)));
        }
        assert_eq!(
            s.list(Duration::from_secs(60), 100, at(3)).unwrap().len(),
            6
        );
        drop(runtime);
    }

    #[test]
    fn layout_under_the_prefix() {
        let server = RedisServer::start();
        let s = RedisApprovalStore::new(&server.url(), T, "tenant7:").unwrap();
        let a = create(&s, "c1", 0);
        let client = Client::open(server.url()).unwrap();
        let mut raw = client.get_connection().unwrap();
        let json: Vec<u8> = redis::cmd("GET")
            .arg(format!("tenant7:approval:{}", a.id))
            .query(&mut raw)
            .unwrap();
        let rec = Record {
            approval: a.clone(),
            ended_unix_ms: 0,
        };
        assert_eq!(json, serde_json::to_vec(&rec).unwrap());
        // Expires from Redis a day (the default keep) after its own expiry (600 s).
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("tenant7:approval:{}", a.id))
            .query(&mut raw)
            .unwrap();
        let want = i64::try_from(duration_ms(DEFAULT_KEEP) + 600_000).unwrap();
        assert!(pttl > want - 60_000 && pttl <= want, "{pttl}");
        let score: u64 = redis::cmd("ZSCORE")
            .arg("tenant7:approvals")
            .arg(&a.id)
            .query(&mut raw)
            .unwrap();
        assert_eq!(score, a.created_unix_ms);
        let pending: u64 = redis::cmd("ZSCORE")
            .arg("tenant7:approvals:pending")
            .arg(&a.id)
            .query(&mut raw)
            .unwrap();
        assert_eq!(pending, a.expires_unix_ms);
        // Another prefix is another store.
        let other = RedisApprovalStore::new(&server.url(), T, DEFAULT_PREFIX).unwrap();
        assert_eq!(other.get(&a.id, at(1)).unwrap(), None);
        assert_eq!(other.pending(at(1)).unwrap(), 0);
        // Deciding takes it out of the pending index; a record Redis expired is swept from the
        // indexes.
        approve(&s, &a.id, 1);
        let n: i64 = redis::cmd("ZCARD")
            .arg("tenant7:approvals:pending")
            .query(&mut raw)
            .unwrap();
        assert_eq!(n, 0);
        let b = create(&s, "c2", 0);
        let _: i64 = redis::cmd("DEL")
            .arg(format!("tenant7:approval:{}", b.id))
            .query(&mut raw)
            .unwrap();
        assert_eq!(s.sweep(Duration::from_secs(60), at(2)).unwrap(), 0);
        assert_eq!(s.pending(at(2)).unwrap(), 0);
        let n: i64 = redis::cmd("ZCARD")
            .arg("tenant7:approvals")
            .query(&mut raw)
            .unwrap();
        assert_eq!(n, 1);
    }
}
