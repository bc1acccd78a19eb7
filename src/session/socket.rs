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
    /// A fragmented message (not supported).
    Fragment,
    /// A frame over the size limit.
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
}

impl ClientSocket {
    pub fn new(session: Recipient<ClientInput>) -> Self {
        Self {
            session,
            gone_sent: false,
        }
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
            Ok(ws::Message::Continuation(_)) => ClientInput::Fragment,
            Ok(ws::Message::Nop) => return,
            Err(ws::ProtocolError::Overflow) => ClientInput::Oversize,
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
