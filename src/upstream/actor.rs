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

/// The payload of a liveness probe's ping.
const PROBE: &[u8] = b"tp-probe";

pub struct UpstreamConn {
    id: u64,
    spec: Option<DialSpec>,
    probe_idle: std::time::Duration,
    probe_timeout: std::time::Duration,
    /// When the upstream last sent anything.
    last_heard: std::time::Instant,
    /// Requests held back while a probe waits for its pong.
    held: Option<Vec<ByteString>>,
    /// Probes sent (a late deadline of an earlier probe is ignored).
    probes: u64,
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
            probe_idle: spec.probe_idle,
            probe_timeout: spec.probe_timeout,
            last_heard: std::time::Instant::now(),
            held: None,
            probes: 0,
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
        self.last_heard = std::time::Instant::now();
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
            Ok(Frame::Pong(p)) if p.as_ref() == PROBE => self.probe_answered(ctx),
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

impl UpstreamConn {
    fn write_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let failed = match self.sink.as_mut() {
            Some(sink) if !self.lost => sink.write(WsMessage::Text(text)).is_err(),
            _ => true,
        };
        if failed {
            self.lose(LostReason::Error("upstream socket is closing".into()), ctx);
        }
    }

    /// Liveness before reuse: after `probe_idle` of silence the upstream may be gone without
    /// a word (a graceful restart leaves its old sockets open and silent); a ping must come
    /// back within `probe_timeout` before the request is written.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        let Some(sink) = self.sink.as_mut() else {
            return;
        };
        self.held = Some(Vec::new());
        self.probes += 1;
        let probe = self.probes;
        if sink
            .write(WsMessage::Ping(actix_web::web::Bytes::from_static(PROBE)))
            .is_err()
        {
            return self.lose(LostReason::Error("upstream socket is closing".into()), ctx);
        }
        ctx.run_later(self.probe_timeout, move |act, ctx| {
            if act.held.is_some() && act.probes == probe {
                act.held = None;
                act.lose(
                    LostReason::Error("no pong to the liveness probe".into()),
                    ctx,
                );
                act.shut(ctx);
            }
        });
    }

    fn probe_answered(&mut self, ctx: &mut Context<Self>) {
        for text in self.held.take().unwrap_or_default() {
            self.write_text(text, ctx);
        }
    }
}

impl Handler<SendText> for UpstreamConn {
    type Result = ();

    fn handle(&mut self, msg: SendText, ctx: &mut Context<Self>) {
        if self.held.is_none() && self.last_heard.elapsed() >= self.probe_idle {
            self.probe(ctx);
        }
        match self.held.as_mut() {
            Some(held) => held.push(msg.0),
            None => self.write_text(msg.0, ctx),
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
