//! The review queue on disk (`data_dir/state.redb`), so that suspensions and the queue survive a
//! restart of a daemon without Redis. Written only when a subject is suspended or lifted (rare);
//! each change is committed with `Durability::Immediate` before the caller goes on.

use super::ReviewEntry;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use std::path::Path;

const REVIEWS: TableDefinition<&str, &[u8]> = TableDefinition::new("reviews");

/// The file in `data_dir`.
pub const STATE_FILE: &str = "state.redb";

pub struct Disk {
    db: Database,
    path: String,
}

impl Disk {
    /// # Errors
    /// When the file cannot be created or opened (it names the path).
    pub fn open(path: &Path) -> Result<Disk, String> {
        let shown = path.display().to_string();
        let db = Database::create(path).map_err(|e| format!("{shown}: {e}"))?;
        let disk = Disk { db, path: shown };
        // Create the table so reads of a new file work.
        disk.write(|t| {
            let _ = t;
            Ok(())
        })?;
        Ok(disk)
    }

    fn err(&self, e: impl std::fmt::Display) -> String {
        format!("{}: {e}", self.path)
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<'_, &str, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), String> {
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::Immediate);
        {
            let mut t = tx.open_table(REVIEWS).map_err(|e| self.err(e))?;
            f(&mut t).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// Every entry still suspended at `now`; expired ones are deleted.
    pub fn load(&self, now_ms: u64) -> Result<Vec<ReviewEntry>, String> {
        let mut live = Vec::new();
        let mut dead = Vec::new();
        {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(REVIEWS).map_err(|e| self.err(e))?;
            for item in t.iter().map_err(|e| self.err(e))? {
                let (k, v) = item.map_err(|e| self.err(e))?;
                match serde_json::from_slice::<ReviewEntry>(v.value()) {
                    Ok(e) if e.until_unix_ms > now_ms => live.push(e),
                    _ => dead.push(k.value().to_string()),
                }
            }
        }
        if !dead.is_empty() {
            self.write(|t| {
                for k in &dead {
                    t.remove(k.as_str())?;
                }
                Ok(())
            })?;
        }
        Ok(live)
    }

    pub fn put(&self, e: &ReviewEntry) -> Result<(), String> {
        let bytes = serde_json::to_vec(e).map_err(|x| self.err(x))?;
        self.write(|t| {
            t.insert(e.subject.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn remove(&self, subject: &str) -> Result<(), String> {
        self.write(|t| {
            t.remove(subject)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let e = |s: &str, until| ReviewEntry {
            subject: s.into(),
            rules: vec![("RULE-MIST-001".into(), 3)],
            suspended_unix_ms: 1,
            until_unix_ms: until,
            record_ids: vec!["a".into()],
        };
        {
            let d = Disk::open(&path).unwrap();
            d.put(&e("aa", 100)).unwrap();
            d.put(&e("bb", 10)).unwrap();
            d.put(&e("cc", 100)).unwrap();
            d.remove("cc").unwrap();
        }
        let d = Disk::open(&path).unwrap();
        assert_eq!(d.load(50).unwrap(), [e("aa", 100)]);
        // The expired one was deleted.
        assert_eq!(d.load(0).unwrap(), [e("aa", 100)]);
    }
}
