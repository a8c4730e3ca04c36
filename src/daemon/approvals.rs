//! Approvals of tool calls (issue 17): the store behind "this call needs a person's yes" and the
//! admin tokens file of the people who may say it.
//!
//! When a rule requires approval, the daemon [`ApprovalStore::create`]s an approval bound to the
//! exact call and answers with its id. An admin approves or denies it
//! ([`ApprovalStore::decide`], through the Admin service); the caller then sends the same call
//! again with the id, and [`ApprovalStore::resume`] answers [`Resume::Allow`] once.
//!
//! Owned here: the approval state machine, the [`ApprovalStore`] trait with an in-memory
//! ([`MemoryStore`]) and a durable ([`RedbStore`], an embedded redb file) implementation, and the
//! admin tokens file ([`parse_admin_tokens`], [`find_admin`]). A third store, shared by
//! replicas, keeps the same records in Redis
//! ([`RedisApprovalStore`](super::approvals_redis::RedisApprovalStore), in `approvals_redis`)
//! and changes them only through the state machine here. The same test suite runs against all
//! three. The gRPC side lives elsewhere.
//!
//! Invariants:
//! - **Bound to the exact call.** An approval holds a [`Binding`] (tool, hash of the canonical
//!   arguments and context, subject hash, policy version); a resume whose binding differs in any
//!   of the four is denied and leaves the approval as it was.
//! - **Used once.** Resuming an approved approval consumes it in the same step (under the
//!   store's lock, in one redb write transaction, or with a compare-and-set in Redis): of any
//!   number of concurrent resumes (through any number of Redis stores) exactly one gets
//!   [`Resume::Allow`]; the others get "already used".
//! - **Durable before answering.** [`RedbStore`] commits every change with
//!   `Durability::Immediate` before the method returns, so an answer given (an id, a decision,
//!   an allow) survives a crash or restart of the daemon.
//! - **No argument values.** Of the call the store keeps the tool name and hashes (the caller
//!   computes them), besides the rule's name and message, group names and the approver's name
//!   and note; never the arguments, the context or the raw subject.
//! - **No clock.** Every method takes `now`; nothing here reads the clock, so tests (and a
//!   replica) decide expiry from the time they are given.
//! - **Bounded.** `create` refuses when [`MAX_PENDING`] approvals are pending. `list` and
//!   `sweep` scan every entry (decoding each): meant for up to about 100 000 entries (pending
//!   plus those kept by `sweep`'s `keep`), so the daemon should `sweep` periodically.
//!   `pending` and the bound check read only the pending ones.
//!
//! Expiry: an approval is usable until `expires_unix_ms` (exclusive). A pending or approved (not
//! yet used) approval whose time has passed reads as [`ApprovalState::Expired`]; `get`,
//! `decide`, `resume` and `sweep` write that state back, `list` and `pending` only show it.

use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// At most this many approvals pending at once; `create` refuses the next one.
pub const MAX_PENDING: usize = 100_000;

/// An approver's note is cut (at a character boundary) to this many bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// Longest tool name, hash, policy name, reason or policy version `create` accepts.
const MAX_FIELD_BYTES: usize = 4096;

/// Most approver groups on one approval.
const MAX_APPROVER_GROUPS: usize = 64;

/// What an approval is bound to: the exact call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binding {
    /// The tool the call invokes.
    pub tool: String,
    /// Hex of a keyed or plain BLAKE3 hash (the caller computes it) of the canonical arguments and
    /// context.
    pub call_hash: String,
    /// The subject's hash (16 hex digits) or "" when the call had no subject.
    pub subject_hash: String,
    /// The version of the policy that required the approval; a new policy voids old approvals.
    pub policy_version: String,
}

/// Where an approval is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalState {
    /// Waiting for an approver.
    Pending,
    /// Approved, not used yet: the next matching resume is allowed.
    Approved,
    /// Denied by an approver.
    Denied,
    /// Approved and used by a resume.
    Consumed,
    /// Not decided, or approved but not used, before `expires_unix_ms`.
    Expired,
}

/// One approval: what it is bound to, why it was needed, who may decide, and what happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// 32 lower-case hex digits, random (128 bits from the operating system).
    pub id: String,
    /// The call it is bound to.
    pub binding: Binding,
    /// The rule name that required it.
    pub policy: String,
    /// The rule's message.
    pub reason: String,
    /// Groups allowed to decide.
    pub approvers: Vec<String>,
    /// Where it is in its life.
    pub state: ApprovalState,
    /// When it was created (milliseconds since the Unix epoch).
    pub created_unix_ms: u64,
    /// Usable before this instant (milliseconds since the Unix epoch).
    pub expires_unix_ms: u64,
    /// The approver's name ("" while pending, and for one that expired undecided).
    pub decided_by: String,
    /// When it was approved or denied (0 while pending or expired undecided).
    pub decided_unix_ms: u64,
    /// The approver's comment ("" if none), at most [`MAX_NOTE_BYTES`].
    pub note: String,
}

/// What resuming a call with an approval id answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Approved and now consumed: allow this call once. The approval as stored after the
    /// resume (state [`ApprovalState::Consumed`]).
    Allow(Approval),
    /// Still pending.
    Pending(Approval),
    /// Denied, expired, consumed already, unknown id, or bound to another call: deny, with why
    /// (`"denied by <name>"`, "expired", "already used", "unknown approval id", "the call does not
    /// match the approval").
    Deny(String),
}

/// Why [`ApprovalStore::decide`] refused.
#[derive(Debug, PartialEq, Eq)]
pub enum DecideError {
    /// No approval with that id (or it was swept).
    Unknown,
    /// Decided, consumed or expired already; the state it is in.
    NotPending(ApprovalState),
    /// The approver is in none of the approval's groups.
    NotAnApprover,
    /// The approver is the subject whose call asked for the approval.
    SelfApproval,
    /// The store failed (I/O, a corrupt entry); the message says where.
    Store(String),
}

impl fmt::Display for DecideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecideError::Unknown => f.write_str("unknown approval id"),
            DecideError::NotPending(state) => write!(f, "the approval is not pending ({state:?})"),
            DecideError::NotAnApprover => {
                f.write_str("the approver is in none of the approval's groups")
            }
            DecideError::SelfApproval => f.write_str("an approver cannot decide their own call"),
            DecideError::Store(e) => write!(f, "approval store: {e}"),
        }
    }
}

impl std::error::Error for DecideError {}

/// An admin from the admin tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approver {
    /// The admin's name: what `decided_by` records.
    pub name: String,
    /// The groups the admin is in: an approval names the groups that may decide it.
    pub groups: Vec<String>,
}

/// Where approvals live. All methods take `now`; no implementation reads the clock.
///
/// Errors (`Err(String)`, [`DecideError::Store`]) are failures of the store itself, never of
/// the request; the message names the store's file where there is one.
pub trait ApprovalStore: Send + Sync {
    /// A new pending approval bound to `binding`, decidable by any of `approvers`, expiring
    /// `ttl` after `now`. Refused when [`MAX_PENDING`] are pending already, when `ttl` is zero,
    /// `approvers` is empty, or a field is oversized.
    fn create(
        &self,
        binding: Binding,
        policy: &str,
        reason: &str,
        approvers: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Approval, String>;

    /// The approval with this id, if any; a pending (or approved, unused) one past its expiry is
    /// marked [`ApprovalState::Expired`] first.
    fn get(&self, id: &str, now: SystemTime) -> Result<Option<Approval>, String>;

    /// Approve or deny. `approver`: name and groups from the admin token;
    /// `approver_subject_hash`: the hash of the approver's name computed by the caller with the
    /// same hasher as subjects, so an approver who is the subject that asked cannot decide
    /// ([`DecideError::SelfApproval`]). The approver must be in one of the approval's groups
    /// ([`DecideError::NotAnApprover`]). `note` is cut to [`MAX_NOTE_BYTES`].
    fn decide(
        &self,
        id: &str,
        approve: bool,
        approver: &Approver,
        approver_subject_hash: &str,
        note: &str,
        now: SystemTime,
    ) -> Result<Approval, DecideError>;

    /// Resume a call with an approval id: checks that the binding equals the approval's (tool,
    /// call_hash, subject_hash, policy_version all equal; a mismatch changes nothing), then the
    /// state and expiry. An approved one is consumed atomically: of concurrent resumes exactly
    /// one gets [`Resume::Allow`].
    fn resume(&self, id: &str, binding: &Binding, now: SystemTime) -> Result<Resume, String>;

    /// Pending ones first (oldest first), then those decided, expired or consumed in the last
    /// `recent` (newest change first), at most `limit` in all.
    fn list(
        &self,
        recent: Duration,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<Approval>, String>;

    /// How many are pending and not expired.
    fn pending(&self, now: SystemTime) -> Result<usize, String>;

    /// Drops entries that ended (were denied, consumed or expired) more than `keep` ago and
    /// returns how many; marks the expired ones it keeps. An approved, unused approval ends when
    /// it expires.
    fn sweep(&self, keep: Duration, now: SystemTime) -> Result<usize, String>;
}

// ---------------------------------------------------------------------------------------------
// The state machine, shared by the stores.

/// What a store keeps per id: the approval and when it ended (denied, consumed or expired; 0
/// while it can still be used), which `list` and `sweep` order and age by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) approval: Approval,
    #[serde(default)]
    pub(crate) ended_unix_ms: u64,
}

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Ids are 32 lower-case hex digits; anything else is unknown without a lookup.
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub(crate) fn new_id() -> Result<String, String> {
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).map_err(|e| format!("random source: {e}"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
}

/// The new record `create` stores, after checking its arguments (not the bound).
pub(crate) fn new_record(
    id: String,
    binding: Binding,
    policy: &str,
    reason: &str,
    approvers: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<Record, String> {
    if ttl.is_zero() {
        return Err("the approval's time to live is zero".into());
    }
    if approvers.is_empty() {
        return Err("an approval needs at least one approver group".into());
    }
    if approvers.len() > MAX_APPROVER_GROUPS {
        return Err(format!("more than {MAX_APPROVER_GROUPS} approver groups"));
    }
    let fields = [
        ("tool", binding.tool.as_str()),
        ("call_hash", binding.call_hash.as_str()),
        ("subject_hash", binding.subject_hash.as_str()),
        ("policy_version", binding.policy_version.as_str()),
        ("policy", policy),
        ("reason", reason),
    ];
    for (name, value) in fields {
        if value.len() > MAX_FIELD_BYTES {
            return Err(format!("{name} is longer than {MAX_FIELD_BYTES} bytes"));
        }
    }
    if approvers.iter().any(|g| g.len() > MAX_FIELD_BYTES) {
        return Err(format!(
            "an approver group is longer than {MAX_FIELD_BYTES} bytes"
        ));
    }
    let created = unix_ms(now);
    Ok(Record {
        approval: Approval {
            id,
            binding,
            policy: policy.to_owned(),
            reason: reason.to_owned(),
            approvers: approvers.to_vec(),
            state: ApprovalState::Pending,
            created_unix_ms: created,
            expires_unix_ms: created.saturating_add(duration_ms(ttl)),
            decided_by: String::new(),
            decided_unix_ms: 0,
            note: String::new(),
        },
        ended_unix_ms: 0,
    })
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Record {
    /// Marks a pending or approved (unused) approval past its expiry as expired; whether it did.
    pub(crate) fn expire(&mut self, now_ms: u64) -> bool {
        let a = &mut self.approval;
        if matches!(a.state, ApprovalState::Pending | ApprovalState::Approved)
            && now_ms >= a.expires_unix_ms
        {
            a.state = ApprovalState::Expired;
            self.ended_unix_ms = a.expires_unix_ms;
            true
        } else {
            false
        }
    }

    /// A copy as it reads at `now_ms` (expiry applied).
    pub(crate) fn at(&self, now_ms: u64) -> Record {
        let mut r = self.clone();
        r.expire(now_ms);
        r
    }

    /// When it ended, if it did (expiry is not applied: use on [`Record::at`]).
    fn ended(&self) -> Option<u64> {
        match self.approval.state {
            ApprovalState::Pending | ApprovalState::Approved => None,
            ApprovalState::Denied | ApprovalState::Consumed | ApprovalState::Expired => {
                Some(self.ended_unix_ms)
            }
        }
    }

    /// The time of its last change: creation while pending, the decision while approved, the
    /// end otherwise.
    fn changed(&self) -> u64 {
        match self.approval.state {
            ApprovalState::Pending => self.approval.created_unix_ms,
            ApprovalState::Approved => self.approval.decided_unix_ms,
            _ => self.ended_unix_ms,
        }
    }

    fn is_live_pending(&self, now_ms: u64) -> bool {
        self.approval.state == ApprovalState::Pending && now_ms < self.approval.expires_unix_ms
    }

    /// When it ends at the latest: when it ended, or (pending or approved) when it expires.
    /// `sweep` with `keep` drops it once more than `keep` has passed since.
    pub(crate) fn ends_by(&self) -> u64 {
        self.ended().unwrap_or(self.approval.expires_unix_ms)
    }

    /// Whether it is pending (whatever its expiry): the stores that keep an index of the
    /// pending ones keep it in there, keyed by its expiry.
    pub(crate) fn is_pending(&self) -> bool {
        self.approval.state == ApprovalState::Pending
    }

    /// Whether `sweep` drops it.
    pub(crate) fn sweepable(&self, keep_ms: u64, now_ms: u64) -> bool {
        self.at(now_ms)
            .ended()
            .is_some_and(|ended| ended.saturating_add(keep_ms) < now_ms)
    }

    pub(crate) fn decide(
        &mut self,
        approve: bool,
        approver: &Approver,
        approver_subject_hash: &str,
        note: &str,
        now_ms: u64,
    ) -> Result<Approval, DecideError> {
        self.expire(now_ms);
        let a = &mut self.approval;
        if a.state != ApprovalState::Pending {
            return Err(DecideError::NotPending(a.state));
        }
        if !approver.groups.iter().any(|g| a.approvers.contains(g)) {
            return Err(DecideError::NotAnApprover);
        }
        if !a.binding.subject_hash.is_empty() && approver_subject_hash == a.binding.subject_hash {
            return Err(DecideError::SelfApproval);
        }
        a.decided_by = approver.name.clone();
        a.decided_unix_ms = now_ms;
        a.note = cut(note, MAX_NOTE_BYTES).to_owned();
        if approve {
            a.state = ApprovalState::Approved;
        } else {
            a.state = ApprovalState::Denied;
            self.ended_unix_ms = now_ms;
        }
        Ok(self.approval.clone())
    }

    pub(crate) fn resume(&mut self, binding: &Binding, now_ms: u64) -> Resume {
        if self.approval.binding != *binding {
            return Resume::Deny("the call does not match the approval".into());
        }
        self.expire(now_ms);
        match self.approval.state {
            ApprovalState::Pending => Resume::Pending(self.approval.clone()),
            ApprovalState::Approved => {
                self.approval.state = ApprovalState::Consumed;
                self.ended_unix_ms = now_ms;
                Resume::Allow(self.approval.clone())
            }
            ApprovalState::Denied => {
                Resume::Deny(format!("denied by {}", self.approval.decided_by))
            }
            ApprovalState::Consumed => Resume::Deny("already used".into()),
            ApprovalState::Expired => Resume::Deny("expired".into()),
        }
    }
}

pub(crate) fn unknown() -> Resume {
    Resume::Deny("unknown approval id".into())
}

/// `list`'s order: pending by creation (oldest first), then the rest by last change (newest
/// first); the id breaks ties.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Rank(u8, u64, String);

struct Ranked(Rank, Approval);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// Picks `list`'s answer from a stream of records, keeping at most `limit` in memory.
pub(crate) struct Selector {
    heap: BinaryHeap<Ranked>,
    limit: usize,
    since_ms: u64,
    now_ms: u64,
}

impl Selector {
    pub(crate) fn new(recent: Duration, limit: usize, now_ms: u64) -> Selector {
        Selector {
            heap: BinaryHeap::new(),
            limit,
            since_ms: now_ms.saturating_sub(duration_ms(recent)),
            now_ms,
        }
    }

    pub(crate) fn offer(&mut self, rec: &Record) {
        if self.limit == 0 {
            return;
        }
        let r = rec.at(self.now_ms);
        let id = r.approval.id.clone();
        let rank = if r.approval.state == ApprovalState::Pending {
            Rank(0, r.approval.created_unix_ms, id)
        } else {
            let changed = r.changed();
            if changed < self.since_ms {
                return;
            }
            Rank(1, u64::MAX - changed, id)
        };
        if self.heap.len() == self.limit {
            if self.heap.peek().is_some_and(|worst| worst.0 <= rank) {
                return;
            }
            self.heap.pop();
        }
        self.heap.push(Ranked(rank, r.approval));
    }

    pub(crate) fn finish(self) -> Vec<Approval> {
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|r| r.1)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// In memory.

/// Approvals in a map behind a mutex: for tests, and for a daemon without a data directory
/// (approvals are lost on restart).
pub struct MemoryStore {
    map: Mutex<HashMap<String, Record>>,
    max_pending: usize,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore {
            map: Mutex::new(HashMap::new()),
            max_pending: MAX_PENDING,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        // Every change is a single assignment of a whole record: a panic elsewhere cannot leave
        // a record half-written, so a poisoned map is still consistent.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ApprovalStore for MemoryStore {
    fn create(
        &self,
        binding: Binding,
        policy: &str,
        reason: &str,
        approvers: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Approval, String> {
        let now_ms = unix_ms(now);
        let mut map = self.lock();
        if map.len() >= self.max_pending {
            let live = map.values().filter(|r| r.is_live_pending(now_ms)).count();
            if live >= self.max_pending {
                return Err(format!(
                    "{} approvals are pending already",
                    self.max_pending
                ));
            }
        }
        let mut id = new_id()?;
        while map.contains_key(&id) {
            id = new_id()?;
        }
        let rec = new_record(id.clone(), binding, policy, reason, approvers, ttl, now)?;
        let approval = rec.approval.clone();
        map.insert(id, rec);
        Ok(approval)
    }

    fn get(&self, id: &str, now: SystemTime) -> Result<Option<Approval>, String> {
        let mut map = self.lock();
        Ok(map.get_mut(id).map(|r| {
            r.expire(unix_ms(now));
            r.approval.clone()
        }))
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
        let mut map = self.lock();
        let rec = map.get_mut(id).ok_or(DecideError::Unknown)?;
        rec.decide(approve, approver, approver_subject_hash, note, unix_ms(now))
    }

    fn resume(&self, id: &str, binding: &Binding, now: SystemTime) -> Result<Resume, String> {
        let mut map = self.lock();
        Ok(match map.get_mut(id) {
            Some(rec) => rec.resume(binding, unix_ms(now)),
            None => unknown(),
        })
    }

    fn list(
        &self,
        recent: Duration,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<Approval>, String> {
        let map = self.lock();
        let mut sel = Selector::new(recent, limit, unix_ms(now));
        for rec in map.values() {
            sel.offer(rec);
        }
        Ok(sel.finish())
    }

    fn pending(&self, now: SystemTime) -> Result<usize, String> {
        let now_ms = unix_ms(now);
        Ok(self
            .lock()
            .values()
            .filter(|r| r.is_live_pending(now_ms))
            .count())
    }

    fn sweep(&self, keep: Duration, now: SystemTime) -> Result<usize, String> {
        let (keep_ms, now_ms) = (duration_ms(keep), unix_ms(now));
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, r| {
            r.expire(now_ms);
            !r.sweepable(keep_ms, now_ms)
        });
        Ok(before - map.len())
    }
}

// ---------------------------------------------------------------------------------------------
// In a redb file.

/// id -> serde_json of the record.
const APPROVALS: TableDefinition<&str, &[u8]> = TableDefinition::new("approvals");
/// id -> expires_unix_ms, for each approval in state `Pending`: the bound and `pending` read
/// this instead of decoding every approval. Changed in the same transaction as `APPROVALS`.
const PENDING: TableDefinition<&str, u64> = TableDefinition::new("pending");

/// redb's cache: 64 MiB instead of its 1 GiB default (about the size of [`MAX_PENDING`] entries).
const CACHE_BYTES: usize = 64 * 1024 * 1024;

type ApprovalsTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type PendingTable<'t> = redb::Table<'t, &'static str, u64>;

/// Approvals in a redb file, one process at a time (redb locks the file). Every change is
/// committed with `Durability::Immediate` before the method returns; reads use snapshots and do
/// not wait for writes, writes are serialized (which makes consuming an approval atomic).
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    max_pending: usize,
}

impl RedbStore {
    /// Opens the store at `path`, creating the file if there is none. New files use redb's v3
    /// file format (the only one later redb majors read).
    ///
    /// # Errors
    /// Naming `path`: when its directory does not exist, the file is not a redb database (or is
    /// corrupt), another process has it open, or it cannot be read or written.
    pub fn open(path: &Path) -> Result<RedbStore, String> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.is_dir() {
                return Err(format!(
                    "approval store {shown}: the directory {} does not exist",
                    dir.display()
                ));
            }
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_file_format_v3(true)
            .create(path)
            .map_err(|e| {
                let hint = match &e {
                    redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => {
                        " (corrupt, or not an approval store)"
                    }
                    redb::DatabaseError::Storage(redb::StorageError::Io(io))
                        if io.kind() == std::io::ErrorKind::InvalidData =>
                    {
                        " (corrupt, or not an approval store)"
                    }
                    redb::DatabaseError::DatabaseAlreadyOpen => {
                        " (another mistguard process uses this data directory)"
                    }
                    _ => "",
                };
                format!("approval store {shown}: {e}{hint}")
            })?;
        let store = RedbStore {
            db,
            path: path.to_owned(),
            max_pending: MAX_PENDING,
        };
        // Creates both tables in a new file; checks they open in an old one.
        store.write(|_, _| Ok(((), true)))?;
        Ok(store)
    }

    fn err(&self, e: impl fmt::Display) -> String {
        format!("approval store {}: {e}", self.path.display())
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<Record, String> {
        serde_json::from_slice(bytes).map_err(|e| self.err(format_args!("entry {id}: {e}")))
    }

    /// Runs `f` in one write transaction and commits (durably) when it says it changed
    /// something, even when its own result is an error for the caller.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut ApprovalsTable<'_>, &mut PendingTable<'_>) -> Result<(T, bool), String>,
    ) -> Result<T, String> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(Durability::Immediate);
        let (out, dirty) = {
            let mut approvals = txn.open_table(APPROVALS).map_err(|e| self.err(e))?;
            let mut pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
            f(&mut approvals, &mut pending)?
        };
        if dirty {
            txn.commit().map_err(|e| self.err(e))?;
        } else {
            txn.abort().map_err(|e| self.err(e))?;
        }
        Ok(out)
    }

    fn load(&self, approvals: &ApprovalsTable<'_>, id: &str) -> Result<Option<Record>, String> {
        match approvals.get(id).map_err(|e| self.err(e))? {
            Some(bytes) => self.decode(id, bytes.value()).map(Some),
            None => Ok(None),
        }
    }

    fn put(
        &self,
        approvals: &mut ApprovalsTable<'_>,
        pending: &mut PendingTable<'_>,
        rec: &Record,
    ) -> Result<(), String> {
        let id = rec.approval.id.as_str();
        let bytes = serde_json::to_vec(rec).map_err(|e| self.err(e))?;
        approvals
            .insert(id, bytes.as_slice())
            .map_err(|e| self.err(e))?;
        if rec.is_pending() {
            pending
                .insert(id, rec.approval.expires_unix_ms)
                .map_err(|e| self.err(e))?;
        } else {
            pending.remove(id).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// Applies `f` to the record with this id in one write transaction, storing it if `f`
    /// changed it. `None` when there is no such record.
    fn update<T>(&self, id: &str, f: impl FnOnce(&mut Record) -> T) -> Result<Option<T>, String> {
        if !valid_id(id) {
            return Ok(None);
        }
        self.write(|approvals, pending| {
            let Some(mut rec) = self.load(approvals, id)? else {
                return Ok((None, false));
            };
            let before = rec.clone();
            let out = f(&mut rec);
            let dirty = rec != before;
            if dirty {
                self.put(approvals, pending, &rec)?;
            }
            Ok((Some(out), dirty))
        })
    }

    /// Every record, from one snapshot, to `each`.
    fn scan(&self, mut each: impl FnMut(Record)) -> Result<(), String> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let approvals = txn.open_table(APPROVALS).map_err(|e| self.err(e))?;
        for entry in approvals.iter().map_err(|e| self.err(e))? {
            let (id, bytes) = entry.map_err(|e| self.err(e))?;
            each(self.decode(id.value(), bytes.value())?);
        }
        Ok(())
    }
}

impl ApprovalStore for RedbStore {
    fn create(
        &self,
        binding: Binding,
        policy: &str,
        reason: &str,
        approvers: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Approval, String> {
        let now_ms = unix_ms(now);
        let mut id = new_id()?;
        let rec = new_record(id.clone(), binding, policy, reason, approvers, ttl, now)?;
        self.write(|approvals, pending| {
            let mut dirty = false;
            if pending.len().map_err(|e| self.err(e))? as usize >= self.max_pending {
                // Full: mark the overdue ones expired (and so out of the index), then recount.
                let mut overdue = Vec::new();
                for entry in pending.iter().map_err(|e| self.err(e))? {
                    let (id, expires) = entry.map_err(|e| self.err(e))?;
                    if now_ms >= expires.value() {
                        overdue.push(id.value().to_owned());
                    }
                }
                for id in &overdue {
                    match self.load(approvals, id)? {
                        Some(mut old) => {
                            old.expire(now_ms);
                            self.put(approvals, pending, &old)?;
                        }
                        None => {
                            pending.remove(id.as_str()).map_err(|e| self.err(e))?;
                        }
                    }
                    dirty = true;
                }
                if pending.len().map_err(|e| self.err(e))? as usize >= self.max_pending {
                    let full = format!("{} approvals are pending already", self.max_pending);
                    return Ok((Err(full), dirty));
                }
            }
            let mut rec = rec;
            while approvals
                .get(id.as_str())
                .map_err(|e| self.err(e))?
                .is_some()
            {
                id = new_id()?;
                rec.approval.id = id.clone();
            }
            self.put(approvals, pending, &rec)?;
            Ok((Ok(rec.approval), true))
        })?
    }

    fn get(&self, id: &str, now: SystemTime) -> Result<Option<Approval>, String> {
        if !valid_id(id) {
            return Ok(None);
        }
        let now_ms = unix_ms(now);
        let rec = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let approvals = txn.open_table(APPROVALS).map_err(|e| self.err(e))?;
            let found = approvals.get(id).map_err(|e| self.err(e))?;
            match found {
                Some(bytes) => self.decode(id, bytes.value())?,
                None => return Ok(None),
            }
        };
        if rec.at(now_ms) == rec {
            return Ok(Some(rec.approval));
        }
        // Past its expiry: write the new state (another writer may have changed it meanwhile).
        self.update(id, |r| {
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
        self.update(id, |r| {
            r.decide(approve, approver, approver_subject_hash, note, now_ms)
        })
        .map_err(DecideError::Store)?
        .unwrap_or(Err(DecideError::Unknown))
    }

    fn resume(&self, id: &str, binding: &Binding, now: SystemTime) -> Result<Resume, String> {
        let now_ms = unix_ms(now);
        Ok(self
            .update(id, |r| r.resume(binding, now_ms))?
            .unwrap_or_else(unknown))
    }

    fn list(
        &self,
        recent: Duration,
        limit: usize,
        now: SystemTime,
    ) -> Result<Vec<Approval>, String> {
        let mut sel = Selector::new(recent, limit, unix_ms(now));
        self.scan(|rec| sel.offer(&rec))?;
        Ok(sel.finish())
    }

    fn pending(&self, now: SystemTime) -> Result<usize, String> {
        let now_ms = unix_ms(now);
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let pending = txn.open_table(PENDING).map_err(|e| self.err(e))?;
        let mut n = 0;
        for entry in pending.iter().map_err(|e| self.err(e))? {
            let (_, expires) = entry.map_err(|e| self.err(e))?;
            if now_ms < expires.value() {
                n += 1;
            }
        }
        Ok(n)
    }

    fn sweep(&self, keep: Duration, now: SystemTime) -> Result<usize, String> {
        let (keep_ms, now_ms) = (duration_ms(keep), unix_ms(now));
        self.write(|approvals, pending| {
            let mut drop = Vec::new();
            let mut expired = Vec::new();
            for entry in approvals.iter().map_err(|e| self.err(e))? {
                let (id, bytes) = entry.map_err(|e| self.err(e))?;
                let rec = self.decode(id.value(), bytes.value())?;
                if rec.sweepable(keep_ms, now_ms) {
                    drop.push(rec.approval.id);
                } else if rec.at(now_ms) != rec {
                    expired.push(rec.at(now_ms));
                }
            }
            for id in &drop {
                approvals.remove(id.as_str()).map_err(|e| self.err(e))?;
                pending.remove(id.as_str()).map_err(|e| self.err(e))?;
            }
            for rec in &expired {
                self.put(approvals, pending, rec)?;
            }
            let dirty = !drop.is_empty() || !expired.is_empty();
            Ok((drop.len(), dirty))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The admin tokens file.

/// Whether `s` is a valid admin name or group: `[A-Za-z0-9._@-]{1,64}`.
fn valid_label(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'))
}

/// Parses the admin tokens file: one admin per line, `<token> <name> <group>[,<group>...]`
/// (fields separated by spaces or tabs), `#` comment lines and blank lines ignored. Tokens are
/// printable ASCII of at least 16 bytes; names and groups `[A-Za-z0-9._@-]{1,64}`; the same
/// token on two lines is refused (one name may have several tokens, for rotation).
///
/// # Errors
/// The first problem, naming its line number but never a field's content (a token may sit in
/// any field of a malformed line); also when the file has no admin at all.
pub fn parse_admin_tokens(text: &str) -> Result<Vec<(Vec<u8>, Approver)>, String> {
    let mut out: Vec<(Vec<u8>, Approver)> = Vec::new();
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let [token, name, groups] = fields[..] else {
            return Err(format!(
                "line {n}: expected `<token> <name> <group>[,<group>...]`, found {} fields",
                fields.len()
            ));
        };
        if token.len() < 16 {
            return Err(format!("line {n}: the token is shorter than 16 bytes"));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("line {n}: the token is not printable ASCII"));
        }
        if !valid_label(name) {
            return Err(format!(
                "line {n}: the name must be 1 to 64 of A-Z a-z 0-9 . _ @ -"
            ));
        }
        let groups: Vec<String> = groups.split(',').map(str::to_owned).collect();
        if let Some(k) = groups.iter().position(|g| !valid_label(g)) {
            return Err(format!(
                "line {n}: group {} must be 1 to 64 of A-Z a-z 0-9 . _ @ -",
                k + 1
            ));
        }
        if let Some(first) = seen.insert(token.as_bytes(), n) {
            return Err(format!("line {n}: the same token as line {first}"));
        }
        out.push((
            token.as_bytes().to_vec(),
            Approver {
                name: name.to_owned(),
                groups,
            },
        ));
    }
    if out.is_empty() {
        return Err(
            "no admins (one a line: `<token> <name> <group>[,<group>...]`; `#` starts a comment)"
                .into(),
        );
    }
    Ok(out)
}

/// The admin whose token is `presented`, comparing in constant time against every token (the
/// time tells neither which one matched nor how close a wrong one came; only lengths differ).
pub fn find_admin<'a>(tokens: &'a [(Vec<u8>, Approver)], presented: &[u8]) -> Option<&'a Approver> {
    let mut hit = subtle::Choice::from(0u8);
    let mut index = 0u64;
    for (i, (token, _)) in tokens.iter().enumerate() {
        let eq = token.as_slice().ct_eq(presented);
        index = u64::conditional_select(&index, &(i as u64), eq);
        hit |= eq;
    }
    bool::from(hit).then(|| &tokens[index as usize].1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Barrier;

    const T0: u64 = 1_700_000_000_000;

    pub(crate) fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(T0 + ms)
    }

    pub(crate) fn binding(call: &str) -> Binding {
        Binding {
            tool: "send_email".into(),
            call_hash: call.into(),
            subject_hash: "00112233aabbccdd".into(),
            policy_version: "v7".into(),
        }
    }

    fn approver(name: &str, groups: &[&str]) -> Approver {
        Approver {
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub(crate) fn sec() -> Approver {
        approver("alice", &["ops", "security"])
    }

    const TTL: Duration = Duration::from_secs(600);

    pub(crate) fn create<S: ApprovalStore>(s: &S, call: &str, t: u64) -> Approval {
        s.create(
            binding(call),
            "email-outside",
            "mail to outside domains needs approval",
            &["security".to_string()],
            TTL,
            at(t),
        )
        .unwrap()
    }

    pub(crate) fn approve<S: ApprovalStore>(s: &S, id: &str, t: u64) -> Approval {
        s.decide(id, true, &sec(), "ffffffffffffffff", "ok", at(t))
            .unwrap()
    }

    fn create_then_get_pending<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        assert_eq!(a.id.len(), 32);
        assert!(valid_id(&a.id));
        assert_eq!(a.state, ApprovalState::Pending);
        assert_eq!(a.created_unix_ms, T0);
        assert_eq!(a.expires_unix_ms, T0 + 600_000);
        assert_eq!(a.decided_by, "");
        let got = s.get(&a.id, at(1)).unwrap().unwrap();
        assert_eq!(got, a);
        assert_eq!(s.pending(at(1)).unwrap(), 1);
        let b = create(s, "c1", 0);
        assert_ne!(a.id, b.id);
        assert_eq!(s.pending(at(1)).unwrap(), 2);
    }

    fn approve_then_resume_once<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        let d = approve(s, &a.id, 1_000);
        assert_eq!(d.state, ApprovalState::Approved);
        assert_eq!(d.decided_by, "alice");
        assert_eq!(d.decided_unix_ms, T0 + 1_000);
        assert_eq!(d.note, "ok");
        assert_eq!(s.pending(at(1_000)).unwrap(), 0);
        match s.resume(&a.id, &binding("c1"), at(2_000)).unwrap() {
            Resume::Allow(x) => {
                assert_eq!(x.id, a.id);
                assert_eq!(x.state, ApprovalState::Consumed);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            s.resume(&a.id, &binding("c1"), at(3_000)).unwrap(),
            Resume::Deny("already used".into())
        );
        let got = s.get(&a.id, at(3_000)).unwrap().unwrap();
        assert_eq!(got.state, ApprovalState::Consumed);
    }

    fn other_call_is_denied_and_not_consumed<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        approve(s, &a.id, 1_000);
        let mismatch = Resume::Deny("the call does not match the approval".into());
        assert_eq!(
            s.resume(&a.id, &binding("c2"), at(2_000)).unwrap(),
            mismatch
        );
        for change in [
            |b: &mut Binding| b.tool = "delete_file".into(),
            |b: &mut Binding| b.subject_hash = "".into(),
            |b: &mut Binding| b.policy_version = "v8".into(),
        ] {
            let mut b = binding("c1");
            change(&mut b);
            assert_eq!(s.resume(&a.id, &b, at(2_000)).unwrap(), mismatch);
        }
        let got = s.get(&a.id, at(2_000)).unwrap().unwrap();
        assert_eq!(got.state, ApprovalState::Approved);
        assert!(matches!(
            s.resume(&a.id, &binding("c1"), at(3_000)).unwrap(),
            Resume::Allow(_)
        ));
    }

    fn resume_before_decision_is_pending<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        assert_eq!(
            s.resume(&a.id, &binding("c1"), at(1_000)).unwrap(),
            Resume::Pending(a.clone())
        );
        assert_eq!(s.get(&a.id, at(1_000)).unwrap().unwrap(), a);
    }

    fn deny_then_resume_denied<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        let d = s
            .decide(&a.id, false, &sec(), "", "not outside", at(1_000))
            .unwrap();
        assert_eq!(d.state, ApprovalState::Denied);
        assert_eq!(d.note, "not outside");
        assert_eq!(
            s.resume(&a.id, &binding("c1"), at(2_000)).unwrap(),
            Resume::Deny("denied by alice".into())
        );
    }

    fn expiry<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        let late = 600_000;
        assert_eq!(s.pending(at(late - 1)).unwrap(), 1);
        assert_eq!(s.pending(at(late)).unwrap(), 0);
        let got = s.get(&a.id, at(late)).unwrap().unwrap();
        assert_eq!(got.state, ApprovalState::Expired);
        assert_eq!(
            s.resume(&a.id, &binding("c1"), at(late)).unwrap(),
            Resume::Deny("expired".into())
        );
        assert_eq!(
            s.decide(&a.id, true, &sec(), "", "", at(late)),
            Err(DecideError::NotPending(ApprovalState::Expired))
        );
        // Approved but not used in time.
        let b = create(s, "c2", 0);
        approve(s, &b.id, 1_000);
        assert_eq!(
            s.resume(&b.id, &binding("c2"), at(late + 5)).unwrap(),
            Resume::Deny("expired".into())
        );
        let got = s.get(&b.id, at(late + 5)).unwrap().unwrap();
        assert_eq!(got.state, ApprovalState::Expired);
        assert_eq!(got.decided_by, "alice");
    }

    fn decide_refusals<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        let outsider = approver("bob", &["ops", "securityx"]);
        assert_eq!(
            s.decide(&a.id, true, &outsider, "", "", at(1)),
            Err(DecideError::NotAnApprover)
        );
        assert_eq!(
            s.decide(&a.id, true, &sec(), "00112233aabbccdd", "", at(1)),
            Err(DecideError::SelfApproval)
        );
        assert_eq!(
            s.get(&a.id, at(1)).unwrap().unwrap().state,
            ApprovalState::Pending
        );
        approve(s, &a.id, 2);
        assert_eq!(
            s.decide(&a.id, false, &sec(), "", "", at(3)),
            Err(DecideError::NotPending(ApprovalState::Approved))
        );
        assert_eq!(
            s.decide(
                "0123456789abcdef0123456789abcdef",
                true,
                &sec(),
                "",
                "",
                at(3)
            ),
            Err(DecideError::Unknown)
        );
        assert_eq!(
            s.decide("not an id", true, &sec(), "", "", at(3)),
            Err(DecideError::Unknown)
        );
        // No subject: an approver whose hash is empty is not the subject.
        let mut b = binding("c3");
        b.subject_hash = String::new();
        let n = s
            .create(b, "p", "r", &["security".into()], TTL, at(0))
            .unwrap();
        assert!(s.decide(&n.id, true, &sec(), "", "", at(1)).is_ok());
        // The note is cut at a character boundary.
        let c = create(s, "c4", 0);
        let long = "é".repeat(MAX_NOTE_BYTES);
        let d = s.decide(&c.id, false, &sec(), "", &long, at(1)).unwrap();
        assert_eq!(d.note.len(), MAX_NOTE_BYTES);
    }

    fn unknown_ids<S: ApprovalStore>(s: &S) {
        for id in ["0123456789abcdef0123456789abcdef", "", "../etc", "ABCDEF"] {
            assert_eq!(s.get(id, at(0)).unwrap(), None);
            assert_eq!(
                s.resume(id, &binding("c1"), at(0)).unwrap(),
                Resume::Deny("unknown approval id".into())
            );
        }
    }

    fn create_refusals<S: ApprovalStore>(s: &S) {
        let groups = ["security".to_string()];
        assert!(s
            .create(binding("c"), "p", "r", &groups, Duration::ZERO, at(0))
            .is_err());
        assert!(s.create(binding("c"), "p", "r", &[], TTL, at(0)).is_err());
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        assert!(s
            .create(binding("c"), "p", &long, &groups, TTL, at(0))
            .unwrap_err()
            .contains("reason"));
        assert_eq!(s.pending(at(0)).unwrap(), 0);
    }

    fn concurrent_resume_allows_once<S: ApprovalStore>(s: &S) {
        let a = create(s, "c1", 0);
        approve(s, &a.id, 1);
        let barrier = Barrier::new(8);
        let answers: Vec<Resume> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        s.resume(&a.id, &binding("c1"), at(2)).unwrap()
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
    }

    fn list_order_and_limit<S: ApprovalStore>(s: &S) {
        let p1 = create(s, "p1", 0);
        let p2 = create(s, "p2", 1_000);
        let denied = create(s, "d", 2_000);
        let approved = create(s, "a", 3_000);
        let consumed = create(s, "c", 4_000);
        let old = create(s, "o", 5_000);
        s.decide(&old.id, false, &sec(), "", "", at(6_000)).unwrap();
        s.decide(&denied.id, false, &sec(), "", "", at(100_000))
            .unwrap();
        approve(s, &approved.id, 101_000);
        approve(s, &consumed.id, 50_000);
        assert!(matches!(
            s.resume(&consumed.id, &binding("c"), at(102_000)).unwrap(),
            Resume::Allow(_)
        ));
        let now = at(110_000);
        let recent = Duration::from_secs(60);
        let ids = |v: Vec<Approval>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list(recent, 10, now).unwrap()),
            [
                p1.id.as_str(),
                p2.id.as_str(),
                consumed.id.as_str(),
                approved.id.as_str(),
                denied.id.as_str()
            ]
        );
        assert_eq!(
            ids(s.list(recent, 3, now).unwrap()),
            [p1.id.as_str(), p2.id.as_str(), consumed.id.as_str()]
        );
        assert_eq!(ids(s.list(recent, 1, now).unwrap()), [p1.id.as_str()]);
        assert!(s.list(recent, 0, now).unwrap().is_empty());
        let all = s.list(Duration::from_secs(3600), 100, now).unwrap();
        assert_eq!(all.len(), 6);
        assert_eq!(all[5].id, old.id);
        // Past their expiry the pending and the unused approved one show as expired, ordered by
        // when they expired (created at 0, 1 and 3 s, for 600 s).
        let later = at(605_000);
        let v = s.list(Duration::from_secs(3600), 100, later).unwrap();
        assert_eq!(
            ids(v.clone()),
            [
                approved.id.as_str(),
                p2.id.as_str(),
                p1.id.as_str(),
                consumed.id.as_str(),
                denied.id.as_str(),
                old.id.as_str()
            ]
        );
        assert!(v[..3].iter().all(|a| a.state == ApprovalState::Expired));
    }

    fn sweep_drops_ended<S: ApprovalStore>(s: &S) {
        let keep = Duration::from_secs(60);
        let denied = create(s, "d", 0);
        s.decide(&denied.id, false, &sec(), "", "", at(1_000))
            .unwrap();
        let consumed = create(s, "c", 0);
        approve(s, &consumed.id, 1_000);
        s.resume(&consumed.id, &binding("c"), at(30_000)).unwrap();
        let approved = create(s, "a", 0);
        approve(s, &approved.id, 1_000);
        let pending = create(s, "p", 0);
        assert_eq!(s.sweep(keep, at(61_000)).unwrap(), 0);
        assert_eq!(s.sweep(keep, at(61_001)).unwrap(), 1);
        assert_eq!(s.get(&denied.id, at(61_001)).unwrap(), None);
        assert_eq!(s.sweep(keep, at(90_001)).unwrap(), 1);
        assert_eq!(s.get(&consumed.id, at(90_001)).unwrap(), None);
        assert!(s.get(&approved.id, at(90_001)).unwrap().is_some());
        assert!(s.get(&pending.id, at(90_001)).unwrap().is_some());
        // Both expire at 600 s and are dropped a minute after.
        assert_eq!(s.sweep(keep, at(600_000)).unwrap(), 0);
        assert_eq!(s.pending(at(600_000)).unwrap(), 0);
        assert_eq!(s.sweep(keep, at(660_001)).unwrap(), 2);
        assert!(s.list(Duration::MAX, 100, at(660_001)).unwrap().is_empty());
    }

    fn bound<S: ApprovalStore>(s: &S) {
        // The suite sets the bound to 3 for this test.
        for i in 0..3 {
            create(s, &format!("c{i}"), 0);
        }
        let err = s
            .create(binding("x"), "p", "r", &["security".into()], TTL, at(1))
            .unwrap_err();
        assert!(err.contains("3 approvals are pending"), "{err}");
        // Deciding one makes room; so does expiry.
        let first = s.list(Duration::ZERO, 1, at(1)).unwrap().remove(0);
        approve(s, &first.id, 2);
        create(s, "c3", 3);
        assert!(s
            .create(binding("x"), "p", "r", &["security".into()], TTL, at(4))
            .is_err());
        assert_eq!(s.pending(at(600_000)).unwrap(), 1);
        create(s, "c4", 600_000);
        create(s, "c5", 600_000);
        assert_eq!(s.pending(at(600_000)).unwrap(), 3);
    }

    macro_rules! suite {
        ($($name:ident),* $(,)?) => {
            mod memory {
                $(
                    #[test]
                    fn $name() {
                        let mut s = super::MemoryStore::new();
                        if stringify!($name) == "bound" {
                            s.max_pending = 3;
                        }
                        super::$name(&s);
                    }
                )*
            }
            mod redb {
                $(
                    #[test]
                    fn $name() {
                        let dir = tempfile::tempdir().unwrap();
                        let mut s = super::RedbStore::open(&dir.path().join("a.redb")).unwrap();
                        if stringify!($name) == "bound" {
                            s.max_pending = 3;
                        }
                        super::$name(&s);
                    }
                )*
            }
            // Against a real redis-server per test (the test fails when none is installed).
            mod redis_store {
                use crate::daemon::approvals_redis::{RedisApprovalStore, DEFAULT_PREFIX};
                use crate::daemon::redis_test_server::RedisServer;
                $(
                    #[test]
                    fn $name() {
                        let server = RedisServer::start();
                        let mut s = RedisApprovalStore::new(
                            &server.url(),
                            std::time::Duration::from_secs(2),
                            DEFAULT_PREFIX,
                        )
                        .unwrap();
                        if stringify!($name) == "bound" {
                            s.max_pending = 3;
                        }
                        super::$name(&s);
                    }
                )*
            }
        };
    }

    suite!(
        create_then_get_pending,
        approve_then_resume_once,
        other_call_is_denied_and_not_consumed,
        resume_before_decision_is_pending,
        deny_then_resume_denied,
        expiry,
        decide_refusals,
        unknown_ids,
        create_refusals,
        concurrent_resume_allows_once,
        list_order_and_limit,
        sweep_drops_ended,
        bound,
    );

    #[test]
    fn redb_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.redb");
        let (approved, pending, denied) = {
            let s = RedbStore::open(&path).unwrap();
            let a = create(&s, "c1", 0);
            approve(&s, &a.id, 1_000);
            let p = create(&s, "c2", 0);
            let d = create(&s, "c3", 0);
            s.decide(&d.id, false, &sec(), "", "", at(1_000)).unwrap();
            (a, p, d)
        };
        {
            let s = RedbStore::open(&path).unwrap();
            assert_eq!(s.pending(at(2_000)).unwrap(), 1);
            assert_eq!(s.get(&pending.id, at(2_000)).unwrap().unwrap(), pending);
            assert_eq!(
                s.resume(&pending.id, &binding("c2"), at(2_000)).unwrap(),
                Resume::Pending(pending.clone())
            );
            match s.resume(&approved.id, &binding("c1"), at(2_000)).unwrap() {
                Resume::Allow(a) => assert_eq!(a.decided_by, "alice"),
                other => panic!("{other:?}"),
            }
            assert_eq!(
                s.resume(&denied.id, &binding("c3"), at(2_000)).unwrap(),
                Resume::Deny("denied by alice".into())
            );
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(
            s.resume(&approved.id, &binding("c1"), at(3_000)).unwrap(),
            Resume::Deny("already used".into())
        );
        assert_eq!(
            s.get(&pending.id, at(3_000)).unwrap().unwrap().state,
            ApprovalState::Pending
        );
    }

    #[test]
    fn redb_open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-dir").join("approvals.redb");
        let err = RedbStore::open(&missing).err().unwrap();
        assert!(err.contains(&missing.display().to_string()), "{err}");
        assert!(err.contains("does not exist"), "{err}");

        let corrupt = dir.path().join("corrupt.redb");
        std::fs::write(&corrupt, vec![0x5a; 8192]).unwrap();
        let err = RedbStore::open(&corrupt).err().unwrap();
        assert!(err.contains(&corrupt.display().to_string()), "{err}");
        assert!(err.contains("corrupt, or not an approval store"), "{err}");

        // One process at a time: a second open of the same file is refused.
        let path = dir.path().join("a.redb");
        let _first = RedbStore::open(&path).unwrap();
        let err = RedbStore::open(&path).err().unwrap();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn redb_keeps_json_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.redb");
        let s = RedbStore::open(&path).unwrap();
        let a = create(&s, "c1", 0);
        drop(s);
        let bytes = std::fs::read(&path).unwrap();
        let json = serde_json::to_vec(&Record {
            approval: a,
            ended_unix_ms: 0,
        })
        .unwrap();
        assert!(bytes.windows(json.len()).any(|w| w == json.as_slice()));
    }

    const GOOD: &str = "\
# admins
0123456789abcdef alice security,ops

\tzyxwvutsrqponmlk-long bob@example.com security
0123456789abcdeg alice ops\r
";

    #[test]
    fn admin_tokens_good_file() {
        let admins = parse_admin_tokens(GOOD).unwrap();
        assert_eq!(admins.len(), 3);
        assert_eq!(admins[0].0, b"0123456789abcdef");
        assert_eq!(admins[0].1, approver("alice", &["security", "ops"]));
        assert_eq!(admins[1].1, approver("bob@example.com", &["security"]));
        assert_eq!(admins[2].1, approver("alice", &["ops"]));
        assert_eq!(
            find_admin(&admins, b"zyxwvutsrqponmlk-long").map(|a| a.name.as_str()),
            Some("bob@example.com")
        );
        assert_eq!(find_admin(&admins, b"0123456789abcdeg"), Some(&admins[2].1));
        assert_eq!(find_admin(&admins, b"0123456789abcde"), None);
        assert_eq!(find_admin(&admins, b"0123456789abcdefX"), None);
        assert_eq!(find_admin(&admins, b""), None);
        assert_eq!(find_admin(&[], b"0123456789abcdef"), None);
    }

    #[test]
    fn admin_tokens_errors_name_the_line_not_the_token() {
        let cases: &[(&str, &str)] = &[
            (
                "# c\n\nshort-token-1 alice ops\n",
                "line 3: the token is shorter",
            ),
            (
                "0123456789abcdef alice ops,b/d\n",
                "line 1: group 2 must be",
            ),
            ("0123456789abcdef alice ops,,x\n", "line 1: group 2 must be"),
            ("0123456789abcdef al:ice ops\n", "line 1: the name must be"),
            (
                "0123456789abcdef alice ops\n# x\n0123456789abcdef bob ops\n",
                "line 3: the same token as line 1",
            ),
            ("0123456789abcdef alice\n", "line 1: expected"),
            ("0123456789abcdef alice ops extra\n", "line 1: expected"),
            (
                "0123456789abcdéf alice ops\n",
                "line 1: the token is not printable",
            ),
            (
                "0123456789abcdef alice ops,x\nx\n",
                "line 2: expected `<token> <name> <group>[,<group>...]`, found 1 fields",
            ),
            ("# nothing\n\n", "no admins"),
        ];
        let name64 = "n".repeat(65);
        let long_name = format!("0123456789abcdef {name64} ops\n");
        for (text, want) in cases
            .iter()
            .copied()
            .chain([(long_name.as_str(), "line 1: the name")])
        {
            let err = parse_admin_tokens(text).unwrap_err();
            assert!(err.starts_with(want), "{text:?}: {err}");
            for secret in ["0123456789abcde", "short-token-1"] {
                assert!(!err.contains(secret), "{err}");
            }
        }
        assert!(parse_admin_tokens(&format!("0123456789abcdef {} ops", "n".repeat(64))).is_ok());
    }
}
