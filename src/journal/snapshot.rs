//! The journal on disk: the snapshot file and the seq lease, in `journal.state_dir`.
//!
//! # `journal.snap` — the snapshot
//!
//! Written whole, streamed (never a second copy of the journal in memory), atomically:
//! `journal.snap.tmp` is written and `fsync`ed, renamed over `journal.snap`, and the
//! directory is `fsync`ed. A reader therefore sees the previous snapshot or the new one,
//! never a mix.
//!
//! ```text
//! file    = header record*
//! header  = magic "ASBGWJNL" (8 bytes) · version u32 LE (= VERSION)
//! record  = length u32 LE · crc32 u32 LE · kind u8 · payload
//!           length = bytes of kind + payload, at most the reader's limit
//!           crc32  = CRC-32 (IEEE) of kind + payload
//! kinds   = 1 Meta   (first record, exactly once; postcard of [`Meta`])
//!           2 Event  (payload: pinned u8 (0/1) · the event's postcard frame as stored
//!                     in the journal, `Frame::Event` of `event.rs` — the canonical
//!                     form; the JSON frame is re-created from it), oldest first
//!           3 Dedup  (postcard of [`DedupRecord`]), oldest first
//!           5 Last   (payload: the postcard frame of a last-value entry the journal no
//!                     longer holds, as for Event), oldest first, before the events;
//!                     written since the last-value table exists, absent in older files
//!           0xFF End (postcard of u64: the number of records before it; last record)
//! ```
//!
//! Units: seqs are journal seqs (u64), times are milliseconds since the Unix epoch.
//! A file that does not end with a valid `End` record is truncated; any failed check is
//! a [`SnapshotError`] that names it. Nothing in a snapshot is trusted before its
//! checksum: lengths are bounded before anything is allocated.
//!
//! # `journal.lease` — the seq lease
//!
//! `header · record(kind 4 Lease: postcard of [`Lease`]) · record(End)`, written the same
//! way. It says "no seq at or above `reserved_until` was issued in `epoch`". The daemon
//! writes it before it issues seqs beyond the previous bound (and at start), so after a
//! crash the next seq is `reserved_until` and the seqs between the last snapshot's
//! `next_seq` and it are *lost*: never issued again, reported to panels as a gap with
//! reason `lost`. After a graceful stop the lease equals the snapshot's `next_seq`:
//! nothing is lost.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The first bytes of every file written here.
pub const MAGIC: &[u8; 8] = b"ASBGWJNL";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// The snapshot's file name in the state directory.
pub const SNAPSHOT_FILE: &str = "journal.snap";
/// The lease's file name in the state directory.
pub const LEASE_FILE: &str = "journal.lease";
/// Buffer of the streaming reader and writer (the budget counts it).
pub const IO_BUFFER: usize = 64 << 10;
/// Largest Meta or Dedup record accepted (Meta lists subscriptions and lost ranges).
const SMALL_RECORD_MAX: usize = 64 << 10;

const KIND_META: u8 = 1;
const KIND_EVENT: u8 = 2;
const KIND_DEDUP: u8 = 3;
const KIND_LEASE: u8 = 4;
const KIND_LAST: u8 = 5;
const KIND_END: u8 = 0xFF;

/// Why a snapshot or lease could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the file is empty")]
    Empty,
    #[error("not a journal snapshot (bad magic)")]
    BadMagic,
    #[error("written by format version {0}, this build reads version {VERSION}")]
    Version(u32),
    #[error("truncated: {0}")]
    Truncated(&'static str),
    #[error("checksum mismatch in record {record}")]
    Checksum { record: u64 },
    #[error("record {record} claims {len} bytes, more than the {limit} allowed")]
    TooLong {
        record: u64,
        len: usize,
        limit: usize,
    },
    #[error("malformed record {record}: {reason}")]
    Malformed { record: u64, reason: String },
}

impl SnapshotError {
    fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
        move |source| SnapshotError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The first record of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub epoch: String,
    /// The seq the next event would have had.
    pub next_seq: u64,
    /// Written at a graceful stop (false: a periodic checkpoint).
    pub clean: bool,
    /// When it was written (ms since the Unix epoch).
    pub written_at_ms: u64,
    /// Ranges of seqs lost in earlier crashes (`from..=to`) that still matter.
    pub lost: Vec<(u64, u64)>,
    /// Source addresses the [`DedupRecord::subscription`] indexes refer to.
    pub subscriptions: Vec<String>,
}

/// One entry of the source's duplicate-suppression window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupRecord {
    /// Index into [`Meta::subscriptions`].
    pub subscription: u32,
    /// The broker's sequence number.
    pub asb_seq: i64,
    /// Fingerprint of message-id and enqueued time (stable across builds).
    pub fingerprint: u64,
    /// The journal seq the message was appended as.
    pub seq: u64,
}

/// The seq lease of `journal.lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: String,
    /// No seq at or above this was issued.
    pub reserved_until: u64,
}

/// Paths in the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StateDir { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self) -> PathBuf {
        self.dir.join(SNAPSHOT_FILE)
    }

    pub fn lease(&self) -> PathBuf {
        self.dir.join(LEASE_FILE)
    }

    /// Move a damaged file aside to `NAME.corrupt-<unix seconds>`; returns the new path.
    pub fn move_aside(&self, path: &Path) -> Result<PathBuf, SnapshotError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut to = self.dir.join(format!("{name}.corrupt-{now}"));
        let mut n = 1;
        while to.symlink_metadata().is_ok() {
            to = self.dir.join(format!("{name}.corrupt-{now}.{n}"));
            n += 1;
        }
        std::fs::rename(path, &to).map_err(SnapshotError::io("move aside", path))?;
        Ok(to)
    }
}

/// Streams records into `NAME.tmp`; [`Writer::commit`] makes it `NAME` atomically.
pub struct Writer {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    records: u64,
    bytes: u64,
}

impl Writer {
    /// Start writing `path` (through `path.tmp`).
    pub fn create(path: &Path) -> Result<Self, SnapshotError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(SnapshotError::io("create", &tmp))?;
        let mut w = Writer {
            out: BufWriter::with_capacity(IO_BUFFER, file),
            tmp,
            path: path.to_path_buf(),
            records: 0,
            bytes: 0,
        };
        let mut header = [0u8; 12];
        header[..8].copy_from_slice(MAGIC);
        header[8..].copy_from_slice(&VERSION.to_le_bytes());
        w.put(&header)?;
        Ok(w)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), SnapshotError> {
        self.bytes += b.len() as u64;
        self.out
            .write_all(b)
            .map_err(SnapshotError::io("write", &self.tmp))
    }

    /// One record: `kind` and the payload given in parts (no concatenation copy).
    fn record(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), SnapshotError> {
        let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        for p in parts {
            crc.update(p);
        }
        let len = u32::try_from(len).map_err(|_| SnapshotError::TooLong {
            record: self.records,
            len,
            limit: u32::MAX as usize,
        })?;
        let mut head = [0u8; 9];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..8].copy_from_slice(&crc.finalize().to_le_bytes());
        head[8] = kind;
        self.put(&head)?;
        for p in parts {
            self.put(p)?;
        }
        self.records += 1;
        Ok(())
    }

    fn postcard<T: Serialize>(&mut self, kind: u8, v: &T) -> Result<(), SnapshotError> {
        let bytes = postcard::to_stdvec(v).map_err(|e| SnapshotError::Malformed {
            record: self.records,
            reason: e.to_string(),
        })?;
        self.record(kind, &[&bytes])
    }

    pub fn meta(&mut self, m: &Meta) -> Result<(), SnapshotError> {
        self.postcard(KIND_META, m)
    }

    /// One event: its postcard frame as stored in the journal.
    pub fn event(&mut self, pinned: bool, postcard_frame: &[u8]) -> Result<(), SnapshotError> {
        self.record(KIND_EVENT, &[&[u8::from(pinned)], postcard_frame])
    }

    /// One last-value entry the journal no longer holds: its postcard frame.
    pub fn last_value(&mut self, postcard_frame: &[u8]) -> Result<(), SnapshotError> {
        self.record(KIND_LAST, &[postcard_frame])
    }

    pub fn dedup(&mut self, d: &DedupRecord) -> Result<(), SnapshotError> {
        self.postcard(KIND_DEDUP, d)
    }

    pub fn lease(&mut self, l: &Lease) -> Result<(), SnapshotError> {
        self.postcard(KIND_LEASE, l)
    }

    /// End the file, `fsync` it, rename it into place and `fsync` the directory.
    /// Returns the bytes written. On error the temporary file is removed.
    pub fn commit(mut self) -> Result<u64, SnapshotError> {
        let r = self.finish();
        if r.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        r
    }

    fn finish(&mut self) -> Result<u64, SnapshotError> {
        let records = self.records;
        self.postcard(KIND_END, &records)?;
        self.out
            .flush()
            .map_err(SnapshotError::io("write", &self.tmp))?;
        self.out
            .get_ref()
            .sync_all()
            .map_err(SnapshotError::io("fsync", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(SnapshotError::io("rename", &self.tmp))?;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(SnapshotError::io("fsync", dir))?;
        }
        Ok(self.bytes)
    }
}

/// What a [`Reader`] yields.
#[derive(Debug)]
pub enum Record {
    Meta(Meta),
    /// `pinned` and the event's postcard frame (its own allocation, no copy made).
    Event {
        pinned: bool,
        frame: bytes::Bytes,
    },
    Dedup(DedupRecord),
    Lease(Lease),
    /// A last-value entry's postcard frame (its own allocation).
    LastValue(bytes::Bytes),
}

/// Streams the records of a snapshot or lease file, checking each before yielding it.
pub struct Reader {
    input: BufReader<File>,
    path: PathBuf,
    /// Largest Event record accepted.
    event_max: usize,
    records: u64,
    ended: bool,
}

impl Reader {
    /// Open `path` and check its header. `Ok(None)`: there is no file.
    /// `event_max` bounds an Event record (the journal's largest entry).
    pub fn open(path: &Path, event_max: usize) -> Result<Option<Self>, SnapshotError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(SnapshotError::io("open", path)(e)),
        };
        let mut r = Reader {
            input: BufReader::with_capacity(IO_BUFFER, file),
            path: path.to_path_buf(),
            event_max,
            records: 0,
            ended: false,
        };
        let mut header = [0u8; 12];
        let n = r.fill(&mut header)?;
        if n == 0 {
            return Err(SnapshotError::Empty);
        }
        if n < 8 || &header[..8] != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        if n < 12 {
            return Err(SnapshotError::Truncated("in the header"));
        }
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        Ok(Some(r))
    }

    /// Read as many bytes as there are, up to `buf.len()`.
    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, SnapshotError> {
        let mut n = 0;
        while n < buf.len() {
            match self.input.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SnapshotError::io("read", &self.path)(e)),
            }
        }
        Ok(n)
    }

    fn malformed(&self, reason: impl ToString) -> SnapshotError {
        SnapshotError::Malformed {
            record: self.records,
            reason: reason.to_string(),
        }
    }

    /// The next record; `Ok(None)` after a valid End record (which must be last).
    pub fn next_record(&mut self) -> Result<Option<Record>, SnapshotError> {
        if self.ended {
            return Ok(None);
        }
        let mut head = [0u8; 9];
        match self.fill(&mut head)? {
            9 => {}
            _ => return Err(SnapshotError::Truncated("no end record")),
        }
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default());
        let kind = head[8];
        let limit = match kind {
            KIND_EVENT => self.event_max + 1 + 1,
            KIND_LAST => self.event_max + 1,
            _ => SMALL_RECORD_MAX,
        };
        if len == 0 || len > limit {
            return Err(SnapshotError::TooLong {
                record: self.records,
                len,
                limit,
            });
        }
        let mut payload = vec![0u8; len - 1];
        if self.fill(&mut payload)? != payload.len() {
            return Err(SnapshotError::Truncated("in a record"));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&[kind]);
        h.update(&payload);
        if h.finalize() != crc {
            return Err(SnapshotError::Checksum {
                record: self.records,
            });
        }
        let record = match kind {
            KIND_META => Record::Meta(self.decode(&payload)?),
            KIND_EVENT => {
                let pinned = match payload.first() {
                    Some(0) => false,
                    Some(1) => true,
                    _ => return Err(self.malformed("bad pinned flag")),
                };
                let frame = bytes::Bytes::from(payload).slice(1..);
                Record::Event { pinned, frame }
            }
            KIND_DEDUP => Record::Dedup(self.decode(&payload)?),
            KIND_LAST => Record::LastValue(bytes::Bytes::from(payload)),
            KIND_LEASE => Record::Lease(self.decode(&payload)?),
            KIND_END => {
                let count: u64 = self.decode(&payload)?;
                if count != self.records {
                    return Err(self.malformed(format!(
                        "end record counts {count} records, the file has {}",
                        self.records
                    )));
                }
                let mut extra = [0u8; 1];
                if self.fill(&mut extra)? != 0 {
                    return Err(self.malformed("bytes after the end record"));
                }
                self.ended = true;
                return Ok(None);
            }
            k => return Err(self.malformed(format!("unknown kind {k}"))),
        };
        self.records += 1;
        Ok(Some(record))
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, b: &[u8]) -> Result<T, SnapshotError> {
        postcard::from_bytes(b).map_err(|e| self.malformed(e))
    }
}

/// Write the lease file atomically.
pub fn write_lease(path: &Path, lease: &Lease) -> Result<u64, SnapshotError> {
    let mut w = Writer::create(path)?;
    w.lease(lease)?;
    w.commit()
}

/// Read the lease file. `Ok(None)`: there is none.
pub fn read_lease(path: &Path) -> Result<Option<Lease>, SnapshotError> {
    let Some(mut r) = Reader::open(path, 0)? else {
        return Ok(None);
    };
    let lease = match r.next_record()? {
        Some(Record::Lease(l)) => l,
        _ => return Err(r.malformed("not a lease")),
    };
    match r.next_record()? {
        None => Ok(Some(lease)),
        Some(_) => Err(r.malformed("more than a lease")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "asbgw-snap-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample(path: &Path) -> u64 {
        let mut w = Writer::create(path).unwrap();
        w.meta(&Meta {
            epoch: "e1".into(),
            next_seq: 3,
            clean: true,
            written_at_ms: 1,
            lost: vec![(10, 20)],
            subscriptions: vec!["t/Subscriptions/s".into()],
        })
        .unwrap();
        w.event(true, b"frame-1").unwrap();
        w.event(false, b"frame-2").unwrap();
        w.dedup(&DedupRecord {
            subscription: 0,
            asb_seq: 7,
            fingerprint: 9,
            seq: 2,
        })
        .unwrap();
        w.commit().unwrap()
    }

    fn read_all(path: &Path) -> Result<Vec<Record>, SnapshotError> {
        let mut r = Reader::open(path, 1024)?.expect("file exists");
        let mut v = Vec::new();
        while let Some(rec) = r.next_record()? {
            v.push(rec);
        }
        Ok(v)
    }

    #[test]
    fn roundtrip_and_atomic_replace() {
        let d = tmpdir("rt");
        let p = d.join(SNAPSHOT_FILE);
        let bytes = sample(&p);
        assert_eq!(bytes, std::fs::metadata(&p).unwrap().len());
        assert!(!d.join("journal.snap.tmp").exists());
        let recs = read_all(&p).unwrap();
        assert_eq!(recs.len(), 4);
        assert!(matches!(&recs[0], Record::Meta(m) if m.next_seq == 3 && m.lost == vec![(10, 20)]));
        assert!(
            matches!(&recs[1], Record::Event { pinned: true, frame } if &frame[..] == b"frame-1")
        );
        assert!(matches!(&recs[3], Record::Dedup(d) if d.asb_seq == 7));
        assert!(Reader::open(&d.join("none"), 10).unwrap().is_none());
        let l = Lease {
            epoch: "e".into(),
            reserved_until: 99,
        };
        write_lease(&d.join(LEASE_FILE), &l).unwrap();
        assert_eq!(read_lease(&d.join(LEASE_FILE)).unwrap(), Some(l));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let d = tmpdir("dmg");
        let p = d.join(SNAPSHOT_FILE);
        sample(&p);
        let good = std::fs::read(&p).unwrap();
        let check = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            read_all(&p).unwrap_err()
        };
        assert!(matches!(check(&[]), SnapshotError::Empty));
        assert!(matches!(check(b"NOTASNAPSHOT"), SnapshotError::BadMagic));
        let mut v = good.clone();
        v[8] = 2;
        assert!(matches!(check(&v), SnapshotError::Version(2)));
        // every truncation and every single bit flip is detected
        for cut in 1..good.len() {
            let e = check(&good[..cut]);
            assert!(
                matches!(
                    e,
                    SnapshotError::Truncated(_)
                        | SnapshotError::BadMagic
                        | SnapshotError::TooLong { .. }
                ),
                "cut {cut}: {e}"
            );
        }
        for bit in 0..good.len() * 8 {
            let mut v = good.clone();
            v[bit / 8] ^= 1 << (bit % 8);
            assert!(read_all_bytes(&p, &v).is_err(), "bit {bit} undetected");
        }
        let mut v = good.clone();
        v.push(0);
        assert!(matches!(check(&v), SnapshotError::Malformed { .. }));
        std::fs::remove_file(&p).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(matches!(read_all(&p), Err(SnapshotError::Io { .. })));
        std::fs::remove_dir_all(d).unwrap();
    }

    fn read_all_bytes(p: &Path, b: &[u8]) -> Result<Vec<Record>, SnapshotError> {
        std::fs::write(p, b).unwrap();
        read_all(p)
    }

    #[test]
    fn write_errors_are_errors_and_leave_no_temp_file() {
        let d = tmpdir("ro");
        // the target is a directory that cannot be replaced by a file
        let p = d.join(SNAPSHOT_FILE);
        std::fs::create_dir(&p).unwrap();
        std::fs::write(p.join("x"), b"x").unwrap();
        let mut w = Writer::create(&p).unwrap();
        w.event(false, b"e").unwrap();
        assert!(matches!(
            w.commit(),
            Err(SnapshotError::Io { op: "rename", .. })
        ));
        assert!(!d.join("journal.snap.tmp").exists());
        assert!(Writer::create(&d.join("missing/dir/journal.snap")).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
