//! The client WebSocket transport: the client's socket itself, owned by the session actor
//! without an actor of its own (docs/DESIGN.md#client-socket).
//!
//! In: the socket's bytes are a stream of the session actor (`ClientBytes`); `ClientReader`
//! decodes them into `ClientInput` (fragments reassembled, RFC 6455 §5.4). Out: `ClientTx`
//! encodes frames straight into a buffer that `ClientWriter` writes to the socket, so an
//! upstream event reaches the client's socket with no actor hop after the session, and
//! everything queued between two of the writer's turns leaves in one write.
//!
//! Why the session does not write the socket itself: a client that stops reading would block
//! whatever writes. The writer is only a buffer and a socket; the session keeps running,
//! counting what is unread and cutting the client off (docs/DESIGN.md#slow-clients).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker, ready};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError};
use actix_web::rt::net::TcpStream;
use actix_web::web::{Bytes, BytesMut};
use bytes::Buf;
use bytestring::ByteString;
use futures_util::Stream;

/// What the client did.
#[derive(Debug)]
pub enum ClientInput {
    Text(ByteString),
    Binary,
    /// A pong to one of the session's backpressure pings: the byte mark it carried.
    Pong(Bytes),
    /// A text message that is not valid UTF-8 (RFC 6455: close 1007).
    InvalidUtf8,
    /// A frame (or a reassembled fragmented message) over the size limit.
    Oversize,
    /// Close frame, EOF, a protocol error: the client is gone.
    Gone,
}

/// What the session sends to the client.
#[derive(Debug)]
pub enum Outbound {
    Text(ByteString),
    Ping(Bytes),
    Close(u16, String),
}

/// Decodes the client's bytes into frames.
pub struct ClientReader {
    codec: Codec,
    buf: BytesMut,
    /// A fragmented message being reassembled: whether it is text, its bytes.
    partial: Option<(bool, Vec<u8>)>,
    /// Largest message, whole or reassembled (`limits.client_frame_max_bytes`).
    max_message: usize,
    /// After a close frame or a protocol error nothing more is read.
    done: bool,
}

/// One decoded step of the client's input.
#[derive(Debug)]
pub enum Read {
    Input(ClientInput),
    /// A ping to answer with this payload.
    Ping(Bytes),
    /// The client's close frame (answered with the same code).
    Close(Option<CloseReason>),
}

impl ClientReader {
    pub fn new(max_message: usize) -> Self {
        Self {
            codec: Codec::new().max_size(max_message),
            buf: BytesMut::new(),
            partial: None,
            max_message,
            done: false,
        }
    }

    /// Feeds a chunk of the request body; `each` gets every whole step it completes, in order.
    pub fn feed(&mut self, chunk: &[u8], mut each: impl FnMut(Read)) {
        if self.done {
            return;
        }
        self.buf.extend_from_slice(chunk);
        while !self.done {
            let step = match self.codec.decode(&mut self.buf) {
                Ok(None) => break,
                Ok(Some(frame)) => self.frame(frame),
                Err(ProtocolError::Overflow) => {
                    self.done = true;
                    Some(Read::Input(ClientInput::Oversize))
                }
                Err(_) => {
                    self.done = true;
                    Some(Read::Input(ClientInput::Gone))
                }
            };
            if let Some(step) = step {
                each(step);
            }
        }
        if self.buf.is_empty() {
            // Frames arrive one per turn: an idle session keeps no buffer.
            self.buf = BytesMut::new();
        }
    }

    fn frame(&mut self, frame: Frame) -> Option<Read> {
        Some(Read::Input(match frame {
            Frame::Text(bytes) => match ByteString::try_from(bytes) {
                Ok(text) => ClientInput::Text(text),
                Err(_) => ClientInput::InvalidUtf8,
            },
            Frame::Binary(_) => ClientInput::Binary,
            Frame::Ping(p) => return Some(Read::Ping(p)),
            Frame::Pong(p) => ClientInput::Pong(p),
            Frame::Close(reason) => {
                self.done = true;
                return Some(Read::Close(reason));
            }
            Frame::Continuation(item) => return self.fragment(item).map(Read::Input),
        }))
    }

    /// One fragment; the whole message once its last fragment arrived.
    fn fragment(&mut self, item: Item) -> Option<ClientInput> {
        let (first_text, bytes, last) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        if let Some(text) = first_text {
            self.partial = Some((text, Vec::new()));
        }
        let (text, buf) = self.partial.as_mut()?;
        if buf.len() + bytes.len() > self.max_message {
            self.partial = None;
            self.done = true;
            return Some(ClientInput::Oversize);
        }
        buf.extend_from_slice(&bytes);
        let text = *text;
        if !last {
            return None;
        }
        let (_, whole) = self.partial.take()?;
        Some(if !text {
            ClientInput::Binary
        } else {
            match String::from_utf8(whole) {
                Ok(s) => ClientInput::Text(ByteString::from(s)),
                Err(_) => ClientInput::InvalidUtf8,
            }
        })
    }
}

#[derive(Default)]
struct Outbox {
    buf: crate::buffers::Held,
    waker: Option<Waker>,
    /// No more frames: the writer ends once `buf` is written (or the socket failed).
    closed: bool,
}

/// The session's end of the outgoing buffer.
pub struct ClientTx {
    codec: Codec,
    outbox: Rc<RefCell<Outbox>>,
}

/// Writes what the session encoded to the client's socket; ends after the last frame (then
/// shuts the socket's sending side) or when the socket fails.
pub struct ClientWriter {
    io: Rc<TcpStream>,
    outbox: Rc<RefCell<Outbox>>,
}

/// What the client sends: the socket's bytes as they arrive, after those read with the
/// handshake.
pub struct ClientBytes {
    io: Rc<TcpStream>,
    first: Option<Bytes>,
    done: bool,
}

/// A transport over the client's socket, upgraded: the session's writer, the stream of what
/// the client sends (starting with `read`, bytes that came with the handshake), and the future
/// that writes.
pub fn over(io: TcpStream, read: BytesMut) -> (ClientTx, ClientBytes, ClientWriter) {
    let io = Rc::new(io);
    let outbox = Rc::new(RefCell::new(Outbox::default()));
    (
        ClientTx {
            codec: Codec::new(),
            outbox: outbox.clone(),
        },
        ClientBytes {
            io: io.clone(),
            first: (!read.is_empty()).then(|| read.freeze()),
            done: false,
        },
        ClientWriter { io, outbox },
    )
}

impl ClientTx {
    /// Encodes a frame for the client; nothing after a close.
    pub fn send(&mut self, msg: Outbound) {
        let msg = match msg {
            Outbound::Text(t) => Message::Text(t),
            Outbound::Ping(p) => Message::Ping(p),
            Outbound::Close(code, reason) => Message::Close(Some(CloseReason {
                code: CloseCode::from(code),
                description: (!reason.is_empty()).then_some(reason),
            })),
        };
        self.push(msg);
    }

    /// Answers a ping.
    pub fn pong(&mut self, payload: Bytes) {
        self.push(Message::Pong(payload));
    }

    /// Answers the client's close frame with the same code; nothing is sent after it.
    pub fn echo_close(&mut self, reason: Option<CloseReason>) {
        self.push(Message::Close(reason));
    }

    /// The one way into the outbox: a close frame is the last frame.
    fn push(&mut self, msg: Message) {
        let mut outbox = self.outbox.borrow_mut();
        if outbox.closed {
            return;
        }
        outbox.closed = matches!(msg, Message::Close(_));
        // Encoding a server frame into memory cannot fail.
        let codec = &mut self.codec;
        let _ = outbox.buf.write(|b| codec.encode(msg, b));
        if let Some(w) = outbox.waker.take() {
            w.wake();
        }
    }
}

impl Drop for ClientTx {
    fn drop(&mut self) {
        // The session is gone: the writer ends after what was queued.
        let mut outbox = self.outbox.borrow_mut();
        outbox.closed = true;
        if let Some(w) = outbox.waker.take() {
            w.wake();
        }
    }
}

impl Future for ClientWriter {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let mut outbox = this.outbox.borrow_mut();
            let queued = outbox.buf.bytes();
            if queued.is_empty() {
                if outbox.closed {
                    // FIN after the close frame; the descriptor closes with the session's
                    // reading half.
                    let _ = rustix::net::shutdown(&*this.io, rustix::net::Shutdown::Write);
                    return Poll::Ready(());
                }
                if !outbox
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()))
                {
                    outbox.waker = Some(cx.waker().clone());
                }
                return Poll::Pending;
            }
            // Everything queued since the last write, in one write.
            match this.io.try_write(queued) {
                // A socket that takes nothing of a non-empty buffer will not take more.
                Ok(0) => {
                    drop(outbox);
                    return this.fail();
                }
                Ok(n) => {
                    queued.advance(n);
                    // The emptied buffer goes to the thread's spares, so an idle session holds
                    // none (docs/DESIGN.md#spare-buffers).
                    outbox.buf.release_if_empty();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drop(outbox);
                    if ready!(this.io.poll_write_ready(cx)).is_err() {
                        return this.fail();
                    }
                }
                Err(_) => {
                    drop(outbox);
                    return this.fail();
                }
            }
        }
    }
}

impl ClientWriter {
    /// The socket failed (reset, `TCP_USER_TIMEOUT`): nothing more is queued; the session
    /// hears of it from its reading half.
    fn fail(&mut self) -> Poll<()> {
        let mut outbox = self.outbox.borrow_mut();
        outbox.closed = true;
        outbox.buf = crate::buffers::Held::default();
        Poll::Ready(())
    }
}

impl Stream for ClientBytes {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        // The stream is polled whenever the session is (every event): no buffer is touched
        // until the socket is readable, and then only a spare one (an idle session holds none).
        loop {
            if let Err(e) = ready!(this.io.poll_read_ready(cx)) {
                this.done = true;
                return Poll::Ready(Some(Err(e)));
            }
            let mut buf = crate::buffers::Held::default();
            let read = buf.write(|b| this.io.try_read_buf(b));
            let chunk = buf.split();
            match read {
                Ok(0) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                Ok(_) => return Poll::Ready(Some(Ok(chunk))),
                // Readiness was stale: `try_read_buf` cleared it, the next poll waits.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames as a client sends them (masked), through one encoder (fragments keep state).
    fn client_frames(msgs: Vec<Message>) -> BytesMut {
        let mut codec = Codec::new().client_mode();
        let mut buf = BytesMut::new();
        for msg in msgs {
            codec.encode(msg, &mut buf).unwrap();
        }
        buf
    }

    fn client_frame(msg: Message) -> BytesMut {
        client_frames(vec![msg])
    }

    fn read_all(reader: &mut ClientReader, bytes: &[u8]) -> Vec<Read> {
        let mut out = Vec::new();
        reader.feed(bytes, |r| out.push(r));
        out
    }

    #[test]
    fn frames_split_anywhere_decode_whole() {
        let mut bytes = client_frame(Message::Text("{\"type\":\"x\"}".into()));
        bytes.extend_from_slice(&client_frame(Message::Ping(Bytes::from_static(b"p"))));
        let mut reader = ClientReader::new(1024);
        let (a, b) = bytes.split_at(5);
        assert!(read_all(&mut reader, a).is_empty());
        let steps = read_all(&mut reader, b);
        assert!(matches!(&steps[0], Read::Input(ClientInput::Text(t)) if t == "{\"type\":\"x\"}"));
        assert!(matches!(&steps[1], Read::Ping(p) if p.as_ref() == b"p"));
    }

    #[test]
    fn invalid_utf8_oversize_and_fragments() {
        let mut reader = ClientReader::new(16);
        // A masked (all-zero mask) text frame holding two bytes that are not UTF-8.
        let bad = [0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe];
        assert!(matches!(
            read_all(&mut reader, &bad)[..],
            [Read::Input(ClientInput::InvalidUtf8)]
        ));
        let frag = client_frames(vec![
            Message::Continuation(Item::FirstText(Bytes::from_static(b"ab"))),
            Message::Continuation(Item::Last(Bytes::from_static(b"cd"))),
        ]);
        assert!(
            matches!(&read_all(&mut reader, &frag)[..], [Read::Input(ClientInput::Text(t))] if t == "abcd")
        );
        let big = client_frame(Message::Text("x".repeat(17).into()));
        assert!(matches!(
            read_all(&mut reader, &big)[..],
            [Read::Input(ClientInput::Oversize)]
        ));
        // Nothing is read after the stream broke.
        let more = client_frame(Message::Text("ok".into()));
        assert!(read_all(&mut reader, &more).is_empty());
    }

    /// A connected pair over loopback: the relay's end (tokio) and the client's (blocking std).
    async fn socket_pair() -> (TcpStream, std::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (server, client)
    }

    fn on_runtime(f: impl Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f);
    }

    #[test]
    fn frames_reach_the_socket_in_order_then_the_close_and_fin() {
        use std::io::Read;
        on_runtime(async {
            let (server, mut client) = socket_pair().await;
            let (mut tx, _input, writer) = over(server, BytesMut::new());
            tx.send(Outbound::Text("a".into()));
            tx.send(Outbound::Text("b".into()));
            tx.send(Outbound::Close(
                crate::protocol::errors::close::POLICY,
                "client_too_slow".into(),
            ));
            tx.send(Outbound::Text("late".into()));
            // The writer ends after the close frame, without waiting for the session to go.
            writer.await;
            let mut wire = Vec::new();
            client.read_to_end(&mut wire).unwrap();
            assert_eq!(&wire[..6], b"\x81\x01a\x81\x01b");
            assert_eq!(&wire[6..10], b"\x88\x11\x03\xf0");
            assert_eq!(
                &wire[10..],
                b"client_too_slow",
                "nothing after the close frame"
            );
            drop(tx);
        });
    }

    #[test]
    fn the_client_bytes_start_with_those_read_with_the_handshake() {
        use futures_util::StreamExt;
        use std::io::Write;
        on_runtime(async {
            let (server, mut client) = socket_pair().await;
            let (tx, mut input, writer) = over(server, BytesMut::from(&b"early"[..]));
            client.write_all(b"later").unwrap();
            assert_eq!(input.next().await.unwrap().unwrap().as_ref(), b"early");
            assert_eq!(input.next().await.unwrap().unwrap().as_ref(), b"later");
            drop(client);
            assert!(input.next().await.is_none(), "EOF ends the stream");
            // A session gone with nothing queued: the writer ends at once.
            drop(tx);
            writer.await;
        });
    }
}
