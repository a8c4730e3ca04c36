//! API keys: the union of `MISTRAL_API_KEY`, `MISTRAL_API_KEYS` and a mounted file (re-read when
//! it changes, checked at most once per second), round-robin over the keys not benched. A key
//! answered 401/403 is benched for a while. A key is held in [`ApiKey`], whose `Debug` and
//! `Display` print `***`: no log line, error or panic can show one.

use super::KeySource;
use std::collections::HashMap;
use std::path::Path;
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
    last_check: Option<Instant>,
    next: usize,
    outage: bool,
    /// The file could not be read last time (warned once).
    file_missing: bool,
}

/// The key rotation.
pub(crate) struct Keys {
    file: Option<std::path::PathBuf>,
    cooldown: Duration,
    state: Mutex<State>,
}

/// A file's modification time and length: re-read when it changes.
type Stamp = (Option<SystemTime>, u64);

fn read_file(path: &Path) -> Option<(Stamp, Vec<String>)> {
    let meta = std::fs::metadata(path).ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    Some(((meta.modified().ok(), meta.len()), parse_file(&text)))
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
                last_check: None,
                next: 0,
                outage: false,
                file_missing: false,
            }),
        };
        {
            let mut st = keys.state.lock().unwrap_or_else(|e| e.into_inner());
            keys.refresh(&mut st, Instant::now());
        }
        keys
    }

    /// Re-reads the key file when its modification time or length changed (checked at most once
    /// per second).
    fn refresh(&self, st: &mut State, now: Instant) {
        let Some(path) = &self.file else { return };
        if st
            .last_check
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        st.last_check = Some(now);
        let stamp = std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if stamp.is_some() && stamp == st.file_stamp {
            return;
        }
        let before = st.keys.len();
        match read_file(path) {
            Some((stamp, from_file)) => {
                st.file_stamp = Some(stamp);
                st.file_missing = false;
                st.keys = union(&st.fixed, from_file);
            }
            None => {
                if !st.file_missing {
                    st.file_missing = true;
                    tracing::warn!(
                        target: "mistguard::moderation",
                        path = %path.display(),
                        "moderation key file cannot be read; using the environment's keys only"
                    );
                }
                st.file_stamp = None;
                st.keys = st.fixed.clone();
            }
        }
        let keys = st.keys.clone();
        st.benched.retain(|k, _| keys.contains(k));
        if st.keys.len() != before {
            tracing::info!(
                target: "mistguard::moderation",
                keys = st.keys.len(),
                "moderation keys (re)loaded"
            );
        }
    }

    /// The next usable key, round-robin.
    pub(crate) fn pick(&self) -> Pick {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut st, now);
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
                set_key_gauges(n - st.benched.len(), st.benched.len());
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

    /// Takes a key refused with 401/403 out of the rotation for the cooldown.
    pub(crate) fn bench(&self, key: &ApiKey) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.benched
            .insert(key.clone(), Instant::now() + self.cooldown);
        let n = st.keys.len();
        let b = st.benched.len().min(n);
        set_key_gauges(n - b, b);
        tracing::warn!(
            target: "mistguard::moderation",
            benched = b,
            keys = n,
            "a moderation API key was refused (401/403); benched"
        );
    }

    /// A key was accepted: ends an auth outage.
    pub(crate) fn accepted(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.outage {
            st.outage = false;
            metrics::gauge!("mistguard_moderation_auth_outage").set(0.0);
            tracing::info!(target: "mistguard::alert", "moderation auth outage over: a key was accepted");
        }
    }

    /// (usable now, loaded).
    pub(crate) fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut st, now);
        st.benched.retain(|_, until| *until > now);
        let n = st.keys.len();
        (n - st.benched.len().min(n), n)
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
}
