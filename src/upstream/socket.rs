//! The upstream WebSocket's bytes, with buffers sized to what is in flight.
//!
//! awc hands over a `Framed` transport that keeps an 8 KiB read buffer and an 8 KiB write buffer
//! for the life of the connection; pooled connections spend most of their life idle, so here a
//! buffer exists only while it holds bytes: the read buffer is dropped whenever everything read
//! was decoded, the write buffer once it is flushed. The socket is shared by a reader (a stream
//! of the connection actor) and a writer (flushed by a future the actor spawns), never polled by
//! both at once: one thread, one actor.
//!
//! Direct reads (docs/DESIGN.md#direct-reads): a lessee on the connection's own thread may read
//! the socket itself (`attach`), so an event reaches the session without a hop through the
//! connection actor. It takes only text frames; anything else (a ping, a pong, a close, an error,
//! the end) it hands to the connection actor's reader, which handles it as before and hands the
//! socket back (`Writer::resume_direct`). A new lease, a lost connection or the lessee dropping
//! its reader ends it. One side reads at a time: the lessee while attached and not handed, the
//! connection actor otherwise.

use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::Instant;

use actix_codec::{Decoder, Encoder};
use actix_web::web::{Buf, BytesMut};
use awc::BoxedSocket;
use awc::error::WsProtocolError;
use awc::ws::{Codec, Frame, Message};
use bytestring::ByteString;
use futures_util::Stream;
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

use super::dial::Socket;

use crate::buffers;

struct Shared {
    io: BoxedSocket,
    codec: Codec,
    rbuf: buffers::Held,
    wbuf: BytesMut,
    eof: bool,
    conn: u64,
    /// When bytes last arrived (the liveness probe's clock).
    heard: Instant,
    /// The lease the connection's frames belong to (set by the connection actor).
    lease: Option<u64>,
    /// A lessee reading the socket itself.
    direct: Option<Direct>,
    attachments: u64,
    /// The connection actor's task, as of its reader's last poll: a lessee handing the socket
    /// over wakes it (kept from before any attachment, so the first handover is never lost).
    conn_waker: Option<Waker>,
}

struct Direct {
    /// Which attachment this is: a reader of an earlier one has ended.
    generation: u64,
    /// The connection actor reads until it hands the socket back.
    handed: bool,
    /// What the lessee handed over (none: the end of the stream).
    handoff: Option<Result<Frame, WsProtocolError>>,
    lessee_waker: Option<Waker>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(lease) = self.lease {
            // At thread exit the registry may be gone already: nothing to forget then.
            let _ = LEASED.try_with(|m| m.borrow_mut().remove(&lease));
        }
    }
}

thread_local! {
    /// This thread's leased upstream sockets by lease number (unique in the process: the
    /// pools' connection numbers are not), for `attach`.
    static LEASED: RefCell<HashMap<u64, Weak<RefCell<Shared>>>> = RefCell::new(HashMap::new());
}

impl Shared {
    /// The next frame, reading more when what was read holds none; `None` at the end of the
    /// stream. Whichever side reads (the connection actor or its lessee) reads through this.
    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, WsProtocolError>>> {
        loop {
            let rbuf = self.rbuf.bytes();
            if !rbuf.is_empty() {
                match self.codec.decode(rbuf) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            if self.eof {
                return Poll::Ready(None);
            }
            let io = Pin::new(&mut self.io);
            let read = self.rbuf.write(|b| {
                if b.capacity() - b.len() < buffers::CHUNK / 4 {
                    b.reserve(buffers::CHUNK);
                }
                poll_read_buf(io, cx, b)
            });
            match read {
                Poll::Pending => {
                    // Idle: no buffer held until the next bytes arrive (docs/DESIGN.md#spare-buffers).
                    self.rbuf.release_if_empty();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(_)) => self.heard = Instant::now(),
            }
        }
    }

    /// Ends a lessee's direct reads: it sees the end of its stream, the connection actor reads.
    fn end_direct(&mut self) {
        if let Some(d) = self.direct.take() {
            wake(d.lessee_waker);
            self.wake_conn();
        }
    }

    fn wake_conn(&self) {
        if let Some(w) = &self.conn_waker {
            w.wake_by_ref();
        }
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// Frames from the upstream.
pub struct Reader(Rc<RefCell<Shared>>);

/// Frames to the upstream: encoded at once, written by `flush`.
#[derive(Clone)]
pub struct Writer(Rc<RefCell<Shared>>);

/// Splits awc's transport of connection `conn`, keeping whatever it had read past the handshake.
pub fn split(conn: u64, socket: Socket) -> (Reader, Writer) {
    let parts = socket.into_parts();
    let mut wbuf = parts.write_buf;
    if wbuf.is_empty() {
        wbuf = BytesMut::new();
    }
    let shared = Rc::new(RefCell::new(Shared {
        io: parts.io,
        codec: parts.codec,
        rbuf: buffers::Held::new(parts.read_buf),
        wbuf,
        eof: false,
        conn,
        heard: Instant::now(),
        lease: None,
        direct: None,
        attachments: 0,
        conn_waker: None,
    }));
    (Reader(shared.clone()), Writer(shared))
}

impl Stream for Reader {
    type Item = Result<Frame, WsProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        if !s
            .conn_waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            s.conn_waker = Some(cx.waker().clone());
        }
        if let Some(d) = s.direct.as_mut() {
            if let Some(item) = d.handoff.take() {
                return Poll::Ready(Some(item));
            }
            if !d.handed {
                // The lessee reads.
                return Poll::Pending;
            }
        }
        s.next_frame(cx)
    }
}

/// A lessee's direct reads of its connection: the text frames, each with the connection's
/// number. Ends when the lease does (or the connection actor takes the socket back for good).
pub struct DirectReader {
    shared: Rc<RefCell<Shared>>,
    generation: u64,
}

/// Reads lease `lease`'s frames directly, if its connection runs on this thread and the lease
/// is the connection's current one.
pub fn attach(lease: u64) -> Option<DirectReader> {
    let shared = LEASED.with(|m| m.borrow().get(&lease).and_then(Weak::upgrade))?;
    let generation = {
        let mut s = shared.borrow_mut();
        if s.lease != Some(lease) || s.eof {
            return None;
        }
        s.end_direct();
        s.attachments += 1;
        let generation = s.attachments;
        s.direct = Some(Direct {
            generation,
            handed: false,
            handoff: None,
            lessee_waker: None,
        });
        generation
    };
    Some(DirectReader { shared, generation })
}

impl Stream for DirectReader {
    type Item = (u64, ByteString);

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut guard = self.shared.borrow_mut();
        let s = &mut *guard;
        match s.direct.as_mut() {
            Some(d) if d.generation == self.generation => {
                if d.handed {
                    d.lessee_waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            _ => return Poll::Ready(None),
        }
        // Text is the lessee's; anything else (or the end) the connection actor handles.
        let handoff = match ready!(s.next_frame(cx)) {
            Some(Ok(Frame::Text(bytes))) => match ByteString::try_from(bytes) {
                Ok(text) => return Poll::Ready(Some((s.conn, text))),
                Err(_) => Some(Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "invalid UTF-8 text frame",
                )
                .into())),
            },
            other => other,
        };
        if let Some(d) = s.direct.as_mut() {
            d.handed = true;
            d.handoff = handoff;
            d.lessee_waker = Some(cx.waker().clone());
        }
        s.wake_conn();
        Poll::Pending
    }
}

impl Drop for DirectReader {
    fn drop(&mut self) {
        // A session that stops (or drops the stream) gives the socket back to the connection.
        if let Ok(mut s) = self.shared.try_borrow_mut()
            && s.direct
                .as_ref()
                .is_some_and(|d| d.generation == self.generation)
        {
            s.end_direct();
        }
    }
}

impl Writer {
    /// When the upstream last sent anything.
    pub fn heard(&self) -> Instant {
        self.0.borrow().heard
    }

    /// The connection's frames belong to `lease` now (lease numbers are unique in the
    /// process): a lessee reading directly stops.
    pub fn set_lease(&self, lease: Option<u64>) {
        let mut s = self.0.borrow_mut();
        LEASED.with(|m| {
            let mut m = m.borrow_mut();
            if let Some(old) = s.lease {
                m.remove(&old);
            }
            if let Some(new) = lease {
                m.insert(new, Rc::downgrade(&self.0));
            }
        });
        s.lease = lease;
        s.end_direct();
    }

    /// The connection actor handled what the lessee handed over: the lessee reads again.
    pub fn resume_direct(&self) {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        if let Some(d) = s.direct.as_mut()
            && d.handed
            && d.handoff.is_none()
            && !s.eof
        {
            d.handed = false;
            wake(d.lessee_waker.take());
        }
    }

    /// Encodes a frame; `flush` writes it.
    pub fn write(&self, msg: Message) -> Result<(), WsProtocolError> {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        s.codec.encode(msg, &mut s.wbuf)
    }

    /// Writes what is buffered; resolves when it is all on the socket (the buffer then goes).
    pub async fn flush(self) -> Result<(), WsProtocolError> {
        std::future::poll_fn(move |cx| {
            let mut guard = self.0.borrow_mut();
            let s = &mut *guard;
            while !s.wbuf.is_empty() {
                let n = match Pin::new(&mut s.io).poll_write(cx, &s.wbuf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::Error::from(
                            std::io::ErrorKind::WriteZero,
                        )
                        .into()));
                    }
                    Poll::Ready(Ok(n)) => n,
                };
                s.wbuf.advance(n);
            }
            s.wbuf = BytesMut::new();
            Pin::new(&mut s.io).poll_flush(cx).map_err(Into::into)
        })
        .await
    }

    /// Shuts the write side down (after the closing handshake).
    pub async fn shutdown(self) -> Result<(), WsProtocolError> {
        std::future::poll_fn(move |cx| Pin::new(&mut self.0.borrow_mut().io).poll_shutdown(cx))
            .await
            .map_err(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Framed;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn server_frames(texts: &[&str]) -> BytesMut {
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        for t in texts {
            codec.encode(Message::Text((*t).into()), &mut buf).unwrap();
        }
        buf
    }

    /// One poll, with a waker that does nothing.
    fn poll_once<S: Stream + Unpin>(s: &mut S) -> Poll<Option<S::Item>> {
        Pin::new(s).poll_next(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_direct_reader_takes_text_and_hands_everything_else_to_the_connection() {
        actix_web::rt::System::new().block_on(direct_reads());
    }

    /// Connection `conn`'s reader and writer over an in-memory socket, and the upstream's end.
    fn socket(conn: u64) -> (Reader, Writer, DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let framed = Framed::new(Box::new(ours) as BoxedSocket, Codec::new().client_mode());
        let (reader, writer) = split(conn, framed);
        (reader, writer, theirs)
    }

    /// A waker that counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn direct_reads() {
        let (mut reader, writer, mut theirs) = socket(7);
        // The connection's reader waits for bytes, as its actor's does, before any lessee.
        let conn_task = std::sync::Arc::new(Count(0.into()));
        let conn_waker = Waker::from(conn_task.clone());
        let poll_conn =
            |r: &mut Reader| Pin::new(r).poll_next(&mut Context::from_waker(&conn_waker));
        assert!(poll_conn(&mut reader).is_pending());
        assert!(attach(1).is_none(), "no lease yet");
        writer.set_lease(Some(1));
        assert!(attach(2).is_none(), "another lease");
        let mut direct = attach(1).expect("the lease's own reader");

        // Text reaches the lessee.
        theirs
            .write_all(&server_frames(&["{\"a\":1}"]))
            .await
            .unwrap();
        let (conn, text) = direct.next().await.unwrap();
        assert_eq!((conn, &*text), (7, "{\"a\":1}"));

        // A ping goes to the connection's reader, and the lessee waits until it is handled.
        let mut codec = Codec::new();
        let mut bytes = BytesMut::new();
        codec.encode(Message::Ping("p".into()), &mut bytes).unwrap();
        codec
            .encode(Message::Text("{\"b\":2}".into()), &mut bytes)
            .unwrap();
        theirs.write_all(&bytes).await.unwrap();
        let woken = conn_task.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(poll_once(&mut direct).is_pending());
        assert_eq!(
            conn_task.0.load(std::sync::atomic::Ordering::SeqCst),
            woken + 1,
            "handing over wakes the connection's task"
        );
        let Some(Ok(Frame::Ping(p))) = reader.next().await else {
            panic!("the ping, handed over")
        };
        assert_eq!(p.as_ref(), b"p");
        assert!(poll_once(&mut direct).is_pending(), "not handed back yet");
        writer.resume_direct();
        let (_, text) = direct.next().await.unwrap();
        assert_eq!(&*text, "{\"b\":2}");
        assert!(
            poll_conn(&mut reader).is_pending(),
            "the lessee reads, not the connection"
        );

        // A new lease ends the lessee's reads; the connection reads again.
        writer.set_lease(None);
        assert!(direct.next().await.is_none());
        drop(direct);
        let connection_reads = async |reader: &mut Reader, theirs: &mut DuplexStream, text| {
            theirs.write_all(&server_frames(&[text])).await.unwrap();
            let Some(Ok(Frame::Text(got))) = reader.next().await else {
                panic!("read by the connection")
            };
            assert_eq!(got.as_ref(), text.as_bytes());
        };
        connection_reads(&mut reader, &mut theirs, "{\"c\":3}").await;

        // A lessee that drops its reader gives the socket back.
        writer.set_lease(Some(2));
        assert!(attach(1).is_none(), "the lease is over");
        drop(attach(2).expect("attached"));
        connection_reads(&mut reader, &mut theirs, "{\"d\":4}").await;

        // The end of the stream is the connection's to see.
        writer.set_lease(Some(3));
        let mut last = attach(3).expect("attached");
        drop(theirs);
        assert!(poll_once(&mut last).is_pending());
        assert!(reader.next().await.is_none());
        // The connection, lost, ends the lease.
        writer.set_lease(None);
        assert!(last.next().await.is_none());
        assert!(attach(3).is_none(), "nothing to read after the end");
        drop((reader, writer, last));
        assert!(attach(3).is_none(), "a socket that is gone is forgotten");
        assert!(LEASED.with(|m| m.borrow().is_empty()));
    }

    #[test]
    fn frames_in_order_and_no_buffer_held_between_them() {
        actix_web::rt::System::new().block_on(frames_and_buffers());
    }

    async fn frames_and_buffers() {
        let (mut reader, writer, mut theirs) = socket(1);

        // Two frames in one read, the second split across two.
        let bytes = server_frames(&["{\"a\":1}", "{\"b\":2}"]);
        theirs.write_all(&bytes[..bytes.len() - 3]).await.unwrap();
        let Some(Ok(Frame::Text(a))) = reader.next().await else {
            panic!("first frame")
        };
        assert_eq!(a.as_ref(), b"{\"a\":1}");
        theirs.write_all(&bytes[bytes.len() - 3..]).await.unwrap();
        let Some(Ok(Frame::Text(b))) = reader.next().await else {
            panic!("second frame")
        };
        assert_eq!(b.as_ref(), b"{\"b\":2}");
        // Nothing more to read: the reader is pending and holds no buffer.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(Pin::new(&mut reader).poll_next(&mut cx).is_pending());
        assert_eq!(reader.0.borrow_mut().rbuf.bytes().capacity(), 0);

        // A written frame reaches the peer masked (client mode); the buffer goes after.
        writer.write(Message::Text("hi".into())).unwrap();
        writer.clone().flush().await.unwrap();
        assert_eq!(writer.0.borrow().wbuf.capacity(), 0);
        let mut got = [0u8; 8];
        theirs.read_exact(&mut got).await.unwrap();
        assert_eq!(got[0], 0x81);
        assert_eq!(got[1], 0x80 | 2, "masked, 2 bytes");

        // EOF ends the stream.
        drop(theirs);
        assert!(reader.next().await.is_none());
    }
}
