//! Filesystems for fault tests of the spool and of the accounting actor running inside a whole
//! relay: one that forgets unsynced bytes on a crash, and a wrapper that fails appends, fsyncs
//! or segment creation (rotation) on demand. Shipped in the library (not `cfg(test)`) so that
//! integration tests can start a relay over them; `serve` never uses them.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::spool::SpoolFs;

/// A filesystem that keeps synced and unsynced bytes apart and forgets the unsynced ones
/// on `crash` — what a power cut or `kill -9` plus page-cache loss does.
#[derive(Default, Clone)]
pub struct ForgetfulFs {
    pub durable: HashMap<u64, Vec<u8>>,
    pub pending: HashMap<u64, Vec<u8>>,
    /// Segments whose creation is not yet durable (no directory fsync since).
    pub new_segs: Vec<u64>,
}

impl ForgetfulFs {
    pub fn crash(&mut self) {
        self.pending.clear();
        for s in self.new_segs.drain(..) {
            self.durable.remove(&s);
        }
    }

    fn all(&self, seg: u64) -> Vec<u8> {
        let mut b = self.durable.get(&seg).cloned().unwrap_or_default();
        b.extend(self.pending.get(&seg).cloned().unwrap_or_default());
        b
    }
}

impl SpoolFs for ForgetfulFs {
    fn reset(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn list(&mut self) -> io::Result<Vec<u64>> {
        let mut v: Vec<u64> = self.durable.keys().copied().collect();
        v.sort_unstable();
        Ok(v)
    }
    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>> {
        Ok(self.all(seg))
    }
    fn create(&mut self, seg: u64) -> io::Result<()> {
        self.durable.entry(seg).or_default();
        self.new_segs.push(seg);
        Ok(())
    }
    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()> {
        self.pending
            .entry(seg)
            .or_default()
            .extend_from_slice(bytes);
        Ok(())
    }
    fn sync(&mut self, seg: u64) -> io::Result<()> {
        let p = self.pending.remove(&seg).unwrap_or_default();
        self.durable.entry(seg).or_default().extend(p);
        Ok(())
    }
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        let mut b = self.all(seg);
        b.truncate(crate::num::len(len));
        self.pending.remove(&seg);
        self.durable.insert(seg, b);
        Ok(())
    }
    fn remove(&mut self, seg: u64) -> io::Result<()> {
        self.durable.remove(&seg);
        self.pending.remove(&seg);
        Ok(())
    }
    fn quarantine(&mut self, _seg: u64, _suffix: &str, _bytes: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        self.new_segs.clear();
        Ok(())
    }
    fn describe(&self) -> String {
        "memory (forgetful)".into()
    }
}

/// Switches shared between a test and the `FaultFs` it handed to a relay.
#[derive(Debug, Default)]
pub struct Faults {
    pub fail_append: AtomicBool,
    pub fail_sync: AtomicBool,
    /// Segment creation (rotation, reopen) fails.
    pub fail_create: AtomicBool,
    /// Operations refused so far.
    pub injected: AtomicU64,
}

impl Faults {
    pub fn set_all(&self, on: bool) {
        for f in [&self.fail_append, &self.fail_sync, &self.fail_create] {
            f.store(on, Ordering::SeqCst);
        }
    }

    fn check(&self, flag: &AtomicBool, what: &str) -> io::Result<()> {
        if flag.load(Ordering::SeqCst) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::other(format!("injected {what} failure (EIO)")));
        }
        Ok(())
    }
}

/// Wraps a filesystem and fails the operations its `Faults` switch on.
pub struct FaultFs<F> {
    pub inner: F,
    pub faults: Arc<Faults>,
}

impl<F: SpoolFs> SpoolFs for FaultFs<F> {
    fn reset(&mut self) -> io::Result<()> {
        self.faults.check(&self.faults.fail_create, "reopen")?;
        self.inner.reset()
    }
    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.inner.list()
    }
    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>> {
        self.inner.read(seg)
    }
    fn create(&mut self, seg: u64) -> io::Result<()> {
        self.faults
            .check(&self.faults.fail_create, "segment creation")?;
        self.inner.create(seg)
    }
    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()> {
        self.faults.check(&self.faults.fail_append, "append")?;
        self.inner.append(seg, bytes)
    }
    fn sync(&mut self, seg: u64) -> io::Result<()> {
        self.faults.check(&self.faults.fail_sync, "fsync")?;
        self.inner.sync(seg)
    }
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        self.inner.truncate(seg, len)
    }
    fn remove(&mut self, seg: u64) -> io::Result<()> {
        self.inner.remove(seg)
    }
    fn quarantine(&mut self, seg: u64, suffix: &str, bytes: &[u8]) -> io::Result<()> {
        self.inner.quarantine(seg, suffix, bytes)
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        self.inner.sync_dir()
    }
    fn describe(&self) -> String {
        format!("{} (fault injection)", self.inner.describe())
    }
}

/// A `ForgetfulFs` shared between a relay and a test: the test takes a crashed copy (what a
/// power cut would leave on disk) while the relay runs, and starts another relay over it.
#[derive(Clone, Default)]
pub struct SharedFs(pub Arc<std::sync::Mutex<ForgetfulFs>>);

impl SharedFs {
    fn fs(&self) -> std::sync::MutexGuard<'_, ForgetfulFs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What survives a power cut now: synced bytes only.
    pub fn crashed_copy(&self) -> ForgetfulFs {
        let mut copy = self.fs().clone();
        copy.crash();
        copy
    }
}

impl SpoolFs for SharedFs {
    fn reset(&mut self) -> io::Result<()> {
        self.fs().reset()
    }
    fn list(&mut self) -> io::Result<Vec<u64>> {
        self.fs().list()
    }
    fn read(&mut self, seg: u64) -> io::Result<Vec<u8>> {
        self.fs().read(seg)
    }
    fn create(&mut self, seg: u64) -> io::Result<()> {
        self.fs().create(seg)
    }
    fn append(&mut self, seg: u64, bytes: &[u8]) -> io::Result<()> {
        self.fs().append(seg, bytes)
    }
    fn sync(&mut self, seg: u64) -> io::Result<()> {
        self.fs().sync(seg)
    }
    fn truncate(&mut self, seg: u64, len: u64) -> io::Result<()> {
        self.fs().truncate(seg, len)
    }
    fn remove(&mut self, seg: u64) -> io::Result<()> {
        self.fs().remove(seg)
    }
    fn quarantine(&mut self, seg: u64, suffix: &str, bytes: &[u8]) -> io::Result<()> {
        self.fs().quarantine(seg, suffix, bytes)
    }
    fn sync_dir(&mut self) -> io::Result<()> {
        self.fs().sync_dir()
    }
    fn describe(&self) -> String {
        "memory (forgetful, shared)".into()
    }
}
