//! Spare byte buffers, per thread (docs/DESIGN.md#spare-buffers).
//!
//! A session holds no buffer while it waits: the upstream socket's read buffer and the client's
//! outgoing buffer exist only while they hold bytes. At 500 events a second every event then
//! began with an allocation on each side (and `bytes`' shared header on the read side). Here an
//! emptied buffer goes to its thread's spares instead, and the next read or frame on that thread
//! takes it: at most `KEEP` buffers of `CHUNK` bytes a thread, whatever the number of sessions.
//! A buffer that grew past `CHUNK` (a frame larger than that) is never kept.

use std::cell::RefCell;

use bytes::BytesMut;

/// The size of a spare buffer: a few events, not a whole turn.
pub const CHUNK: usize = 4096;

/// Spares kept per thread.
const KEEP: usize = 16;

thread_local! {
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer held only while it holds bytes: taken from the thread's spares when written to,
/// given back once emptied (unless it grew past `CHUNK`). The one way both the upstream read
/// buffer and the client's outgoing buffer use the spares.
#[derive(Default)]
pub struct Held {
    buf: BytesMut,
    /// `buf` grew past `CHUNK`: not a spare when emptied.
    grown: bool,
}

impl Held {
    /// Holds `buf` (bytes read before the buffer was ours, say).
    pub fn new(buf: BytesMut) -> Self {
        Self {
            grown: grew(&buf),
            buf,
        }
    }

    /// The bytes held (none allocated if none are).
    pub fn bytes(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Writes into the buffer (a spare if none is held) and notes whether it grew.
    pub fn write<T>(&mut self, f: impl FnOnce(&mut BytesMut) -> T) -> T {
        if self.buf.capacity() == 0 {
            self.buf = take();
        }
        let out = f(&mut self.buf);
        self.grown |= grew(&self.buf);
        out
    }

    /// Gives the buffer back to the spares if it is empty.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() {
            give(
                std::mem::take(&mut self.buf),
                std::mem::take(&mut self.grown),
            );
        }
    }

    /// Everything held, as one chunk; the emptied buffer goes back.
    pub fn split(&mut self) -> bytes::Bytes {
        let chunk = self.buf.split().freeze();
        self.release_if_empty();
        chunk
    }
}

/// A buffer to read or encode into: one of the thread's spares, else a new one of `CHUNK` bytes.
/// A spare's bytes may still back a frame in flight; `BytesMut` then writes only past them, or
/// allocates when it needs more room.
fn take() -> BytesMut {
    SPARE
        .try_with(|s| s.borrow_mut().pop())
        .ok()
        .flatten()
        .unwrap_or_else(|| BytesMut::with_capacity(CHUNK))
}

/// Gives an emptied buffer back; one that grew past `CHUNK` (`grown`), still holds bytes, or
/// finds the spares full is dropped.
fn give(buf: BytesMut, grown: bool) {
    if grown || !buf.is_empty() {
        return;
    }
    // At thread exit the spares may be gone already: the buffer is dropped then.
    let _ = SPARE.try_with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < KEEP {
            s.push(buf);
        }
    });
}

/// Whether `buf`'s allocation may now be larger than `CHUNK` (checked right after writing into
/// it: a reserve that grew it left it at the start of its new allocation).
fn grew(buf: &BytesMut) -> bool {
    buf.capacity() > CHUNK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emptied_buffer_is_reused_and_a_grown_one_is_not() {
        let mut a = take();
        let base = a.as_ptr();
        a.extend_from_slice(b"event");
        let frame = a.split().freeze();
        give(a, false);
        drop(frame);
        // The next buffer of this thread is the same allocation, whole again.
        let mut b = take();
        b.reserve(CHUNK);
        assert_eq!(b.as_ptr(), base);
        assert!(!grew(&b));
        b.extend_from_slice(&[0; CHUNK + 1]);
        assert!(grew(&b));
        b.clear();
        give(b, true);
        let c = take();
        assert_eq!(c.capacity(), CHUNK, "a new buffer, not the grown one");
        // A buffer that still holds bytes is not a spare.
        let mut d = take();
        d.extend_from_slice(b"x");
        give(d, false);
        assert_eq!(take().len(), 0);
    }

    #[test]
    fn a_held_buffer_exists_only_while_it_holds_bytes() {
        let mut h = Held::default();
        assert_eq!(h.bytes().capacity(), 0);
        h.write(|b| b.extend_from_slice(b"frame"));
        assert_eq!(h.split().as_ref(), b"frame");
        assert_eq!(h.bytes().capacity(), 0, "emptied: back to the spares");
        // Grown past a spare's size: dropped, not kept.
        h.write(|b| b.extend_from_slice(&[0; CHUNK + 1]));
        let _ = h.split();
        assert_eq!(take().capacity(), CHUNK);
    }

    #[test]
    fn the_spares_are_bounded() {
        let bufs: Vec<_> = (0..KEEP + 5)
            .map(|_| BytesMut::with_capacity(CHUNK))
            .collect();
        for b in bufs {
            give(b, false);
        }
        assert_eq!(SPARE.with(|s| s.borrow().len()), KEEP);
    }
}
