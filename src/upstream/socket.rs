//! The upstream WebSocket's bytes, with buffers sized to what is in flight.
//!
//! awc hands over a `Framed` transport that keeps an 8 KiB read buffer and an 8 KiB write buffer
//! for the life of the connection; pooled connections spend most of their life idle, so here a
//! buffer exists only while it holds bytes: the read buffer is dropped whenever everything read
//! was decoded, the write buffer once it is flushed. The socket is shared by a reader (a stream
//! of the connection actor) and a writer (flushed by a future the actor spawns), never polled by
//! both at once: one thread, one actor.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use actix_codec::{Decoder, Encoder};
use actix_web::web::{Buf, BytesMut};
use awc::BoxedSocket;
use awc::error::WsProtocolError;
use awc::ws::{Codec, Frame, Message};
use futures_util::Stream;
use tokio::io::AsyncWrite;
use tokio_util::io::poll_read_buf;

use super::dial::Socket;

/// Room made for one read: a few events, not a whole turn.
const READ_CHUNK: usize = 4096;

struct Shared {
    io: BoxedSocket,
    codec: Codec,
    rbuf: BytesMut,
    wbuf: BytesMut,
    eof: bool,
}

/// Frames from the upstream.
pub struct Reader(Rc<RefCell<Shared>>);

/// Frames to the upstream: encoded at once, written by `flush`.
#[derive(Clone)]
pub struct Writer(Rc<RefCell<Shared>>);

/// Splits awc's transport, keeping whatever it had read past the handshake.
pub fn split(socket: Socket) -> (Reader, Writer) {
    let parts = socket.into_parts();
    let mut wbuf = parts.write_buf;
    if wbuf.is_empty() {
        wbuf = BytesMut::new();
    }
    let shared = Rc::new(RefCell::new(Shared {
        io: parts.io,
        codec: parts.codec,
        rbuf: parts.read_buf,
        wbuf,
        eof: false,
    }));
    (Reader(shared.clone()), Writer(shared))
}

impl Stream for Reader {
    type Item = Result<Frame, WsProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut guard = self.0.borrow_mut();
        let s = &mut *guard;
        loop {
            if !s.rbuf.is_empty() {
                match s.codec.decode(&mut s.rbuf) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            if s.eof {
                return Poll::Ready(None);
            }
            if s.rbuf.capacity() - s.rbuf.len() < READ_CHUNK / 4 {
                s.rbuf.reserve(READ_CHUNK);
            }
            match poll_read_buf(Pin::new(&mut s.io), cx, &mut s.rbuf) {
                Poll::Pending => {
                    if s.rbuf.is_empty() {
                        // Idle: no buffer held until the next bytes arrive.
                        s.rbuf = BytesMut::new();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Ok(0)) => s.eof = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}

impl Writer {
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn server_frames(texts: &[&str]) -> BytesMut {
        let mut codec = Codec::new();
        let mut buf = BytesMut::new();
        for t in texts {
            codec.encode(Message::Text((*t).into()), &mut buf).unwrap();
        }
        buf
    }

    #[test]
    fn frames_in_order_and_no_buffer_held_between_them() {
        actix_web::rt::System::new().block_on(frames_and_buffers());
    }

    async fn frames_and_buffers() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let framed = Framed::new(Box::new(ours) as BoxedSocket, Codec::new().client_mode());
        let (mut reader, writer) = split(framed);

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
        assert_eq!(reader.0.borrow().rbuf.capacity(), 0);

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
