//! The client WebSocket transport, owned by the session actor without an actor of its own.
//!
//! In: the request body's bytes are a stream of the session actor; `ClientReader` decodes them
//! into `ClientInput` (fragments reassembled, RFC 6455 §5.4). Out: `ClientTx` encodes frames
//! straight into a buffer that the HTTP response body drains, so an upstream event reaches the
//! client's socket with no actor hop after the session, and everything queued between two
//! writes of the HTTP dispatcher leaves in one write.
//!
//! Why the session does not run inside the response body (as an actix-web-actors
//! `WebsocketContext` does): a client that stops reading stops the dispatcher polling its body,
//! which would freeze whatever runs in it. The body here is only a buffer; the session keeps
//! running, counting what is unread and cutting the client off (docs/DESIGN.md#slow-clients).

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_codec::{Decoder, Encoder};
use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Item, Message, ProtocolError};
use actix_web::web::{Bytes, BytesMut};
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
    /// No more frames: the body ends once `buf` is written.
    closed: bool,
}

/// The session's end of the outgoing buffer.
pub struct ClientTx {
    codec: Codec,
    outbox: Rc<RefCell<Outbox>>,
}

/// The HTTP response body: drains what the session encoded.
pub struct ClientBody(Rc<RefCell<Outbox>>);

/// A transport: the session's writer and the response body it feeds.
pub fn transport() -> (ClientTx, ClientBody) {
    let outbox = Rc::new(RefCell::new(Outbox::default()));
    (
        ClientTx {
            codec: Codec::new(),
            outbox: outbox.clone(),
        },
        ClientBody(outbox),
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

    /// Answers the client's close frame with the same code, and ends the body.
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
        // The session is gone: the body ends after what was queued.
        let mut outbox = self.outbox.borrow_mut();
        outbox.closed = true;
        if let Some(w) = outbox.waker.take() {
            w.wake();
        }
    }
}

impl Stream for ClientBody {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut outbox = self.0.borrow_mut();
        if !outbox.buf.bytes().is_empty() {
            // Everything queued since the last write, in one chunk; the emptied buffer goes to
            // the thread's spares, so an idle session holds none (docs/DESIGN.md#spare-buffers).
            return Poll::Ready(Some(Ok(outbox.buf.split())));
        }
        if outbox.closed {
            return Poll::Ready(None);
        }
        if !outbox
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            outbox.waker = Some(cx.waker().clone());
        }
        Poll::Pending
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

    #[test]
    fn queued_frames_leave_in_one_chunk_then_the_body_ends() {
        let (mut tx, mut body) = transport();
        tx.send(Outbound::Text("a".into()));
        tx.send(Outbound::Text("b".into()));
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(Some(Ok(chunk))) = Pin::new(&mut body).poll_next(&mut cx) else {
            panic!("a chunk")
        };
        assert_eq!(chunk.as_ref(), b"\x81\x01a\x81\x01b");
        assert!(Pin::new(&mut body).poll_next(&mut cx).is_pending());
        tx.send(Outbound::Close(
            crate::protocol::errors::close::POLICY,
            "client_too_slow".into(),
        ));
        tx.send(Outbound::Text("late".into()));
        let Poll::Ready(Some(Ok(chunk))) = Pin::new(&mut body).poll_next(&mut cx) else {
            panic!("the close frame")
        };
        assert_eq!(&chunk[..4], b"\x88\x11\x03\xf0");
        assert!(matches!(
            Pin::new(&mut body).poll_next(&mut cx),
            Poll::Ready(None)
        ));
    }
}
