//! An HTTP client's turn on a leased upstream WebSocket (docs/DESIGN.md#upstream-transports): the
//! body goes as the WebSocket mode's `response.create` on a connection of the account's pool —
//! warm, kept between turns, preferred by the client's session headers — and its events come back
//! as SSE (or, for a request that does not stream, as the terminal's response object). Anything
//! that keeps the request from the socket before an event was relayed hands the turn back to the
//! HTTP path, once.

use actix::prelude::*;

use super::*;
use tracing::debug;

use crate::config::HttpTransport;
use crate::pool::messages::{Acquire, Home, Lease, LeaseError, Release};
use crate::protocol::errors::close;
use crate::protocol::events;
use crate::protocol::frames;
use crate::upstream::messages::{LostReason, SendText, UpstreamEvent};

/// Receives the leased connection's events for the exchange (a task, not an actor).
struct Lessee(mpsc::UnboundedSender<UpstreamEvent>);

impl Actor for Lessee {
    type Context = Context<Self>;
}

impl Handler<UpstreamEvent> for Lessee {
    type Result = ();

    fn handle(&mut self, msg: UpstreamEvent, ctx: &mut Context<Self>) {
        if self.0.send(msg).is_err() {
            ctx.stop();
        }
    }
}

/// The lease, given back when the turn is done with it: reusable only after the response ended.
struct Held {
    lease: Lease,
    pool: Addr<crate::pool::ContextPool>,
    _lessee: Addr<Lessee>,
}

impl Held {
    fn release(self, reusable: bool) {
        if !reusable {
            // Whatever still runs on it stops with it.
            self.lease
                .addr
                .do_send(SendText(r#"{"type":"response.cancel"}"#.into()));
        }
        self.pool.do_send(Release {
            conn: self.lease.conn,
            lease: self.lease.id,
            reusable,
        });
    }
}

/// How the socket's part ended: the turn's end, or the HTTP path's turn.
enum Outcome {
    End(End),
    /// Nothing of the response was relayed: the HTTP path takes the turn.
    Fallback,
    /// The upstream closed the socket with 1009 (message too big) before any event: HTTP too.
    TooBig,
}

impl Exchange {
    /// The turn on a leased upstream WebSocket, when the relay sends HTTP clients there and the
    /// account has one that takes the request; `None` when the HTTP path is to take it.
    pub(super) async fn over_websocket(&mut self, sink: &mut Sink) -> Option<End> {
        let s = &self.deps.settings.upstream;
        if s.http_transport != HttpTransport::Ws || self.kind != Kind::Responses {
            return None;
        }
        let account = self.account.as_ref()?.account.clone();
        let handle = self.deps.accounts.iter().find(|a| a.name == account)?;
        // A background response outlives its request: HTTP only.
        if self.frame.background {
            return None;
        }
        let frame = frames::ws_frame(self.frame.raw.as_bytes())?;
        if frame.len() > handle.ws_frame_max() {
            return None;
        }
        let (pool, health) = (handle.pool.clone(), handle.health.clone());
        let frame_len = frame.len();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let lessee = Lessee(tx).start();
        let acquire = pool.send(Acquire {
            headers: self.headers.clone(),
            preferred: None,
            lessee: lessee.clone().recipient(),
            home: Some(Home::current()),
            reclaim: None,
            queue: false,
        });
        let lease = tokio::select! {
            lease = acquire => lease,
            why = self.interrupted(sink) => return Some(self.interrupt(why)),
        };
        let lease = match lease {
            Ok(Ok(lease)) => lease,
            Ok(Err(LeaseError::DialFailed(_) | LeaseError::Cooling)) => {
                // The pool counted the account's failure: the HTTP path goes to the next
                // account, if there is one (else it asks this one, and relays its answer).
                self.next_account();
                return None;
            }
            // None free now (the HTTP path does not wait for one), or no WebSocket at all
            // (426): HTTP, on this account.
            _ => return None,
        };
        let held = Held {
            lease,
            pool,
            _lessee: lessee,
        };
        let conn = held.lease.conn;
        // What the HTTP path starts from, should it take the turn.
        let before = self.m.tracker.clone();
        let now = Instant::now();
        self.m.tracker.clock.written(now);
        let sent = Input::Sent {
            leg: machine::Leg::Socket,
            replayed: false,
        };
        self.m.step(sent, now);
        held.lease.addr.do_send(SendText(frame.into()));
        debug!(parent: &self.span, conn, %account, "request written on an upstream WebSocket");
        let (outcome, reusable) = self.relay_events(&mut rx, conn, sink).await;
        held.release(reusable);
        if matches!(outcome, Outcome::TooBig) && health.refused_frame(frame_len) {
            warn!(parent: &self.span, account = %account, bytes = frame_len,
                "the upstream closed a request with 1009 (message too big): requests this large go over HTTP on this account");
        }
        match outcome {
            Outcome::End(end) => {
                self.over_ws = true;
                Some(end)
            }
            Outcome::Fallback | Outcome::TooBig => {
                debug!(parent: &self.span, "the upstream WebSocket gave nothing of the response; the request goes over HTTP");
                self.m.tracker = before;
                None
            }
        }
    }

    /// The response's events, relayed as they come; returns how it ended and whether the
    /// connection may serve another turn.
    async fn relay_events(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<UpstreamEvent>,
        conn: u64,
        sink: &mut Sink,
    ) -> (Outcome, bool) {
        let s = &self.deps.settings;
        let first_event = Duration::from_millis(s.upstream.first_event_timeout_ms);
        let idle = Duration::from_millis(s.upstream.read_timeout_ms);
        let stall = Duration::from_millis(s.limits.client_stall_timeout_ms.max(1));
        let budget = s.limits.client_send_buffer_bytes;
        let streams = self.streams();
        let mut relayed = false;
        loop {
            let wait = self.m.tracker.silence_allowed(first_event, idle);
            let event = tokio::select! {
                e = tokio::time::timeout(wait, rx.recv()) => e,
                why = self.interrupted(sink) => return self.ended_by(why),
            };
            let lost = match event {
                Ok(Some(UpstreamEvent::Text { conn: c, text })) if c == conn => Ok(text),
                Ok(Some(UpstreamEvent::Lost { conn: c, .. })) if c != conn => continue,
                Ok(Some(UpstreamEvent::Text { .. })) => continue,
                Ok(Some(UpstreamEvent::Lost { reason, .. })) => Err(reason),
                Ok(None) => Err(LostReason::Closed(None)),
                Err(_) => Err(LostReason::Error("no upstream event in time".into())),
            };
            let text = match lost {
                Ok(text) => text,
                Err(reason) => {
                    let too_big = reason == LostReason::Closed(Some(close::TOO_BIG));
                    return match self.step(Input::Lost(&reason), &no_answer) {
                        // Nothing heard: the request goes over HTTP (once).
                        Next::Retry if too_big => (Outcome::TooBig, false),
                        Next::End(end, reusable) => {
                            warn!(parent: &self.span, ?reason, "upstream WebSocket lost mid-response");
                            (Outcome::End(end), reusable)
                        }
                        _ => (Outcome::Fallback, false),
                    };
                }
            };
            let answer = |ending: &Ending| answer_of(ending, &text, streams, relayed);
            let next = match self.step(Input::Upstream(&text), &answer) {
                // The account's trouble, not the request's: the HTTP path decides (failover,
                // or the upstream's own answer) — its turn goes there as it stands.
                Next::Rescue(Rescue::FailOver(_)) => return (Outcome::Fallback, true),
                Next::Rescue(_) => self.step(Input::NotRescued, &answer),
                next => next,
            };
            match next {
                Next::End(end, reusable) => return (Outcome::End(end), reusable),
                Next::Relay if streams => {
                    if !relayed {
                        if !sink.start_stream(budget, Vec::new()) {
                            return self.ended_by(Interrupted::ClientGone);
                        }
                        relayed = true;
                    }
                    match sink.send(events::sse_of_ws(&text), stall).await {
                        Sent::Yes => {}
                        Sent::Gone => return self.ended_by(Interrupted::ClientGone),
                        Sent::Stalled => {
                            let abort = Input::Abort(ErrorCode::ClientTooSlow, String::new());
                            let end = self.end_with(abort, &no_answer);
                            return (Outcome::End(end), false);
                        }
                    }
                }
                Next::Relay | Next::Go | Next::Retry | Next::Rescue(_) => {}
            }
        }
    }

    /// The socket's part ended for a reason of the turn's own; its socket is spent.
    fn ended_by(&mut self, why: Interrupted) -> (Outcome, bool) {
        (Outcome::End(self.interrupt(why)), false)
    }
}

/// What the client hears of the upstream's last event `text`: a terminal's response (or
/// SSE event), an error with its status before the stream started, else its SSE event.
fn answer_of(ending: &Ending, text: &str, streams: bool, relayed: bool) -> Last {
    if let Ending::Terminal(_) = ending {
        return match (streams, events::response_of_terminal(text)) {
            (true, _) => Last::Event(events::sse_of_ws(text)),
            (false, Some(body)) => Last::Upstream {
                status: StatusCode::OK,
                body,
                headers: Vec::new(),
            },
            (false, None) => Last::Error(
                ErrorCode::UpstreamProtocolError,
                "the upstream's terminal event carried no response".into(),
            ),
        };
    }
    if relayed {
        return Last::Event(events::sse_of_ws(text));
    }
    let (status, body) = events::http_error_of_ws(text);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    Last::Upstream {
        status,
        body,
        headers: Vec::new(),
    }
}
