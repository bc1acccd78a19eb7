//! The client WebSocket transport (actix-web-actors), kept apart from the session's state
//! machine. A client that stops reading freezes the actor that owns its socket (the HTTP
//! dispatcher stops polling it), so the session lives in its own actor: it keeps counting,
//! timing, recording and can cut the client off, whatever the socket does. Moving to actix-ws
//! would touch this file only.

use actix::prelude::*;
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytestring::ByteString;

/// What the client did, delivered to the session.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum ClientInput {
    Text(ByteString),
    Binary,
    /// A pong to one of the session's backpressure pings: the byte mark it carried.
    Pong(Vec<u8>),
    /// A text message that is not valid UTF-8 (RFC 6455: close 1007).
    InvalidUtf8,
    /// A frame (or a reassembled fragmented message) over the size limit.
    Oversize,
    /// Close frame, EOF, a protocol error, or the transport stopped: the client is gone.
    Gone,
}

/// What the session sends to the client.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum Outbound {
    Text(ByteString),
    Ping(Vec<u8>),
    Close(u16, String),
}

pub struct ClientSocket {
    session: Recipient<ClientInput>,
    gone_sent: bool,
    /// A fragmented message being reassembled (RFC 6455 §5.4): whether it is text, its bytes.
    partial: Option<(bool, Vec<u8>)>,
    /// Largest message, whole or reassembled (`limits.client_frame_max_bytes`).
    max_message: usize,
}

impl ClientSocket {
    pub fn new(session: Recipient<ClientInput>, max_message: usize) -> Self {
        Self {
            session,
            gone_sent: false,
            partial: None,
            max_message,
        }
    }

    /// One fragment; the whole message once its last fragment arrived.
    fn fragment(&mut self, item: actix_http::ws::Item) -> Option<ClientInput> {
        let (first_text, bytes, last) = match item {
            actix_http::ws::Item::FirstText(b) => (Some(true), b, false),
            actix_http::ws::Item::FirstBinary(b) => (Some(false), b, false),
            actix_http::ws::Item::Continue(b) => (None, b, false),
            actix_http::ws::Item::Last(b) => (None, b, true),
        };
        if let Some(text) = first_text {
            self.partial = Some((text, Vec::new()));
        }
        let (text, buf) = self.partial.as_mut()?;
        if buf.len() + bytes.len() > self.max_message {
            self.partial = None;
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

    fn gone(&mut self) {
        if !self.gone_sent {
            self.gone_sent = true;
            self.session.do_send(ClientInput::Gone);
        }
    }
}

impl Actor for ClientSocket {
    type Context = WebsocketContext<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        self.gone();
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ClientSocket {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let input = match msg {
            Ok(ws::Message::Text(t)) => ClientInput::Text(t),
            Ok(ws::Message::Binary(_)) => ClientInput::Binary,
            Ok(ws::Message::Ping(p)) => return ctx.pong(&p),
            Ok(ws::Message::Pong(p)) => ClientInput::Pong(p.to_vec()),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
                return self.gone();
            }
            Ok(ws::Message::Continuation(item)) => match self.fragment(item) {
                Some(input) => input,
                None => return,
            },
            Ok(ws::Message::Nop) => return,
            Err(ws::ProtocolError::Overflow) => ClientInput::Oversize,
            // actix-web-actors reports a text frame that is not UTF-8 as an I/O error.
            Err(ws::ProtocolError::Io(e)) if e.to_string().contains("utf-8") => {
                ClientInput::InvalidUtf8
            }
            Err(_) => {
                ctx.stop();
                return self.gone();
            }
        };
        self.session.do_send(input);
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // EOF without a close frame (Codex never sends one).
        self.gone();
        ctx.stop();
    }
}

impl Handler<Outbound> for ClientSocket {
    type Result = ();

    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        match msg {
            Outbound::Text(t) => ctx.text(t),
            Outbound::Ping(mark) => ctx.ping(&mark),
            Outbound::Close(code, reason) => {
                ctx.close(Some(CloseReason {
                    code: CloseCode::from(code),
                    description: (!reason.is_empty()).then_some(reason),
                }));
                ctx.stop();
            }
        }
    }
}
