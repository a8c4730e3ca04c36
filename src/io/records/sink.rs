//! The sink: a cheap handle that encodes records and a writer thread that owns the segment file.

use super::chain::{self, Segment};
use metrics::Counter;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// The most jobs one batch takes from the queue (one write, one fsync).
const MAX_BATCH: usize = 4096;

/// When `write` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// After the record is written and fdatasync'ed (group commit: one fsync for every record
    /// queued meanwhile). A full queue makes writers wait.
    Sync,
    /// As soon as the record is queued; the writer fsyncs at most every
    /// `async_fsync_interval`. A full queue drops the record (counted).
    Async,
}

/// How a [`Sink`] writes, rotates and retains its segments.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    pub durability: Durability,
    /// Records queued for the writer at most (default 65536).
    pub queue: usize,
    /// A new segment starts once the current one reaches this size (default 64 MiB).
    pub max_segment_bytes: u64,
    /// Oldest segments are deleted while the stream is larger (default 8 GiB).
    pub max_total_bytes: u64,
    /// Segments last modified longer ago are deleted (default 30 days).
    pub retain_age: Duration,
    /// In [`Durability::Async`], the longest time written records wait for an fsync (default 1s).
    pub async_fsync_interval: Duration,
    /// In [`Durability::Sync`], how long a batch smaller than [`LINGER_BATCH`] waits for more
    /// records before its write and fsync (PostgreSQL's `commit_delay`). Default zero: commit
    /// what is queued at once (records that arrive during an fsync form the next batch). Under
    /// heavy concurrency a delay of about an fsync's time makes fewer, larger commits, and each
    /// fsync of an appended file is a journal commit that costs kernel CPU.
    pub linger: Duration,
}

/// A sync batch this large is committed without lingering.
pub const LINGER_BATCH: usize = 256;

impl Default for SinkConfig {
    fn default() -> SinkConfig {
        SinkConfig {
            durability: Durability::Sync,
            queue: 65536,
            max_segment_bytes: 64 << 20,
            max_total_bytes: 8 << 30,
            retain_age: Duration::from_secs(30 * 86400),
            async_fsync_interval: Duration::from_secs(1),
            linger: Duration::ZERO,
        }
    }
}

/// Why a record was not written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Async mode: the queue was full, the record is dropped (and counted).
    Dropped,
    /// The write or the fsync of the record's batch failed (the OS error's kind); the record is
    /// not in the file.
    Io(String),
    /// The writer has stopped.
    Closed,
    /// The record did not serialize to a JSON object.
    Encode(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Dropped => f.write_str("record dropped: the queue is full"),
            RecordError::Io(e) => write!(f, "record not written: {e}"),
            RecordError::Closed => f.write_str("record not written: the writer has stopped"),
            RecordError::Encode(e) => write!(f, "record not encoded: {e}"),
        }
    }
}

impl std::error::Error for RecordError {}

/// Counts since the sink was opened (also exported as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Records written (in sync mode: and fsync'ed).
    pub written: u64,
    /// Records dropped on a full queue.
    pub dropped: u64,
    /// Records lost to a write or fsync error.
    pub errors: u64,
    /// fdatasync calls on segment files.
    pub fsyncs: u64,
}

/// Test hooks on the writer's I/O: fail the next writes or fsyncs, or hold the writer.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// The next N writes write half their bytes, then fail with ENOSPC.
    pub fail_writes: AtomicU32,
    /// The next N fsyncs fail with EIO.
    pub fail_fsyncs: AtomicU32,
    /// While set, the writer waits after taking a batch's first job.
    pub pause: AtomicBool,
}

fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
        .is_ok()
}

#[derive(Default)]
struct Counts {
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    fsyncs: AtomicU64,
}

struct Shared {
    stream: String,
    durability: Durability,
    dropped: Counter,
    counts: Arc<Counts>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every handle (and so every sender) is gone: the writer drains, fsyncs and ends.
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

enum Msg {
    Rec {
        body: Vec<u8>,
        ack: Option<oneshot::Sender<Result<(), RecordError>>>,
    },
    Flush(oneshot::Sender<Result<(), RecordError>>),
}

/// A handle on one stream's writer. Clones share the writer; it ends (after a final fsync) when
/// the last handle is dropped or closed.
#[derive(Clone)]
pub struct Sink {
    // Dropped before `shared`, so the last handle closes the queue before it joins the writer.
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("stream", &self.shared.stream)
            .field("durability", &self.shared.durability)
            .finish()
    }
}

/// The serialized record without its leading `{` (what follows `"prev":"…",` in a line).
fn encode(rec: &impl Serialize) -> Result<Vec<u8>, RecordError> {
    let mut v = serde_json::to_vec(rec).map_err(|e| RecordError::Encode(e.to_string()))?;
    if v.first() != Some(&b'{') {
        return Err(RecordError::Encode("not a JSON object".into()));
    }
    v.remove(0);
    Ok(v)
}

impl Sink {
    /// Opens (creating `dir` if needed) the stream `stream` in `dir`: applies retention, repairs
    /// a torn last line of the last segment and starts the writer thread.
    ///
    /// # Errors
    /// A message naming the path and the OS error.
    pub fn open(dir: &Path, stream: &str, cfg: SinkConfig) -> Result<Sink, String> {
        Sink::open_with(dir, stream, cfg, None)
    }

    #[cfg(test)]
    pub(crate) fn open_faulty(
        dir: &Path,
        stream: &str,
        cfg: SinkConfig,
        faults: Arc<Faults>,
    ) -> Result<Sink, String> {
        Sink::open_with(dir, stream, cfg, Some(faults))
    }

    fn open_with(
        dir: &Path,
        stream: &str,
        cfg: SinkConfig,
        faults: Option<Arc<Faults>>,
    ) -> Result<Sink, String> {
        if stream.is_empty()
            || !stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(format!("stream name {stream:?}: use letters, digits and _"));
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        retention(dir, stream, &cfg);
        let (seg, file, len, last) = recover(dir, stream)?;
        let counts = Arc::new(Counts::default());
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let writer = Writer {
            dir: dir.to_path_buf(),
            stream: stream.to_string(),
            labels: [("stream", stream.to_string())],
            seg,
            file,
            len,
            durable_len: len,
            last,
            durable_last: last,
            dirty: false,
            unsynced_records: 0,
            last_fsync: Instant::now(),
            repair_to: None,
            last_warn: None,
            suppressed: 0,
            lost_since_flush: false,
            counts: counts.clone(),
            faults,
            cfg: cfg.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("mistguard-records-{stream}"))
            .spawn(move || writer.run(rx))
            .map_err(|e| format!("{}: writer thread: {e}", dir.display()))?;
        Ok(Sink {
            tx,
            shared: Arc::new(Shared {
                stream: stream.to_string(),
                durability: cfg.durability,
                dropped: metrics::counter!("mistguard_records_dropped_total", "stream" => stream.to_string()),
                counts,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.shared.stream
    }

    /// Counts since the sink was opened.
    pub fn stats(&self) -> SinkStats {
        let c = &self.shared.counts;
        SinkStats {
            written: c.written.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
        }
    }

    fn count_drop(&self) -> RecordError {
        self.shared.dropped.increment(1);
        self.shared.counts.dropped.fetch_add(1, Ordering::Relaxed);
        RecordError::Dropped
    }

    /// Writes one record (serialized here, in the caller). In [`Durability::Sync`] it returns
    /// once the record is on disk; in [`Durability::Async`] once it is queued.
    ///
    /// # Errors
    /// [`RecordError::Dropped`] (async, full queue), [`RecordError::Io`] (sync: the batch's
    /// write or fsync failed), [`RecordError::Closed`], [`RecordError::Encode`].
    pub async fn write(&self, rec: &impl Serialize) -> Result<(), RecordError> {
        let body = encode(rec)?;
        match self.shared.durability {
            Durability::Sync => {
                let (ack, done) = oneshot::channel();
                self.tx
                    .send(Msg::Rec {
                        body,
                        ack: Some(ack),
                    })
                    .await
                    .map_err(|_| RecordError::Closed)?;
                done.await.unwrap_or(Err(RecordError::Closed))
            }
            Durability::Async => self.enqueue(body),
        }
    }

    fn enqueue(&self, body: Vec<u8>) -> Result<(), RecordError> {
        match self.tx.try_send(Msg::Rec { body, ack: None }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(self.count_drop()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(RecordError::Closed),
        }
    }

    /// Resolves once every record queued before it is written and fsync'ed.
    ///
    /// # Errors
    /// When that fsync (or a write before it) failed, or the writer has stopped.
    pub async fn flush(&self) -> Result<(), RecordError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Flush(ack))
            .await
            .map_err(|_| RecordError::Closed)?;
        done.await.unwrap_or(Err(RecordError::Closed))
    }

    /// Drops this handle; when it is the last one, waits for the writer to write, fsync and end.
    pub fn close(self) {
        drop(self);
    }
}

/// Deletes whole oldest segments (never the last one) older than `retain_age` or while the
/// stream is larger than `max_total_bytes`. Errors are logged, not returned.
fn retention(dir: &Path, stream: &str, cfg: &SinkConfig) {
    let segs = match chain::list_segments(dir, stream) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(stream, "records retention: {e}");
            return;
        }
    };
    let meta: Vec<(u64, Option<SystemTime>)> = segs
        .iter()
        .map(|s| match std::fs::metadata(&s.path) {
            Ok(m) => (m.len(), m.modified().ok()),
            Err(_) => (0, None),
        })
        .collect();
    let mut total: u64 = meta.iter().map(|m| m.0).sum();
    let now = SystemTime::now();
    for (seg, (size, mtime)) in segs.iter().zip(&meta).take(segs.len().saturating_sub(1)) {
        let old = mtime
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > cfg.retain_age);
        if !old && total <= cfg.max_total_bytes {
            break;
        }
        match std::fs::remove_file(&seg.path) {
            Ok(()) => {
                total -= size;
                tracing::info!(stream, file = %seg.path.display(), bytes = size, "records retention: deleted a segment");
            }
            Err(e) => {
                tracing::warn!(stream, "records retention: {}: {e}", seg.path.display());
                break;
            }
        }
    }
}

fn open_append(path: &Path, create_new: bool) -> Result<File, String> {
    OpenOptions::new()
        .append(true)
        .read(true)
        .create(create_new)
        .create_new(create_new)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Finds the last segment, cuts a torn or unverifiable tail back to the last good line and
/// returns it opened for appending, with its length and the chain's last hash. Only the last
/// segment is read (the one before it too when the last one holds no good line).
fn recover(dir: &Path, stream: &str) -> Result<(Segment, File, u64, [u8; 32]), String> {
    let mut segs = chain::list_segments(dir, stream)?;
    let Some(last) = segs.pop() else {
        let seg = Segment {
            seq: 1,
            path: dir.join(chain::segment_name(stream, 1)),
        };
        let file = open_append(&seg.path, true)?;
        sync_dir(dir);
        return Ok((seg, file, 0, chain::ZERO_HASH));
    };
    let (file, len, hash) = repair(&last.path, stream)?;
    if let Some(h) = hash {
        return Ok((last, file, len, h));
    }
    // The last segment holds no good line: the chain goes on from the one before it.
    let mut prev_hash = chain::ZERO_HASH;
    if let Some(before) = segs.pop() {
        let data =
            std::fs::read(&before.path).map_err(|e| format!("{}: {e}", before.path.display()))?;
        if let Some(h) = chain::good_tail(&data).last_hash {
            prev_hash = h;
        }
    }
    Ok((last, file, len, prev_hash))
}

/// Truncates the segment at `path` back to its last good line; logs one WARN when bytes go.
fn repair(path: &Path, stream: &str) -> Result<(File, u64, Option<[u8; 32]>), String> {
    let file = open_append(path, false)?;
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let tail = chain::good_tail(&data);
    let dropped = data.len() as u64 - tail.good_len;
    if dropped > 0 {
        file.set_len(tail.good_len)
            .and_then(|()| file.sync_data())
            .map_err(|e| format!("{}: truncating a torn tail: {e}", path.display()))?;
        tracing::warn!(
            stream,
            file = %path.display(),
            bytes_dropped = dropped,
            "records: dropped a torn or unverifiable tail of {dropped} bytes from the last segment"
        );
    }
    Ok((file, tail.good_len, tail.last_hash))
}

struct Writer {
    dir: PathBuf,
    stream: String,
    labels: [(&'static str, String); 1],
    seg: Segment,
    file: File,
    /// Bytes of good lines written to `file`.
    len: u64,
    /// Bytes of `file` known to be on disk.
    durable_len: u64,
    /// The hash of the last line written, and of the last line on disk.
    last: [u8; 32],
    durable_last: [u8; 32],
    /// Written but not yet fsync'ed.
    dirty: bool,
    unsynced_records: u64,
    last_fsync: Instant,
    /// A failed write or fsync left bytes to cut before the next batch: the length to cut back
    /// to and the hash of the line that ends there.
    repair_to: Option<(u64, [u8; 32])>,
    last_warn: Option<Instant>,
    suppressed: u64,
    lost_since_flush: bool,
    counts: Arc<Counts>,
    faults: Option<Arc<Faults>>,
    cfg: SinkConfig,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(stream = %self.stream, "records writer: no runtime: {e}");
                return;
            }
        };
        rt.block_on(self.serve(rx));
        self.repair();
        if self.dirty {
            let _ = self.fsync();
        }
    }

    async fn serve(&mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut batch: Vec<Msg> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let first = if self.dirty {
                let due = self.last_fsync + self.cfg.async_fsync_interval;
                match tokio::time::timeout_at(due.into(), rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        let _ = self.fsync();
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(first) = first else { return };
            if let Some(f) = &self.faults {
                while f.pause.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            self.prepare_segment();
            batch.clear();
            buf.clear();
            let mut prev = self.last;
            let mut records = 0u64;
            let mut flush = false;
            let room = self.cfg.max_segment_bytes.saturating_sub(self.len);
            let mut take = |m: Msg, buf: &mut Vec<u8>, batch: &mut Vec<Msg>| {
                match &m {
                    Msg::Rec { body, .. } => {
                        prev = chain::append_line(buf, &prev, body);
                        records += 1;
                    }
                    Msg::Flush(_) => flush = true,
                }
                batch.push(m);
            };
            take(first, &mut buf, &mut batch);
            // Group commit: everything already queued (and, with a `linger`, whatever arrives
            // within it) shares one write and one fsync.
            let linger = match self.cfg.durability {
                Durability::Sync if !self.cfg.linger.is_zero() => {
                    Some(tokio::time::Instant::now() + self.cfg.linger)
                }
                _ => None,
            };
            while batch.len() < MAX_BATCH && (buf.len() as u64) < room {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut buf, &mut batch),
                    Err(_) => {
                        let Some(until) = linger.filter(|_| batch.len() < LINGER_BATCH) else {
                            break;
                        };
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(m)) => take(m, &mut buf, &mut batch),
                            _ => break,
                        }
                    }
                }
            }
            let result = self.commit(&buf, prev, records, flush);
            for m in batch.drain(..) {
                match m {
                    Msg::Rec { ack: Some(a), .. } => {
                        let _ = a.send(result.clone());
                    }
                    Msg::Rec { ack: None, .. } => {}
                    Msg::Flush(a) => {
                        // A flush also answers for records lost since the last flush (async
                        // records have no answer of their own).
                        let lost = std::mem::take(&mut self.lost_since_flush);
                        let r = match &result {
                            Ok(()) if lost => Err(RecordError::Io(
                                "records were lost to an I/O error since the last flush".into(),
                            )),
                            r => r.clone(),
                        };
                        let _ = a.send(r);
                    }
                }
            }
        }
    }

    /// Before a batch: cut what a failed batch left, and rotate a full segment.
    fn prepare_segment(&mut self) {
        self.repair();
        if self.len >= self.cfg.max_segment_bytes && self.repair_to.is_none() {
            if let Err(e) = self.rotate() {
                self.warn(&e);
            }
        }
    }

    /// Writes a batch's bytes and, as the mode asks, fsyncs them.
    fn commit(
        &mut self,
        buf: &[u8],
        last: [u8; 32],
        records: u64,
        flush: bool,
    ) -> Result<(), RecordError> {
        if self.repair_to.is_some() {
            self.fail(
                records,
                "the segment could not be repaired after an earlier error",
            );
            return Err(RecordError::Io("segment not repaired".into()));
        }
        if !buf.is_empty() {
            if let Err(e) = self.write_all(buf) {
                self.fail(records, &format!("{}: write: {e}", self.seg.path.display()));
                // Batches before this one are whole lines: cut back to the end of the last.
                self.repair_to = Some((self.len, self.last));
                self.repair();
                return Err(RecordError::Io(e.kind().to_string()));
            }
            self.len += buf.len() as u64;
            self.last = last;
            self.dirty = true;
            self.unsynced_records += records;
        }
        let must_sync = match self.cfg.durability {
            Durability::Sync => true,
            Durability::Async => {
                flush || self.last_fsync.elapsed() >= self.cfg.async_fsync_interval
            }
        };
        if must_sync && self.dirty {
            self.fsync()
        } else {
            Ok(())
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if let Some(f) = &self.faults {
            if take_one(&f.fail_writes) {
                let _ = self.file.write_all(&buf[..buf.len() / 2]);
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        self.file.write_all(buf)
    }

    /// fdatasyncs the segment; on failure the bytes since the last good fsync are cut.
    fn fsync(&mut self) -> Result<(), RecordError> {
        let started = Instant::now();
        let res = match &self.faults {
            Some(f) if take_one(&f.fail_fsyncs) => {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            _ => self.file.sync_data(),
        };
        self.counts.fsyncs.fetch_add(1, Ordering::Relaxed);
        metrics::histogram!("mistguard_records_fsync_seconds", &self.labels)
            .record(started.elapsed().as_secs_f64());
        self.last_fsync = Instant::now();
        match res {
            Ok(()) => {
                self.count_written();
                self.durable_len = self.len;
                self.durable_last = self.last;
                self.dirty = false;
                Ok(())
            }
            Err(e) => {
                let lost = self.unsynced_records;
                self.fail(lost, &format!("{}: fsync: {e}", self.seg.path.display()));
                self.unsynced_records = 0;
                self.dirty = false;
                // What was not fsync'ed may or may not be on disk: cut back to what was.
                self.repair_to = Some((self.durable_len, self.durable_last));
                self.repair();
                Err(RecordError::Io(e.kind().to_string()))
            }
        }
    }

    fn count_written(&mut self) {
        let n = std::mem::take(&mut self.unsynced_records);
        if n > 0 {
            metrics::counter!("mistguard_records_written_total", &self.labels).increment(n);
            self.counts.written.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Counts `records` lost and logs (one WARN a second at most).
    fn fail(&mut self, records: u64, what: &str) {
        self.lost_since_flush = true;
        metrics::counter!("mistguard_records_errors_total", &self.labels).increment(records.max(1));
        self.counts
            .errors
            .fetch_add(records.max(1), Ordering::Relaxed);
        self.warn(what);
    }

    fn warn(&mut self, what: &str) {
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        self.last_warn = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        tracing::warn!(stream = %self.stream, suppressed, "records: {what}; records of this batch are lost");
    }

    /// Cuts the segment back to the end of its last good line, so the chain goes on from there.
    fn repair(&mut self) {
        let Some((len, last)) = self.repair_to else {
            return;
        };
        match self.file.set_len(len).and_then(|()| self.file.sync_data()) {
            Ok(()) => {
                self.len = len;
                self.last = last;
                self.durable_len = len;
                self.durable_last = last;
                self.repair_to = None;
                // The sync covered the whole lines written before the failed batch.
                self.count_written();
                self.dirty = false;
            }
            Err(e) => {
                let msg = format!(
                    "{}: truncating after an error: {e}",
                    self.seg.path.display()
                );
                self.warn(&msg);
            }
        }
    }

    /// Starts the next segment (the chain goes on in it) and applies retention.
    fn rotate(&mut self) -> Result<(), String> {
        if self.dirty {
            self.fsync().map_err(|e| e.to_string())?;
        }
        let seq = self.seg.seq + 1;
        let path = self.dir.join(chain::segment_name(&self.stream, seq));
        let file = open_append(&path, true)?;
        sync_dir(&self.dir);
        self.file = file;
        self.seg = Segment { seq, path };
        self.len = 0;
        self.durable_len = 0;
        retention(&self.dir, &self.stream, &self.cfg);
        Ok(())
    }
}
