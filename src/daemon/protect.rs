//! The protected set (`ProtectText`): keyed hashes of the shingles of the texts callers protect
//! (their system prompts), by id, bounded and expiring. It holds no text and no canary: a canary
//! is recognised by its keyed MAC (`leak::is_canary`), and a protected text only by its hashes.
//! Nothing here is logged.

use super::config::ProtectConfig;
use crate::leak::{LeakKey, Protected};
use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a text was not protected.
#[derive(Debug, PartialEq, Eq)]
pub enum ProtectError {
    /// No words in the text.
    Empty,
    /// `ttl_seconds` above `protect.max_ttl`.
    TtlTooLong(Duration),
    /// The set is full (`protect.max_texts` or `protect.max_bytes`), even after sweeping.
    Full,
    /// The system's random source failed (ids cannot be drawn).
    Random,
}

/// What `ProtectText` answers.
pub struct Protection {
    pub id: String,
    pub canary: Option<String>,
    pub ttl: Duration,
    pub shingles: usize,
}

struct Entry {
    protected: Arc<Protected>,
    expires: Instant,
}

/// The daemon's protected texts.
pub struct ProtectStore {
    entries: DashMap<String, Entry>,
    /// Bytes the entries hold (`Protected::state_bytes`).
    bytes: AtomicUsize,
    config: ProtectConfig,
    key: LeakKey,
}

impl ProtectStore {
    pub fn new(config: ProtectConfig, key: LeakKey) -> ProtectStore {
        ProtectStore {
            entries: DashMap::new(),
            bytes: AtomicUsize::new(0),
            config,
            key,
        }
    }

    /// The key of the shingle hashes and canaries (for the engine's leak search).
    pub fn key(&self) -> &LeakKey {
        &self.key
    }

    /// The longest time to live a caller may ask for.
    pub fn max_ttl(&self) -> Duration {
        self.config.max_ttl
    }

    /// Protected texts held (expired ones not yet swept included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Protects `text` for `ttl` (`None`: the configured default), with a canary if asked.
    ///
    /// # Errors
    /// See [`ProtectError`].
    pub fn protect(
        &self,
        text: &str,
        ttl: Option<Duration>,
        canary: bool,
        now: Instant,
    ) -> Result<Protection, ProtectError> {
        let ttl = match ttl {
            None => self.config.ttl,
            Some(t) if t > self.config.max_ttl => return Err(ProtectError::TtlTooLong(t)),
            Some(t) => t,
        };
        let protected = Protected::new(&self.key, text).ok_or(ProtectError::Empty)?;
        let size = protected.state_bytes();
        if self.entries.len() >= self.config.max_texts
            || self.bytes.load(Ordering::Relaxed) + size > self.config.max_bytes
        {
            self.sweep(now);
            if self.entries.len() >= self.config.max_texts
                || self.bytes.load(Ordering::Relaxed) + size > self.config.max_bytes
            {
                return Err(ProtectError::Full);
            }
        }
        let mut raw = [0u8; 24];
        getrandom::fill(&mut raw).map_err(|_| ProtectError::Random)?;
        let id = hex(&raw[..16]);
        let canary = canary.then(|| {
            let mut nonce = [0u8; 8];
            nonce.copy_from_slice(&raw[16..]);
            crate::leak::canary(&self.key, nonce)
        });
        let shingles = protected.shingles();
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.entries.insert(
            id.clone(),
            Entry {
                protected: Arc::new(protected),
                expires: now + ttl,
            },
        );
        metrics::gauge!("mistguard_protected_texts").set(self.entries.len() as f64);
        Ok(Protection {
            id,
            canary,
            ttl,
            shingles,
        })
    }

    /// The protected text of `id`, unless it expired (then it is removed).
    pub fn get(&self, id: &str, now: Instant) -> Option<Arc<Protected>> {
        let expired = {
            let e = self.entries.get(id)?;
            if e.expires > now {
                return Some(e.protected.clone());
            }
            true
        };
        if expired {
            self.remove_if_expired(id, now);
        }
        None
    }

    /// Removes every expired entry.
    pub fn sweep(&self, now: Instant) {
        let expired: Vec<String> = self
            .entries
            .iter()
            .filter(|e| e.expires <= now)
            .map(|e| e.key().clone())
            .collect();
        for id in expired {
            self.remove_if_expired(&id, now);
        }
        metrics::gauge!("mistguard_protected_texts").set(self.entries.len() as f64);
    }

    fn remove_if_expired(&self, id: &str, now: Instant) {
        if let Some((_, e)) = self.entries.remove_if(id, |_, e| e.expires <= now) {
            self.bytes
                .fetch_sub(e.protected.state_bytes(), Ordering::Relaxed);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max_texts: usize, max_bytes: usize) -> ProtectStore {
        ProtectStore::new(
            ProtectConfig {
                max_texts,
                max_bytes,
                ttl: Duration::from_secs(60),
                max_ttl: Duration::from_secs(600),
            },
            LeakKey::new([3; 32]),
        )
    }

    const PROMPT: &str = "You are the support assistant of Acme. Never reveal the discount \
        code ZEBRA-42 and never discuss the internal roadmap with customers.";

    #[test]
    fn texts_expire_and_the_set_is_bounded() {
        let s = store(2, 1 << 20);
        let t0 = Instant::now();
        let a = s.protect(PROMPT, None, false, t0).unwrap();
        assert_eq!(a.id.len(), 32);
        assert!(a.canary.is_none() && a.shingles > 10);
        let b = s
            .protect(PROMPT, Some(Duration::from_secs(5)), true, t0)
            .unwrap();
        assert_ne!(a.id, b.id);
        let canary = b.canary.unwrap();
        assert!(crate::leak::is_canary(s.key(), &canary), "{canary}");
        // Full: refused, not evicted.
        assert_eq!(
            s.protect(PROMPT, None, false, t0).err(),
            Some(ProtectError::Full)
        );
        assert!(s.get(&a.id, t0).is_some() && s.get(&b.id, t0).is_some());
        // b expires after 5 s: gone, and its room is free again.
        let later = t0 + Duration::from_secs(6);
        assert!(s.get(&b.id, later).is_none());
        assert!(s.get(&a.id, later).is_some());
        assert!(s.protect(PROMPT, None, false, later).is_ok());
        assert_eq!(s.len(), 2);
        assert!(s.get("0123", later).is_none());
    }

    #[test]
    fn bad_requests_are_refused() {
        let s = store(10, 1 << 20);
        let t0 = Instant::now();
        assert_eq!(
            s.protect(" .,; ", None, false, t0).err(),
            Some(ProtectError::Empty)
        );
        assert_eq!(
            s.protect(PROMPT, Some(Duration::from_secs(601)), false, t0)
                .err(),
            Some(ProtectError::TtlTooLong(Duration::from_secs(601)))
        );
        // The byte bound: a text whose hashes do not fit is refused.
        let small = store(10, 64);
        assert_eq!(
            small.protect(PROMPT, None, false, t0).err(),
            Some(ProtectError::Full)
        );
    }
}
