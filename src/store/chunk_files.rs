//! Accepted audio chunks of running sessions, one append-only file per session beside the
//! SQLite database (`<db>.chunks/<session id>`), deleted when the session ends.
//!
//! They used to be rows of `session_chunks`: each 6.4 KB chunk cost SQLite an overflow page, a
//! leaf and an index page in the WAL plus their checkpoint, about half of the CPU of chunk
//! ingest (`scripts/bench-gateway` S3) and a third of 200 streaming sessions' (S6). A group
//! commit is now one `write(2)` per session in the batch. The durability is SQLite's at the same
//! `synchronous` setting: with `normal` a written chunk survives the process being killed (it is
//! in the kernel's page cache); with `full` each file written is also `fdatasync`ed (and the
//! directory synced when a file was created) before the uploads are answered, so it survives
//! power loss.
//!
//! Record layout (little-endian): `seq` u64, `last` u8, `len` u32, CRC-32 (IEEE) u32 of the
//! preceding 13 bytes and the data, then `len` bytes of data. A reader stops at the first record
//! that is cut short or fails its CRC (a write torn by power loss); the first record of a seq
//! wins, as `INSERT OR IGNORE` did.

use super::{ChunkRecord, StoreError};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

const HEADER: usize = 8 + 1 + 4 + 4;

/// Most chunk files kept open between appends (256 fds, counted in
/// [`crate::fdlimit::needed`]); past it every cached one is closed.
pub const OPEN_FILES: usize = 256;

/// The chunk directory of one database.
#[derive(Debug)]
pub(super) struct ChunkFiles {
    dir: PathBuf,
    /// fdatasync every write (`synchronous=full`).
    sync: bool,
    /// Files open for appending, by session id, so that a session's every chunk does not pay
    /// an `open` and a `close` (at most [`OPEN_FILES`]).
    open: Mutex<HashMap<String, File>>,
}

impl ChunkFiles {
    /// The directory beside `db` (`<db>.chunks`), created if needed.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn open(db: &Path, sync: bool) -> Result<Self, StoreError> {
        let mut name = db.as_os_str().to_owned();
        name.push(".chunks");
        let dir = PathBuf::from(name);
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, &e))?;
        Ok(Self {
            dir,
            sync,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Whether every write is fdatasync'ed (`synchronous=full`); without it an append only
    /// copies into the page cache and never waits for the disk.
    pub fn syncs(&self) -> bool {
        self.sync
    }

    /// The file of session `id`; `None` for an id that is not a plain file name (ids are UUIDs,
    /// so this never happens for a session voxpoll created).
    fn file(&self, id: &str) -> Option<PathBuf> {
        let plain = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        plain.then(|| self.dir.join(id))
    }

    /// Appends `chunks` (any sessions, any order) with one write per session.
    ///
    /// # Errors
    /// A file that cannot be written (disk full, permissions): nothing of the batch may be
    /// acknowledged.
    pub fn append(&self, chunks: &[ChunkRecord]) -> Result<(), StoreError> {
        let mut by_session: BTreeMap<&str, Vec<&ChunkRecord>> = BTreeMap::new();
        for ch in chunks {
            by_session
                .entry(ch.session_id.as_str())
                .or_default()
                .push(ch);
        }
        let mut created = false;
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, recs) in by_session {
            if open.len() >= OPEN_FILES && !open.contains_key(id) {
                open.clear();
            }
            let f = match open.entry(id.to_string()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    // Only a plain name becomes a path (checked once per open, not per write).
                    let path = self
                        .file(id)
                        .ok_or_else(|| StoreError::Io(format!("invalid session id {id:?}")))?;
                    created |= self.sync && !path.exists();
                    e.insert(
                        OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&path)
                            .map_err(|e| io_error(&path, &e))?,
                    )
                }
            };
            let written =
                write_records(f, &recs)
                    .and_then(|()| if self.sync { f.sync_data() } else { Ok(()) });
            if let Err(e) = written {
                // A later append opens the file afresh.
                open.remove(id);
                return Err(io_error(&self.dir.join(id), &e));
            }
        }
        drop(open);
        if created {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io_error(&self.dir, &e))?;
        }
        Ok(())
    }

    /// Session `id`'s chunks, ascending by seq (empty when it has none).
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn read(&self, id: &str) -> Result<Vec<ChunkRecord>, StoreError> {
        let Some(path) = self.file(id) else {
            return Ok(Vec::new());
        };
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(&path, &e)),
        };
        let mut out: BTreeMap<u64, ChunkRecord> = BTreeMap::new();
        for (seq, last, data) in decode(&bytes) {
            out.entry(seq).or_insert_with(|| ChunkRecord {
                session_id: id.to_string(),
                seq,
                last,
                data: bytes::Bytes::copy_from_slice(data),
            });
        }
        Ok(out.into_values().collect())
    }

    /// Closes session `id`'s file if it is kept open.
    fn close(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Deletes session `id`'s chunks (absent already: fine).
    ///
    /// # Errors
    /// The file exists but cannot be removed.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let Some(path) = self.file(id) else {
            return Ok(());
        };
        self.close(id);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(io_error(&path, &e)),
            _ => Ok(()),
        }
    }

    /// Deletes the files of every session not in `running` (ended while a chunk was still
    /// being written, or before a crash let its file be removed) that were last written at
    /// least `min_age` ago (a session created after `running` was read has a fresh file);
    /// returns how many.
    ///
    /// # Errors
    /// The directory cannot be listed.
    pub fn remove_all_but(
        &self,
        running: &[String],
        min_age: std::time::Duration,
    ) -> Result<usize, StoreError> {
        let running: std::collections::HashSet<&str> = running.iter().map(String::as_str).collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, &e))? {
            let entry = entry.map_err(|e| io_error(&self.dir, &e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if running.contains(name.as_str()) {
                continue;
            }
            let old_enough = min_age.is_zero()
                || entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= min_age));
            if !old_enough {
                continue;
            }
            self.close(&name);
            if fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn io_error(path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Io(format!("{}: {e}", path.display()))
}

/// The header of the record of `ch`.
fn header(ch: &ChunkRecord) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..8].copy_from_slice(&ch.seq.to_le_bytes());
    h[8] = u8::from(ch.last);
    h[9..13].copy_from_slice(&(ch.data.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[..13]);
    crc.update(&ch.data);
    h[13..17].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Writes the records of `recs` with one `writev(2)` (headers and the chunks' own bytes, not
/// copied); a short write, rare on a regular file, is finished from one buffer.
fn write_records(f: &mut File, recs: &[&ChunkRecord]) -> std::io::Result<()> {
    let heads: Vec<[u8; HEADER]> = recs.iter().map(|r| header(r)).collect();
    let slices: Vec<IoSlice<'_>> = heads
        .iter()
        .zip(recs)
        .flat_map(|(h, r)| [IoSlice::new(h), IoSlice::new(&r.data)])
        .collect();
    let total: usize = slices.iter().map(|s| s.len()).sum();
    let mut skip = f.write_vectored(&slices)?;
    if skip < total {
        let mut rest = Vec::with_capacity(total - skip);
        for s in &slices {
            let n = skip.min(s.len());
            rest.extend_from_slice(&s[n..]);
            skip -= n;
        }
        f.write_all(&rest)?;
    }
    Ok(())
}

/// The records of a file, (seq, last, data), up to the first one cut short or corrupt.
fn decode(mut bytes: &[u8]) -> Vec<(u64, bool, &[u8])> {
    let mut out = Vec::new();
    while bytes.len() >= HEADER {
        let (head, rest) = bytes.split_at(HEADER);
        let seq = u64::from_le_bytes(head[0..8].try_into().unwrap_or_default());
        let last = head[8] == 1;
        let len = u32::from_le_bytes(head[9..13].try_into().unwrap_or_default()) as usize;
        let want = u32::from_le_bytes(head[13..17].try_into().unwrap_or_default());
        if head[8] > 1 || rest.len() < len {
            break;
        }
        let (data, next) = rest.split_at(len);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head[..13]);
        crc.update(data);
        if crc.finalize() != want {
            break;
        }
        out.push((seq, last, data));
        bytes = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, seq: u64, data: &[u8]) -> ChunkRecord {
        ChunkRecord {
            session_id: id.into(),
            seq,
            last: false,
            data: bytes::Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn chunks_come_back_by_session_in_seq_order_first_write_winning() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("v.db"), false).unwrap();
        files
            .append(&[rec("a", 1, b"a1"), rec("b", 0, b"b0"), rec("a", 0, b"a0")])
            .unwrap();
        let mut last = rec("a", 2, b"");
        last.last = true;
        files
            .append(&[rec("a", 1, b"again"), last.clone()])
            .unwrap();
        let a = files.read("a").unwrap();
        assert_eq!(a, vec![rec("a", 0, b"a0"), rec("a", 1, b"a1"), last]);
        assert_eq!(files.read("b").unwrap(), vec![rec("b", 0, b"b0")]);
        assert_eq!(files.read("none").unwrap(), vec![]);
        files.remove("a").unwrap();
        files.remove("a").unwrap();
        assert_eq!(files.read("a").unwrap(), vec![]);
        // A file written just now is kept by a sweep that wants it a minute old.
        let minute = std::time::Duration::from_secs(60);
        assert_eq!(files.remove_all_but(&[], minute).unwrap(), 0);
        assert_eq!(files.read("b").unwrap().len(), 1);
        assert_eq!(
            files
                .remove_all_but(&[], std::time::Duration::ZERO)
                .unwrap(),
            1
        );
        assert_eq!(files.read("b").unwrap(), vec![]);
    }

    #[test]
    fn a_torn_or_corrupt_tail_ends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("v.db"), true).unwrap();
        files
            .append(&[rec("s", 0, b"zero"), rec("s", 1, b"one")])
            .unwrap();
        let path = files.file("s").unwrap();
        let whole = fs::read(&path).unwrap();
        // Cut inside the second record: the first one stays.
        fs::write(&path, &whole[..whole.len() - 2]).unwrap();
        assert_eq!(files.read("s").unwrap(), vec![rec("s", 0, b"zero")]);
        // A flipped byte in the second record's data fails its CRC.
        let mut bad = whole.clone();
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        fs::write(&path, &bad).unwrap();
        assert_eq!(files.read("s").unwrap(), vec![rec("s", 0, b"zero")]);
        // Zeros where a record should be (a file extended but never written) end it too.
        let mut zeros = whole;
        zeros.extend_from_slice(&[0; 64]);
        fs::write(&path, &zeros).unwrap();
        assert_eq!(files.read("s").unwrap().len(), 2);
    }

    /// A sweep removes whatever else is in the directory too (it only ever holds chunk files),
    /// and counts only what it removed.
    #[test]
    fn a_sweep_removes_stray_names_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("v.db"), false).unwrap();
        let stray = files.dir.join("left.tmp");
        fs::write(&stray, b"x").unwrap();
        files.append(&[rec("keep", 0, b"k")]).unwrap();
        let kept = ["keep".to_string()];
        assert_eq!(
            files
                .remove_all_but(&kept, std::time::Duration::ZERO)
                .unwrap(),
            1
        );
        assert!(!stray.exists());
        assert_eq!(files.read("keep").unwrap().len(), 1);
    }

    /// 600 records are 1,200 slices, more than one `writev` takes (IOV_MAX 1,024): the short
    /// write is finished and every record reads back.
    #[test]
    fn a_batch_longer_than_one_writev_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("v.db"), false).unwrap();
        let batch: Vec<_> = (0..600u64)
            .map(|i| rec("s", i, &i.to_le_bytes().repeat(1 + i as usize % 7)))
            .collect();
        files.append(&batch).unwrap();
        assert_eq!(files.read("s").unwrap(), batch);
    }

    #[test]
    fn only_plain_names_become_files() {
        let dir = tempfile::tempdir().unwrap();
        let files = ChunkFiles::open(&dir.path().join("v.db"), false).unwrap();
        assert!(files.append(&[rec("../escape", 0, b"x")]).is_err());
        assert_eq!(files.read("../escape").unwrap(), vec![]);
        assert!(files.file("0b9c6f1e-4f0e-4c3a-9a57-2d3c1f5e6a7b").is_some());
    }
}
