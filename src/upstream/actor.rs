//! The upstream connection actor.

use actix::prelude::*;
use awc::error::WsProtocolError;
use awc::ws::{CloseCode, CloseReason, Frame, Message as WsMessage};
use bytestring::ByteString;
use tracing::debug;

use super::dial::{DialSpec, dial};
use super::messages::{CloseConn, ConnStatus, LostReason, SendText, SetLessee, UpstreamEvent};
use super::socket::{self, Writer};

/// The payload of a liveness probe's ping.
const PROBE: &[u8] = b"tp-probe";

pub struct UpstreamConn {
    id: u64,
    spec: Option<DialSpec>,
    probe_idle: std::time::Duration,
    probe_timeout: std::time::Duration,
    /// Requests held back while a probe waits for its pong.
    held: Option<Vec<ByteString>>,
    /// Probes sent (a late deadline of an earlier probe is ignored).
    probes: u64,
    pool: Recipient<ConnStatus>,
    sink: Option<Writer>,
    /// A flush of the writer is running (it also writes what is encoded meanwhile).
    flushing: bool,
    /// Shut the write side down once flushed (the closing handshake is complete).
    shut_write: bool,
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
            held: None,
            probes: 0,
            spec: Some(spec),
            pool,
            sink: None,
            flushing: false,
            shut_write: false,
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
        self.end_lease_reads();
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
        if self.sink.is_none()
            || !self.write(
                WsMessage::Close(Some(CloseReason::from(CloseCode::Normal))),
                ctx,
            )
        {
            return ctx.stop();
        }
        ctx.run_later(std::time::Duration::from_secs(1), |_, ctx| ctx.stop());
    }

    /// Encodes a frame and makes sure a flush is running; false when the socket is unusable.
    fn write(&mut self, msg: WsMessage, ctx: &mut Context<Self>) -> bool {
        let Some(sink) = self.sink.as_ref() else {
            return false;
        };
        if sink.write(msg).is_err() {
            return false;
        }
        self.flush(ctx);
        true
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        if self.flushing {
            return;
        }
        self.flushing = true;
        ctx.spawn(sink.flush().into_actor(self).map(|res, act, ctx| {
            act.flushing = false;
            match res {
                Err(e) => act.lose(LostReason::Error(e.to_string()), ctx),
                Ok(()) if act.shut_write => {
                    if let Some(sink) = act.sink.take() {
                        ctx.spawn(sink.shutdown().into_actor(act).map(|_, _, ctx| ctx.stop()));
                    }
                }
                Ok(()) => {}
            }
        }));
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
                let (stream, sink) = socket::split(act.id, socket);
                ctx.add_stream(stream);
                act.sink = Some(sink);
                act.pool.do_send(ConnStatus::Ready { conn: act.id });
            }
            Err(error) => {
                // The pool logs the start and end of an account's failing spell, not each dial.
                debug!(conn = act.id, %error, "upstream dial failed");
                act.lost = true;
                act.pool.do_send(ConnStatus::DialFailed {
                    conn: act.id,
                    error: error.message,
                    status: error.status,
                    retry_after: error.retry_after,
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
            self.shut_write = true;
            return self.flush(ctx);
        }
        if self.lost {
            return;
        }
        self.on_frame(item, ctx);
        // What a lessee reading directly handed over is handled: it reads again.
        if let Some(sink) = &self.sink {
            sink.resume_direct();
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.lose(LostReason::Eof, ctx);
        ctx.stop();
    }
}

impl UpstreamConn {
    /// Nobody reads this socket directly again: its lease is over.
    fn end_lease_reads(&self) {
        if let Some(sink) = &self.sink {
            sink.set_lease(None);
        }
    }

    fn on_frame(&mut self, item: Result<Frame, WsProtocolError>, ctx: &mut Context<Self>) {
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
                self.write(WsMessage::Pong(p), ctx);
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

    fn write_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        if self.lost || !self.write(WsMessage::Text(text), ctx) {
            self.lose(LostReason::Error("upstream socket is closing".into()), ctx);
        }
    }

    /// Liveness before reuse: after `probe_idle` of silence the upstream may be gone without
    /// a word (a graceful restart leaves its old sockets open and silent); a ping must come
    /// back within `probe_timeout` before the request is written.
    fn probe(&mut self, ctx: &mut Context<Self>) {
        if self.sink.is_none() {
            return;
        }
        self.held = Some(Vec::new());
        self.probes += 1;
        let probe = self.probes;
        if !self.write(
            WsMessage::Ping(actix_web::web::Bytes::from_static(PROBE)),
            ctx,
        ) {
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
        let heard = self.sink.as_ref().map(socket::Writer::heard);
        if self.held.is_none() && heard.is_some_and(|at| at.elapsed() >= self.probe_idle) {
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
        if let Some(sink) = &self.sink {
            sink.set_lease(msg.0.as_ref().map(|(_, lease)| *lease));
        }
        self.lessee = msg.0.map(|(lessee, _)| lessee);
    }
}

impl Handler<CloseConn> for UpstreamConn {
    type Result = ();

    fn handle(&mut self, _: CloseConn, ctx: &mut Context<Self>) {
        self.lost = true;
        self.lessee = None;
        self.end_lease_reads();
        self.shut(ctx);
    }
}
