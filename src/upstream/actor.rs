//! The upstream connection actor.

use actix::io::{SinkWrite, WriteHandler};
use actix::prelude::*;
use awc::error::WsProtocolError;
use awc::ws::{CloseCode, CloseReason, Frame, Message as WsMessage};
use bytestring::ByteString;
use futures_util::stream::{SplitSink, StreamExt};
use tracing::{debug, warn};

use super::dial::{DialSpec, Socket, dial};
use super::messages::{CloseConn, ConnStatus, LostReason, SendText, SetLessee, UpstreamEvent};

type Sink = SinkWrite<WsMessage, SplitSink<Socket, WsMessage>>;

pub struct UpstreamConn {
    id: u64,
    spec: Option<DialSpec>,
    pool: Recipient<ConnStatus>,
    sink: Option<Sink>,
    lessee: Option<Recipient<UpstreamEvent>>,
    /// Set once the socket is unusable; everything after that is ignored.
    lost: bool,
    closing: bool,
}

impl UpstreamConn {
    pub fn new(id: u64, spec: DialSpec, pool: Recipient<ConnStatus>) -> Self {
        Self {
            id,
            spec: Some(spec),
            pool,
            sink: None,
            lessee: None,
            lost: false,
            closing: false,
        }
    }

    /// The socket is gone or must not be used again: tell the lessee and the pool, once.
    fn lose(&mut self, reason: LostReason, ctx: &mut Context<Self>) {
        if self.lost {
            return;
        }
        self.lost = true;
        debug!(conn = self.id, ?reason, "upstream connection lost");
        if let Some(lessee) = self.lessee.take() {
            lessee.do_send(UpstreamEvent::Lost {
                conn: self.id,
                reason: reason.clone(),
            });
        }
        self.pool.do_send(ConnStatus::Broken {
            conn: self.id,
            reason,
        });
        self.shut(ctx);
    }

    /// The closing handshake (RFC 6455 §7.1): our close frame, then the TCP stream is shut
    /// down once the peer's close frame arrives — shutting it down right after our own frame
    /// can make a server drop that frame — or after a second, whichever comes first.
    fn shut(&mut self, ctx: &mut Context<Self>) {
        if self.closing {
            return;
        }
        self.closing = true;
        match self.sink.as_mut() {
            Some(sink) => {
                if sink
                    .write(WsMessage::Close(Some(CloseReason::from(CloseCode::Normal))))
                    .is_err()
                {
                    return ctx.stop();
                }
                ctx.run_later(std::time::Duration::from_secs(1), |_, ctx| ctx.stop());
            }
            None => ctx.stop(),
        }
    }
}

impl Actor for UpstreamConn {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(spec) = self.spec.take() else {
            return ctx.stop();
        };
        // The resident reader starts with the connection: nothing else runs before it.
        ctx.wait(dial(spec).into_actor(self).map(|res, act, ctx| match res {
            Ok(socket) => {
                let (sink, stream) = socket.split();
                ctx.add_stream(stream);
                act.sink = Some(SinkWrite::new(sink, ctx));
                act.pool.do_send(ConnStatus::Ready { conn: act.id });
            }
            Err(error) => {
                warn!(conn = act.id, %error, "upstream dial failed");
                act.lost = true;
                act.pool.do_send(ConnStatus::DialFailed {
                    conn: act.id,
                    error,
                });
                ctx.stop();
            }
        }));
    }
}

impl StreamHandler<Result<Frame, WsProtocolError>> for UpstreamConn {
    fn handle(&mut self, item: Result<Frame, WsProtocolError>, ctx: &mut Context<Self>) {
        if self.closing && matches!(item, Ok(Frame::Close(_))) {
            // The peer answered our close frame: the handshake is complete.
            if let Some(sink) = self.sink.as_mut() {
                sink.close();
            }
            return;
        }
        if self.lost {
            return;
        }
        match item {
            Ok(Frame::Text(bytes)) => match (&self.lessee, ByteString::try_from(bytes)) {
                (Some(lessee), Ok(text)) => lessee.do_send(UpstreamEvent::Text {
                    conn: self.id,
                    text,
                }),
                (Some(_), Err(_)) => {
                    self.lose(LostReason::Error("invalid UTF-8 text frame".into()), ctx)
                }
                // Nobody asked: the socket's state is unknown now.
                (None, _) => self.lose(LostReason::StrayData, ctx),
            },
            Ok(Frame::Binary(_)) => self.lose(
                LostReason::Protocol("the upstream sent a binary frame"),
                ctx,
            ),
            Ok(Frame::Ping(p)) => {
                if let Some(sink) = self.sink.as_mut() {
                    let _ = sink.write(WsMessage::Pong(p));
                }
            }
            Ok(Frame::Pong(_)) => {}
            Ok(Frame::Close(reason)) => {
                let code = reason.map(|r| u16::from(r.code));
                self.lose(LostReason::Closed(code), ctx);
            }
            Ok(Frame::Continuation(_)) => self.lose(
                LostReason::Error("fragmented frames are not supported".into()),
                ctx,
            ),
            Err(e) => self.lose(LostReason::Error(e.to_string()), ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.lose(LostReason::Eof, ctx);
        ctx.stop();
    }
}

impl WriteHandler<WsProtocolError> for UpstreamConn {
    fn error(&mut self, err: WsProtocolError, ctx: &mut Self::Context) -> Running {
        self.lose(LostReason::Error(err.to_string()), ctx);
        Running::Stop
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<SendText> for UpstreamConn {
    type Result = ();

    fn handle(&mut self, msg: SendText, ctx: &mut Context<Self>) {
        let failed = match self.sink.as_mut() {
            Some(sink) if !self.lost => sink.write(WsMessage::Text(msg.0)).is_err(),
            _ => true,
        };
        if failed {
            self.lose(LostReason::Error("upstream socket is closing".into()), ctx);
        }
    }
}

impl Handler<SetLessee> for UpstreamConn {
    type Result = ();

    fn handle(&mut self, msg: SetLessee, _ctx: &mut Context<Self>) {
        self.lessee = msg.0;
    }
}

impl Handler<CloseConn> for UpstreamConn {
    type Result = ();

    fn handle(&mut self, _: CloseConn, ctx: &mut Context<Self>) {
        self.lost = true;
        self.lessee = None;
        self.shut(ctx);
    }
}
