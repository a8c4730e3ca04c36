//! API keys: the union of `MISTRAL_API_KEY`, `MISTRAL_API_KEYS` and a mounted file, round-robin
//! over the keys not benched. A key answered 401/403 is benched for a while. A key is held in
//! [`ApiKey`], whose `Debug` and `Display` print `***`: no log line, error or panic can show one.
//!
//! The file is read once, synchronously, by [`Keys::new`]; after that the client's background
//! task looks at it every second ([`look`], off the async threads) and swaps what it read in with
//! [`Keys::apply`]. The request path only reads the keys in memory. A file that disappears (a
//! secret mount being swapped) or cannot be read leaves the last keys read in place.

use super::KeySource;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One key. Its text is reachable only through [`ApiKey::bearer`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct ApiKey(Arc<str>);

impl ApiKey {
    /// The `Authorization` header value.
    pub(crate) fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// The keys of a comma-separated list, trimmed, empty parts ignored.
pub(crate) fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(String::from)
        .collect()
}

/// The keys of a key file: one per line, trimmed; blank lines and `#` comments ignored.
pub(crate) fn parse_file(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .map(String::from)
        .collect()
}

/// What [`Keys::pick`] found.
#[derive(Debug)]
pub(crate) enum Pick {
    Key(ApiKey),
    /// No key configured anywhere.
    NoKeys,
    /// Keys exist, every one benched: an auth outage.
    AllBenched,
}

struct State {
    /// Keys of the environment (fixed) and of the file (re-read), de-duplicated, in order.
    fixed: Vec<ApiKey>,
    keys: Vec<ApiKey>,
    benched: HashMap<ApiKey, Instant>,
    file_stamp: Option<Stamp>,
    next: usize,
    outage: bool,
    /// The file could not be read last time (warned once until it is read again).
    file_missing: bool,
}

/// The key rotation.
pub(crate) struct Keys {
    file: Option<PathBuf>,
    cooldown: Duration,
    state: Mutex<State>,
}

/// A file's modification time and length: re-read when it changes.
pub(crate) type Stamp = (Option<SystemTime>, u64);

/// What a look at the key file found.
#[derive(Debug)]
pub(crate) enum Look {
    /// The same modification time and length as last read.
    Unchanged,
    /// Read: its stamp and keys.
    Read(Stamp, Vec<String>),
    /// Gone, or not readable.
    Missing,
}

/// Looks at the key file (blocking file I/O: call it off the async threads), reading it when its
/// stamp is not `last`.
pub(crate) fn look(path: &Path, last: Option<Stamp>) -> Look {
    let Ok(meta) = std::fs::metadata(path) else {
        return Look::Missing;
    };
    let stamp = (meta.modified().ok(), meta.len());
    if last == Some(stamp) {
        return Look::Unchanged;
    }
    match std::fs::read_to_string(path) {
        Ok(text) => Look::Read(stamp, parse_file(&text)),
        Err(_) => Look::Missing,
    }
}

fn union(fixed: &[ApiKey], more: Vec<String>) -> Vec<ApiKey> {
    let mut out: Vec<ApiKey> = fixed.to_vec();
    for k in more {
        let k = ApiKey(k.into());
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

impl Keys {
    pub(crate) fn new(src: &KeySource, cooldown: Duration) -> Keys {
        let mut strs = Vec::new();
        if let Some(s) = &src.single {
            let s = s.trim();
            if !s.is_empty() {
                strs.push(s.to_string());
            }
        }
        if let Some(l) = &src.list {
            strs.extend(parse_list(l));
        }
        let fixed = union(&[], strs);
        let keys = Keys {
            file: src.file.clone(),
            cooldown,
            state: Mutex::new(State {
                keys: fixed.clone(),
                fixed,
                benched: HashMap::new(),
                file_stamp: None,
                next: 0,
                outage: false,
                file_missing: false,
            }),
        };
        // The first read is synchronous (start-up, and `KeySource::count` without a runtime).
        if let Some(path) = &keys.file {
            keys.apply(look(path, None));
        }
        keys
    }

    /// The key file, if any, and the stamp last read (for [`look`]).
    pub(crate) fn file(&self) -> Option<(PathBuf, Option<Stamp>)> {
        let path = self.file.clone()?;
        let st = self.lock();
        Some((path, st.file_stamp))
    }

    /// Swaps in what [`look`] found. A missing or unreadable file keeps the last keys read (one
    /// WARN until the file is read again).
    pub(crate) fn apply(&self, found: Look) {
        let Some(path) = &self.file else { return };
        let mut st = self.lock();
        match found {
            Look::Unchanged => return,
            Look::Missing => {
                // Re-read the file whatever its stamp once it is back.
                st.file_stamp = None;
                if !st.file_missing {
                    st.file_missing = true;
                    tracing::warn!(
                        target: "mistguard::moderation",
                        path = %path.display(),
                        keys = st.keys.len(),
                        "moderation key file cannot be read; keeping the keys read last"
                    );
                }
                return;
            }
            Look::Read(stamp, from_file) => {
                st.file_stamp = Some(stamp);
                st.file_missing = false;
                let keys = union(&st.fixed, from_file);
                if keys == st.keys {
                    return;
                }
                st.keys = keys;
            }
        }
        let State { keys, benched, .. } = &mut *st;
        benched.retain(|k, _| keys.contains(k));
        let n = st.keys.len();
        let b = st.benched.len();
        set_key_gauges(n.saturating_sub(b), b);
        tracing::info!(
            target: "mistguard::moderation",
            keys = n,
            "moderation keys (re)loaded"
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next usable key, round-robin.
    pub(crate) fn pick(&self) -> Pick {
        let now = Instant::now();
        let mut st = self.lock();
        st.benched.retain(|_, until| *until > now);
        let n = st.keys.len();
        if n == 0 {
            set_key_gauges(0, 0);
            return Pick::NoKeys;
        }
        for i in 0..n {
            let idx = (st.next + i) % n;
            let k = &st.keys[idx];
            if !st.benched.contains_key(k) {
                let k = k.clone();
                st.next = (idx + 1) % n;
                let b = st.benched.len();
                set_key_gauges(n.saturating_sub(b), b);
                return Pick::Key(k);
            }
        }
        set_key_gauges(0, n);
        if !st.outage {
            st.outage = true;
            metrics::gauge!("mistguard_moderation_auth_outage").set(1.0);
            tracing::warn!(
                target: "mistguard::alert",
                keys = n,
                "moderation auth outage: every API key was refused (401/403)"
            );
        }
        Pick::AllBenched
    }

    /// Takes a key refused with 401/403 out of the rotation for the cooldown. A key no longer
    /// loaded (a file reload dropped it while a request with it was in flight) is not benched.
    pub(crate) fn bench(&self, key: &ApiKey) {
        let mut st = self.lock();
        if !st.keys.contains(key) {
            return;
        }
        let until = Instant::now()
            .checked_add(self.cooldown)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
        st.benched.insert(key.clone(), until);
        let n = st.keys.len();
        let b = st.benched.len();
        set_key_gauges(n.saturating_sub(b), b);
        tracing::warn!(
            target: "mistguard::moderation",
            benched = b,
            keys = n,
            "a moderation API key was refused (401/403); benched"
        );
    }

    /// A key was accepted: ends an auth outage.
    pub(crate) fn accepted(&self) {
        let mut st = self.lock();
        if st.outage {
            st.outage = false;
            metrics::gauge!("mistguard_moderation_auth_outage").set(0.0);
            tracing::info!(target: "mistguard::alert", "moderation auth outage over: a key was accepted");
        }
    }

    /// (usable now, loaded): the keys in memory, no file I/O.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let mut st = self.lock();
        st.benched.retain(|_, until| *until > now);
        let n = st.keys.len();
        (n.saturating_sub(st.benched.len()), n)
    }
}

fn set_key_gauges(usable: usize, benched: usize) {
    metrics::gauge!("mistguard_moderation_keys", "state" => "usable").set(usable as f64);
    metrics::gauge!("mistguard_moderation_keys", "state" => "benched").set(benched as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_files_parse() {
        assert_eq!(parse_list(" a, b ,,c ,"), ["a", "b", "c"]);
        assert!(parse_list(" , ").is_empty());
        assert_eq!(
            parse_file("# keys\n\n  k1  \n#k2\nk3\r\n"),
            ["k1".to_string(), "k3".to_string()]
        );
    }

    #[test]
    fn keys_are_masked_and_rotate_and_bench() {
        let k = ApiKey("sk-secret".into());
        assert_eq!(format!("{k} {k:?}"), "*** ***");
        let src = KeySource {
            single: Some("a".into()),
            list: Some("b, a ,c".into()),
            file: None,
        };
        let keys = Keys::new(&src, Duration::from_secs(60));
        assert_eq!(keys.counts(), (3, 3));
        let picked: Vec<String> = (0..4)
            .map(|_| match keys.pick() {
                Pick::Key(k) => k.bearer(),
                p => panic!("{p:?}"),
            })
            .collect();
        assert_eq!(picked, ["Bearer a", "Bearer b", "Bearer c", "Bearer a"]);
        keys.bench(&ApiKey("b".into()));
        assert_eq!(keys.counts(), (2, 3));
        for _ in 0..4 {
            match keys.pick() {
                Pick::Key(k) => assert_ne!(k.bearer(), "Bearer b"),
                p => panic!("{p:?}"),
            }
        }
        keys.bench(&ApiKey("a".into()));
        keys.bench(&ApiKey("c".into()));
        assert!(matches!(keys.pick(), Pick::AllBenched));
        keys.accepted();
        let none = Keys::new(&KeySource::default(), Duration::from_secs(1));
        assert!(matches!(none.pick(), Pick::NoKeys));
        assert_eq!(none.counts(), (0, 0));
    }

    #[test]
    fn a_benched_key_comes_back_after_the_cooldown() {
        let src = KeySource {
            single: Some("a".into()),
            ..Default::default()
        };
        let keys = Keys::new(&src, Duration::from_millis(30));
        keys.bench(&ApiKey("a".into()));
        assert!(matches!(keys.pick(), Pick::AllBenched));
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(keys.pick(), Pick::Key(_)));
    }

    fn bearer(p: Pick) -> String {
        match p {
            Pick::Key(k) => k.bearer(),
            p => panic!("{p:?}"),
        }
    }

    /// Rewrites the key file with a modification time of its own (the stamp changes even when
    /// the length does not), then looks at it as the background task does.
    fn rewrite(keys: &Keys, path: &Path, text: &str, secs: u64) {
        std::fs::write(path, text).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs))
            .unwrap();
        drop(f);
        let (p, stamp) = keys.file().unwrap();
        keys.apply(look(&p, stamp));
    }

    #[test]
    fn benching_a_key_a_reload_dropped_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "key-a\nkey-b\n").unwrap();
        let src = KeySource {
            file: Some(path.clone()),
            ..Default::default()
        };
        let keys = Keys::new(&src, Duration::from_secs(60));
        assert_eq!(keys.counts(), (2, 2));
        // A request goes out with key-a ...
        let a = match keys.pick() {
            Pick::Key(k) => k,
            p => panic!("{p:?}"),
        };
        assert_eq!(a.bearer(), "Bearer key-a");
        // ... the file is reloaded without it ...
        rewrite(&keys, &path, "key-b\n", 1);
        assert_eq!(keys.counts(), (1, 1));
        // ... and the answer is a 401: no panic, and key-a is not counted anywhere.
        keys.bench(&a);
        assert_eq!(keys.counts(), (1, 1));
        assert_eq!(bearer(keys.pick()), "Bearer key-b");
        assert_eq!(bearer(keys.pick()), "Bearer key-b");
        // Benching the key still loaded works as before.
        keys.bench(&ApiKey("key-b".into()));
        assert_eq!(keys.counts(), (0, 1));
        assert!(matches!(keys.pick(), Pick::AllBenched));
    }

    #[test]
    fn a_key_file_that_disappears_keeps_the_last_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# keys\nfile-a\n").unwrap();
        let src = KeySource {
            single: Some("env-a".into()),
            file: Some(path.clone()),
            ..Default::default()
        };
        let keys = Keys::new(&src, Duration::from_secs(60));
        assert_eq!(keys.counts(), (2, 2));
        // Unchanged: nothing happens.
        let (p, stamp) = keys.file().unwrap();
        assert!(matches!(look(&p, stamp), Look::Unchanged));
        // Gone (twice: warned once): the keys stay.
        std::fs::remove_file(&path).unwrap();
        for _ in 0..2 {
            let (p, stamp) = keys.file().unwrap();
            let found = look(&p, stamp);
            assert!(matches!(found, Look::Missing));
            keys.apply(found);
            assert_eq!(keys.counts(), (2, 2));
        }
        assert_eq!(bearer(keys.pick()), "Bearer env-a");
        assert_eq!(bearer(keys.pick()), "Bearer file-a");
        // Back with another key: swapped in.
        rewrite(&keys, &path, "file-b\n", 2);
        assert_eq!(keys.counts(), (2, 2));
        let picked: Vec<String> = (0..2).map(|_| bearer(keys.pick())).collect();
        assert!(picked.contains(&"Bearer file-b".to_string()), "{picked:?}");
        assert!(!picked.contains(&"Bearer file-a".to_string()), "{picked:?}");
        // A file missing at start: the environment's keys only.
        let none = Keys::new(
            &KeySource {
                single: Some("env-a".into()),
                file: Some(dir.path().join("absent")),
                ..Default::default()
            },
            Duration::from_secs(60),
        );
        assert_eq!(none.counts(), (1, 1));
    }
}
