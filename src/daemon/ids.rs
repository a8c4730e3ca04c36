//! Decision ids and the keyed hash that stands in for a subject everywhere it is kept or logged.

use std::sync::atomic::{AtomicU64, Ordering};

/// 128-bit decision ids: a keyed hash of a counter under a per-process random key, so ids are
/// unique within the process and unguessable across processes, without a syscall per id.
pub struct DecisionIds {
    key: [u8; 32],
    counter: AtomicU64,
}

impl DecisionIds {
    /// # Errors
    /// When the operating system's random source fails.
    pub fn new() -> Result<DecisionIds, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(DecisionIds {
            key,
            counter: AtomicU64::new(0),
        })
    }

    /// The next id, as 32 lower-case hex digits.
    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let hash = blake3::keyed_hash(&self.key, &n.to_le_bytes());
        hex(&hash.as_bytes()[..16])
    }
}

/// The hash of a subject: what escalation state is keyed by and what logs show. The raw subject
/// never leaves the request handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubjectKey(pub [u8; 16]);

impl SubjectKey {
    /// 16 hex digits: enough to follow one subject through the decision records.
    pub fn short(&self) -> String {
        hex(&self.0[..8])
    }

    /// All 32 hex digits: the form kept in decision records, Redis and the review queue.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses [`SubjectKey::hex`]'s form.
    pub fn from_hex(s: &str) -> Option<SubjectKey> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(SubjectKey(out))
    }
}

/// Keyed BLAKE3 of subjects. With a random key (the default) hashes cannot be linked across
/// restarts; an operator who needs that sets `subject_key_file`.
pub struct SubjectHasher {
    key: [u8; 32],
}

impl SubjectHasher {
    /// # Errors
    /// When the operating system's random source fails.
    pub fn random() -> Result<SubjectHasher, getrandom::Error> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)?;
        Ok(SubjectHasher { key })
    }

    /// Derives the key from a secret of at least 32 bytes (a key file's content).
    pub fn from_secret(secret: &[u8]) -> Option<SubjectHasher> {
        (secret.len() >= 32).then(|| SubjectHasher {
            key: blake3::derive_key("mistguard subject hash v1", secret),
        })
    }

    /// A key for another keyed hash (`context` names it), derived from this one: stable across
    /// restarts when the key comes from `subject_key_file`.
    pub fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.key)
    }

    pub fn hash(&self, subject: &str) -> SubjectKey {
        let h = blake3::keyed_hash(&self.key, subject.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.as_bytes()[..16]);
        SubjectKey(out)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_ids_are_distinct_hex() {
        let ids = DecisionIds::new().unwrap();
        let a = ids.next();
        let b = ids.next();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn subject_hash_is_keyed() {
        let h1 = SubjectHasher::from_secret(&[7u8; 32]).unwrap();
        let h2 = SubjectHasher::from_secret(&[8u8; 32]).unwrap();
        assert_eq!(h1.hash("alice"), h1.hash("alice"));
        assert_ne!(h1.hash("alice"), h1.hash("bob"));
        assert_ne!(h1.hash("alice"), h2.hash("alice"));
        assert!(!h1.hash("alice").short().contains("alice"));
        assert!(SubjectHasher::from_secret(b"short").is_none());
    }
}
