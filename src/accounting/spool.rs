//! The durable spool: append-only segment files of checksummed, length-prefixed records.
//!
//! Record: `len: u32 LE | crc32(payload): u32 LE | payload`. A record is acknowledged only after
//! the fsync that covers it (group commit: one fsync for every record appended since the last).
//! Segments: `NNNNNNNNNNNNNNNNNNNN.seg`; a new one is made durable with a directory fsync before
//! it is used; a sealed one is removed only after its records are committed to the database,
//! then the directory is fsynced. On open, a torn tail (an incomplete last record) is truncated;
//! a record whose checksum fails is moved, with the rest of its segment, to a `.corrupt` file and
//! counted — never silently skipped, never a reason to refuse to start. Segments left empty are
//! removed. Opening hands the records to the caller one segment at a time, so the caller decides
//! how many it keeps in memory.
//!
//! The directory is locked (`LOCK`, an advisory `flock`): a second process on the same spool is
//! refused with the path in the message.
//!
//! All I/O goes through `SpoolFs`, so a test filesystem can forget unsynced bytes on a crash or
//! fail an append, an fsync or a rotation on demand (`faults::FaultFs`).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// The filesystem operations the spool needs.
pub trait SpoolFs: Send {
    /// Makes the directory usable again after a failure: forgets open files, recreates the
    /// directory if it disappeared, takes the lock again.
    fn reset(&mut self) -> io::Result<()>;
    fn list(&mut self) -> io::Result<Vec<u64>>;
    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>>;
    fn create(&mut self, seg: u64) -> io::Result<()>;
    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()>;
    fn sync(&mut self, seg: u64) -> io::Result<()>;
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()>;
    fn remove(&mut self, seg: u64) -> io::Result<()>;
    /// Keeps `bytes` of segment `seg` aside, in a file named after the segment and `suffix`
    /// (`corrupt`: damaged data; `unknown`: records of an unknown format version).
    fn quarantine(&mut self, seg: u64, suffix: &str, bytes: &[u8]) -> io::Result<()>;
    fn sync_dir(&mut self) -> io::Result<()>;
    /// Where the spool lives (for messages).
    fn describe(&self) -> String;
}

impl SpoolFs for Box<dyn SpoolFs> {
    fn reset(&mut self) -> io::Result<()> {
        (**self).reset()
    }
    fn list(&mut self) -> io::Result<Vec<u64>> {
        (**self).list()
    }
    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>> {
        (**self).read(seg)
    }
    fn create(&mut self, seg: u64) -> io::Result<()> {
        (**self).create(seg)
    }
    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()> {
        (**self).append(seg, bytes)
    }
    fn sync(&mut self, seg: u64) -> io::Result<()> {
        (**self).sync(seg)
    }
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        (**self).truncate(seg, len)
    }
    fn remove(&mut self, seg: u64) -> io::Result<()> {
        (**self).remove(seg)
    }
    fn quarantine(&mut self, seg: u64, suffix: &str, bytes: &[u8]) -> io::Result<()> {
        (**self).quarantine(seg, suffix, bytes)
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        (**self).sync_dir()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// Segment files in a directory, locked by this process.
pub struct DirFs {
    dir: PathBuf,
    open: BTreeMap<u64, File>,
    lock: Option<File>,
    /// (device, inode) of the directory when it was locked: a directory removed or replaced
    /// under the running relay is noticed at the next fsync instead of acknowledging records
    /// into files nobody will read again.
    identity: (u64, u64),
}

impl DirFs {
    /// Creates the directory if needed and locks it; a spool locked by another process is an
    /// error naming the directory.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let mut fs = Self {
            dir: dir.into(),
            open: BTreeMap::new(),
            lock: None,
            identity: (0, 0),
        };
        fs.lock()?;
        Ok(fs)
    }

    fn lock(&mut self) -> io::Result<()> {
        self.lock = None;
        std::fs::create_dir_all(&self.dir)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("LOCK"))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "spool directory {} is locked by another turnpike process (two relays cannot share a spool)",
                        self.dir.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        self.lock = Some(f);
        self.identity = dir_identity(&self.dir)?;
        Ok(())
    }

    /// Fails when the directory or an open segment file is no longer where the spool looks.
    fn check_in_place(&self, seg: u64, nlink: u64) -> io::Result<()> {
        if nlink == 0 {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("segment {seg} was removed from {}", self.dir.display()),
            ));
        }
        if dir_identity(&self.dir)? != self.identity {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("spool directory {} was replaced", self.dir.display()),
            ));
        }
        Ok(())
    }

    fn path(&self, seg: u64) -> PathBuf {
        self.dir.join(format!("{seg:020}.seg"))
    }

    fn file(&mut self, seg: u64) -> io::Result<&mut File> {
        if !self.open.contains_key(&seg) {
            let f = OpenOptions::new().append(true).open(self.path(seg))?;
            self.open.insert(seg, f);
        }
        self.open
            .get_mut(&seg)
            .ok_or_else(|| io::Error::other("segment not open"))
    }
}

fn dir_identity(dir: &std::path::Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    if !m.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    Ok((m.dev(), m.ino()))
}

impl SpoolFs for DirFs {
    fn reset(&mut self) -> io::Result<()> {
        self.open.clear();
        self.lock()
    }

    fn list(&mut self) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse().ok()) {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        File::open(self.path(seg))?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    fn create(&mut self, seg: u64) -> io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(seg))?;
        self.open.insert(seg, f);
        Ok(())
    }

    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()> {
        self.file(seg)?.write_all(bytes)
    }

    fn sync(&mut self, seg: u64) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let f = self.file(seg)?;
        f.sync_data()?;
        let nlink = f.metadata()?.nlink();
        self.check_in_place(seg, nlink)
    }

    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(self.path(seg))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn remove(&mut self, seg: u64) -> io::Result<()> {
        self.open.remove(&seg);
        match std::fs::remove_file(self.path(seg)) {
            // Gone already (a directory recreated after a failure): nothing left to remove.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn quarantine(&mut self, seg: u64, suffix: &str, bytes: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{seg:020}.{suffix}")))?;
        f.write_all(bytes)?;
        f.sync_all()
    }

    fn sync_dir(&mut self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

const HEADER: usize = 8;

/// One record's bytes on disk.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    // A record over 4 GiB cannot be framed: `MAX_RECORD` bounds it long before.
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// What a segment holds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub records: Vec<Vec<u8>>,
    /// Bytes up to the end of the last good record.
    pub good_len: usize,
    /// An incomplete record at the end (a write cut short by a crash).
    pub torn: bool,
    /// A complete record whose checksum failed: everything from it on is suspect.
    pub corrupt_at: Option<usize>,
}

pub fn decode(bytes: &[u8]) -> Decoded {
    let mut d = Decoded::default();
    let mut at = 0;
    while at < bytes.len() {
        if bytes.len() - at < HEADER {
            d.torn = true;
            break;
        }
        let len = crate::num::len(u64::from(u32::from_le_bytes([
            bytes[at],
            bytes[at + 1],
            bytes[at + 2],
            bytes[at + 3],
        ])));
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let Some(end) = at.checked_add(HEADER + len).filter(|e| *e <= bytes.len()) else {
            d.torn = true;
            break;
        };
        let payload = &bytes[at + HEADER..end];
        if crc32fast::hash(payload) != crc {
            d.corrupt_at = Some(at);
            break;
        }
        d.records.push(payload.to_vec());
        at = end;
        d.good_len = at;
    }
    d
}

/// What opening the spool found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Segments holding records of earlier runs, oldest first, with their record counts.
    pub segments: Vec<(u64, usize)>,
    pub torn_tails: usize,
    pub corrupt_segments: usize,
    /// Segments removed because they held no record.
    pub empty_removed: usize,
}

pub struct Spool<F: SpoolFs> {
    fs: F,
    active: u64,
    /// Bytes appended to the active segment and not yet fsynced.
    dirty: bool,
}

impl<F: SpoolFs> Spool<F> {
    /// A spool over `fs` that has not read its directory yet (`recover` does).
    pub fn new(fs: F) -> Self {
        Self {
            fs,
            active: 0,
            dirty: false,
        }
    }

    /// Opens the spool: recovers every segment (see `recover`), then starts a fresh active one.
    pub fn open(fs: F, visit: &mut dyn FnMut(u64, Vec<Vec<u8>>)) -> io::Result<(Self, Recovered)> {
        let mut spool = Self::new(fs);
        let rec = spool.recover(visit)?;
        Ok((spool, rec))
    }

    /// Reads the directory again (after `SpoolFs::reset`, or at open): damaged tails cut,
    /// corruption quarantined, empty segments removed, each segment's records handed to `visit`
    /// (one segment in memory at a time); then a new active segment, made durable.
    pub fn recover(&mut self, visit: &mut dyn FnMut(u64, Vec<Vec<u8>>)) -> io::Result<Recovered> {
        let fs = &mut self.fs;
        let mut rec = Recovered::default();
        let segs = fs.list()?;
        for &seg in &segs {
            let bytes = fs.read(seg)?;
            let d = decode(&bytes);
            if let Some(at) = d.corrupt_at {
                fs.quarantine(seg, "corrupt", &bytes[at..])?;
                fs.truncate(seg, crate::num::count(at))?;
                rec.corrupt_segments += 1;
            } else if d.torn {
                fs.truncate(seg, crate::num::count(d.good_len))?;
                rec.torn_tails += 1;
            }
            if d.records.is_empty() {
                fs.remove(seg)?;
                rec.empty_removed += 1;
                continue;
            }
            rec.segments.push((seg, d.records.len()));
            visit(seg, d.records);
        }
        self.active = segs.last().map_or(1, |s| s + 1).max(self.active + 1);
        self.dirty = false;
        self.fs.create(self.active)?;
        self.fs.sync_dir()?;
        Ok(rec)
    }

    pub fn active(&self) -> u64 {
        self.active
    }

    /// Appends a record to the active segment (not durable until `sync`).
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        self.fs.append(self.active, &encode(payload))?;
        self.dirty = true;
        Ok(self.active)
    }

    /// Makes every appended record durable. An error here is fatal for the spool's owner.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.dirty {
            self.fs.sync(self.active)?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Seals the active segment (after a sync) and starts the next; returns the sealed one.
    pub fn rotate(&mut self) -> io::Result<u64> {
        self.sync()?;
        let sealed = self.active;
        self.active += 1;
        self.fs.create(self.active)?;
        self.fs.sync_dir()?;
        Ok(sealed)
    }

    /// The records of a sealed segment, read back from disk (for records spilled from memory).
    pub fn read_records(&mut self, seg: u64) -> io::Result<Vec<Vec<u8>>> {
        Ok(decode(&self.fs.read(seg)?).records)
    }

    /// Keeps a record's bytes aside (a record of an unknown format version), framed like a
    /// segment so that a later version can read it back.
    pub fn quarantine(&mut self, seg: u64, suffix: &str, payload: &[u8]) -> io::Result<()> {
        self.fs.quarantine(seg, suffix, &encode(payload))
    }

    pub fn describe(&self) -> String {
        self.fs.describe()
    }

    /// Removes sealed segments whose records are all committed.
    pub fn remove(&mut self, segs: &[u64]) -> io::Result<()> {
        for &s in segs {
            if s != self.active {
                self.fs.remove(s)?;
            }
        }
        self.fs.sync_dir()
    }

    pub fn fs_mut(&mut self) -> &mut F {
        &mut self.fs
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    use super::super::faults::ForgetfulFs;

    /// Opens and collects every recovered record.
    #[allow(clippy::type_complexity)]
    fn open_all<F: SpoolFs>(fs: F) -> (Spool<F>, Recovered, Vec<(u64, Vec<u8>)>) {
        let mut got = Vec::new();
        let (spool, rec) = Spool::open(fs, &mut |seg, recs| {
            got.extend(recs.into_iter().map(|r| (seg, r)))
        })
        .unwrap();
        (spool, rec, got)
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut bytes = encode(b"one");
        bytes.extend(encode(b""));
        bytes.extend(encode(b"three"));
        let d = decode(&bytes);
        assert_eq!(d.records, vec![b"one".to_vec(), vec![], b"three".to_vec()]);
        assert!(!d.torn && d.corrupt_at.is_none());
        assert_eq!(d.good_len, bytes.len());
    }

    #[test]
    fn torn_tail_and_corruption() {
        let mut bytes = encode(b"one");
        let whole = bytes.len();
        bytes.extend(&encode(b"two")[..5]);
        let d = decode(&bytes);
        assert_eq!((d.records.len(), d.torn, d.good_len), (1, true, whole));
        let mut bytes = encode(b"one");
        let mut bad = encode(b"two");
        bad[9] ^= 0xff;
        bytes.extend(bad);
        bytes.extend(encode(b"three"));
        let d = decode(&bytes);
        assert_eq!((d.records.len(), d.corrupt_at), (1, Some(whole)));
    }

    #[test]
    fn open_truncates_torn_tails_and_quarantines_corruption() {
        let mut fs = ForgetfulFs::default();
        let mut good = encode(b"kept-1");
        good.extend(encode(b"kept-2"));
        let mut torn = good.clone();
        torn.extend(&encode(b"half")[..6]);
        fs.durable.insert(1, torn);
        let mut corrupt = encode(b"kept-3");
        let mut bad = encode(b"flipped");
        bad[10] ^= 0x55;
        corrupt.extend(bad);
        corrupt.extend(encode(b"after-the-damage"));
        fs.durable.insert(2, corrupt);
        let (mut spool, rec, got) = open_all(fs);
        let got: Vec<Vec<u8>> = got.into_iter().map(|(_, r)| r).collect();
        assert_eq!(
            got,
            vec![b"kept-1".to_vec(), b"kept-2".to_vec(), b"kept-3".to_vec()]
        );
        assert_eq!((rec.torn_tails, rec.corrupt_segments), (1, 1));
        assert_eq!(
            spool.active(),
            3,
            "a fresh segment after the recovered ones"
        );
        // Both damaged segments were cut back to their good prefix; a second open finds them clean.
        let fs = std::mem::take(spool.fs_mut());
        assert_eq!(fs.durable[&1], good);
        let (_, again, got) = open_all(fs);
        assert_eq!(
            (got.len(), again.torn_tails, again.corrupt_segments),
            (3, 0, 0)
        );
    }

    #[test]
    fn dir_fs_quarantines_to_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = encode(b"ok");
        let mut bad = encode(b"bad");
        bad[8] ^= 1;
        bytes.extend(&bad);
        std::fs::write(dir.path().join(format!("{:020}.seg", 7)), &bytes).unwrap();
        let (mut spool, rec, got) = open_all(DirFs::new(dir.path()).unwrap());
        assert_eq!((got.len(), rec.corrupt_segments), (1, 1));
        let quarantined = std::fs::read(dir.path().join(format!("{:020}.corrupt", 7))).unwrap();
        assert_eq!(quarantined, bad);
        spool.append(b"new").unwrap();
        spool.sync().unwrap();
        // The directory is locked while the spool is open.
        let err = DirFs::new(dir.path())
            .err()
            .expect("a second open is refused");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
        drop(spool);
        let (_, _, got) = open_all(DirFs::new(dir.path()).unwrap());
        let got: Vec<Vec<u8>> = got.into_iter().map(|(_, r)| r).collect();
        assert_eq!(got, vec![b"ok".to_vec(), b"new".to_vec()]);
    }

    #[test]
    fn synced_records_survive_a_crash_and_unsynced_do_not() {
        let fs = ForgetfulFs::default();
        let (mut spool, _, got) = open_all(fs);
        assert!(got.is_empty());
        spool.append(b"a").unwrap();
        spool.append(b"b").unwrap();
        spool.sync().unwrap();
        spool.append(b"c").unwrap(); // never synced
        let mut fs = std::mem::take(spool.fs_mut());
        fs.crash();
        let (_, _, got) = open_all(fs);
        let got: Vec<Vec<u8>> = got.into_iter().map(|(_, r)| r).collect();
        assert_eq!(got, vec![b"a".to_vec(), b"b".to_vec()]);
    }

    #[test]
    fn empty_segments_are_removed_and_reopen_finds_a_recreated_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spool_dir = dir.path().join("spool");
        let (mut spool, _, _) = open_all(DirFs::new(&spool_dir).unwrap());
        spool.append(b"kept").unwrap();
        spool.rotate().unwrap();
        spool.rotate().unwrap(); // an empty sealed segment
        drop(spool);
        let (mut spool, rec, got) = open_all(DirFs::new(&spool_dir).unwrap());
        assert_eq!((got.len(), rec.segments.len()), (1, 1));
        assert!(rec.empty_removed >= 2, "{rec:?}");
        // The directory disappears under the open spool: appends fail, reset recreates it.
        std::fs::remove_dir_all(&spool_dir).unwrap();
        std::fs::write(&spool_dir, b"not a directory").unwrap();
        assert!(spool.append(b"x").and_then(|_| spool.sync()).is_err());
        std::fs::remove_file(&spool_dir).unwrap();
        spool.fs_mut().reset().unwrap();
        let rec = spool.recover(&mut |_, _| {}).unwrap();
        assert!(rec.segments.is_empty());
        spool.append(b"again").unwrap();
        spool.sync().unwrap();
        drop(spool);
        let (_, _, got) = open_all(DirFs::new(&spool_dir).unwrap());
        assert_eq!(
            got.into_iter().map(|(_, r)| r).collect::<Vec<_>>(),
            vec![b"again".to_vec()]
        );
    }

    /// Model test: random appends, syncs, rotations, removals of committed segments and
    /// crashes; after every crash, every acknowledged (synced) record not yet committed is back.
    #[test]
    fn model_no_acknowledged_record_is_lost() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _run in 0..200 {
            let (mut spool, _, _) = open_all(ForgetfulFs::default());
            let mut acked: Vec<(u64, Vec<u8>)> = Vec::new(); // durable, not yet committed
            let mut unacked: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut sealed: Vec<u64> = Vec::new();
            let mut n = 0u32;
            for _step in 0..60 {
                match next() % 6 {
                    0 | 1 => {
                        n += 1;
                        let payload = n.to_le_bytes().to_vec();
                        let seg = spool.append(&payload).unwrap();
                        unacked.push((seg, payload));
                    }
                    2 => {
                        spool.sync().unwrap();
                        acked.append(&mut unacked);
                    }
                    3 => {
                        let s = spool.rotate().unwrap();
                        acked.append(&mut unacked);
                        sealed.push(s);
                    }
                    4 => {
                        // Commit everything in sealed segments, then remove them.
                        spool.remove(&sealed).unwrap();
                        acked.retain(|(s, _)| !sealed.contains(s));
                        sealed.clear();
                    }
                    _ => {
                        let mut fs = std::mem::take(spool.fs_mut());
                        fs.crash();
                        let (s2, _, recovered) = open_all(fs);
                        spool = s2;
                        let got: Vec<Vec<u8>> = recovered.iter().map(|(_, r)| r.clone()).collect();
                        for (_, a) in &acked {
                            assert!(got.contains(a), "acknowledged record {a:?} lost");
                        }
                        // After recovery everything found is pending again, in sealed segments.
                        acked = recovered;
                        unacked.clear();
                        sealed = acked.iter().map(|(s, _)| *s).collect();
                        sealed.dedup();
                    }
                }
            }
        }
    }
}
