//! A turn its account's WebSocket cannot carry — a request frame over the account's limit
//! (configured, or learnt from a 1009), an account whose upstream answered a handshake 426, a
//! named lane on an upstream without lanes — goes upstream as `POST /responses` with
//! `stream: true` of its own, and its SSE events reach the client as the WebSocket mode's events,
//! through the same handling as a leased connection's: timing, usage, record, continuation
//! (docs/DESIGN.md#upstream-transports).

use futures_util::StreamExt;

use super::*;
use crate::upstream::http::{LegItem, LegRequest};

/// How a turn's request reaches the upstream (docs/DESIGN.md#upstream-transports).
#[derive(Debug, Default)]
pub(super) enum Leg {
    /// On the session's leased WebSocket, beside its other lanes.
    #[default]
    Lease,
    /// As an HTTP request of its own; the handle of its stream once sent.
    Http(Option<SpawnHandle>),
}

/// The connection an HTTP leg's response is remembered on: none, so a later turn continuing it
/// never finds it "on the same connection" (its `store:false` chain is replayed).
pub(super) use crate::continuation::lineage::NO_CONNECTION;

/// One item of turn `index`'s HTTP leg, started at `generation` (a later one is ignored).
pub(super) struct LegEvent {
    index: i32,
    generation: u64,
    item: LegItem,
}

impl Turn {
    /// Streaming on the session's leased connection (not over an HTTP leg).
    pub(super) fn on_lease(&self) -> bool {
        self.m.phase() == Phase::Streaming && matches!(self.leg, Leg::Lease)
    }

    pub(super) fn over_http(&self) -> bool {
        matches!(self.leg, Leg::Http(_))
    }
}

impl SessionActor {
    /// The largest request frame `account`'s WebSocket takes (0: it has none, its upstream
    /// answered a handshake 426).
    pub(super) fn frame_max_of(&self, account: &str) -> usize {
        self.deps
            .accounts
            .iter()
            .find(|a| a.name == account)
            .map_or(usize::MAX, crate::session::AccountHandle::ws_frame_max)
    }

    /// Whether turn `index` goes over HTTP on `account`: its request is larger than the
    /// account's WebSocket takes, the account has no WebSocket mode, or the turn is on a named
    /// lane and the account's WebSocket has no lanes. Decided at each send (a failover may
    /// change the account).
    pub(super) fn needs_http(&mut self, index: i32, account: &str) -> bool {
        let max = self.frame_max_of(account);
        let no_lanes = self
            .deps
            .accounts
            .iter()
            .any(|a| a.name == account && a.lanes_over_http());
        let Some(turn) = self.at_mut(index) else {
            return false;
        };
        let http = turn.frame.raw.len() > max || (no_lanes && turn.frame.stream_id.is_some());
        turn.leg = if http { Leg::Http(None) } else { Leg::Lease };
        http
    }

    /// The session's connection was closed with 1009 (message too big): the largest request
    /// of a turn that had heard nothing yet is what the upstream refused, so requests of that
    /// size go over HTTP on the account from now on — those turns' retries included
    /// (docs/DESIGN.md#upstream-transports).
    pub(super) fn learn_frame_limit(&mut self) {
        let Some(lease) = self.up.lease.as_ref() else {
            return;
        };
        let refused = self
            .turns
            .iter()
            .filter(|t| t.on_lease() && t.m.tracker.events == 0)
            .map(|t| t.sent_bytes)
            .max()
            .unwrap_or(0);
        let Some(account) = self
            .deps
            .accounts
            .iter()
            .find(|a| *a.name == *lease.account)
        else {
            return;
        };
        if refused > 0 && account.health.refused_frame(refused) {
            warn!(parent: &self.span, account = %account.name, bytes = refused,
                "the upstream closed a request with 1009 (message too big): requests this large go over HTTP on this account");
        }
    }

    /// The upstream refused a `stream_id` on the session's connection (a backend without lanes;
    /// the refusal carries no lane): the account's named lanes go over HTTP from now on, and the
    /// named-lane turns on the connection that heard nothing yet — the refused one among them —
    /// are sent again, over HTTP. The refusal is not forwarded: their clients see normal turns
    /// (docs/DESIGN.md#upstream-transports).
    /// `false` when the account's lanes are declared `native`: the refusal is then relayed as
    /// any upstream error.
    pub(super) fn lanes_refused(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(account) = self.up.lease.as_ref().map(|l| l.account.to_string()) else {
            return false;
        };
        let Some(a) = self.deps.accounts.iter().find(|a| a.name == account) else {
            return false;
        };
        if a.lanes == crate::config::LanesMode::Native {
            return false;
        }
        if a.health.refuse_lanes() {
            warn!(parent: &self.span, %account,
                "upstream refuses stream_id (no lanes): this account's named lanes go over HTTP");
        }
        let refused: Vec<i32> = self
            .turns
            .iter()
            .filter(|t| t.on_lease() && t.frame.stream_id.is_some() && t.m.tracker.events == 0)
            .map(|t| t.index)
            .collect();
        for index in refused {
            self.drive(index, Input::Resend, Instant::now(), None, ctx);
        }
        true
    }

    /// Sends turn `index` over its HTTP leg, after the continuation decision (no connection
    /// holds what it continues).
    pub(super) fn send_over_http(&mut self, index: i32, ctx: &mut Context<Self>) {
        let Some(turn) = self.at(index) else {
            return;
        };
        let decision = self.continuation(turn, NO_CONNECTION, false);
        self.write_request(index, decision, ctx);
    }

    /// Starts the HTTP leg of turn `index` with the request `raw` (the frame as it would have
    /// gone over the WebSocket); `false` when the turn or its account is gone.
    pub(super) fn start_http_leg(
        &mut self,
        index: i32,
        raw: &str,
        ctx: &mut Context<Self>,
    ) -> bool {
        let s = &self.deps.settings.upstream;
        let (first_event, idle, event_max) = (
            Duration::from_millis(s.first_event_timeout_ms),
            Duration::from_millis(s.read_timeout_ms),
            s.frame_max_bytes,
        );
        let headers = self.headers.clone();
        let Some(turn) = self.turns.iter().find(|t| t.index == index) else {
            return false;
        };
        let Some(endpoint) = turn.account_slot.as_ref().and_then(|slot| {
            self.deps
                .accounts
                .iter()
                .find(|a| a.name == slot.account)
                .map(|a| a.http.clone())
        }) else {
            return false;
        };
        // `raw` parsed as a JSON object when it arrived; rewrites keep it one.
        let body = frames::http_body(raw).unwrap_or_default();
        debug!(parent: &turn.span, bytes = raw.len(), account = %endpoint.account,
            "request sent over HTTP: its account's WebSocket cannot carry it");
        let request = LegRequest {
            endpoint,
            headers,
            body: body.into(),
            lane: turn.frame.stream_id.clone(),
            first_event,
            idle,
            event_max,
        };
        let Some(turn) = self.at_mut(index) else {
            return false;
        };
        turn.generation += 1;
        let generation = turn.generation;
        let items = crate::upstream::http::leg(request).map(move |item| LegEvent {
            index,
            generation,
            item,
        });
        let handle = ctx.add_stream(items);
        if let Some(turn) = self.at_mut(index) {
            turn.leg = Leg::Http(Some(handle));
        }
        true
    }

    /// Stops turn `index`'s HTTP leg, if it runs (dropping the request stops the upstream).
    pub(super) fn stop_http_leg(&mut self, index: i32, ctx: &mut Context<Self>) {
        if let Some(turn) = self.at_mut(index)
            && let Leg::Http(handle) = &mut turn.leg
            && let Some(handle) = handle.take()
        {
            ctx.cancel_future(handle);
        }
    }

    fn on_leg(&mut self, ev: LegEvent, ctx: &mut Context<Self>) {
        let Some(i) = self.turns.iter().position(|t| {
            t.index == ev.index
                && t.generation == ev.generation
                && t.m.phase() == Phase::Streaming
                && t.over_http()
        }) else {
            return;
        };
        let index = ev.index;
        match ev.item {
            LegItem::Written(at) => self.turns[i].m.tracker.clock.written(at),
            LegItem::Event(text) => self.on_turn_text(i, text, Instant::now(), ctx),
            LegItem::Refused(event) => {
                // Nothing was served: the upstream's own words if no other account takes it.
                let refused = Input::Unreachable {
                    why: Unreachable::Refused {
                        event: event.to_string(),
                    },
                    message: String::new(),
                    close: false,
                };
                self.drive(index, refused, Instant::now(), None, ctx);
            }
            LegItem::Unreachable(why) => {
                debug!(parent: &self.turns[i].span, error = %why, "upstream unreachable over HTTP");
                self.unreachable(index, Unreachable::LegDown, ctx);
            }
            LegItem::Lost(why) => {
                self.stop_http_leg(index, ctx);
                debug!(parent: &self.turns[i].span, error = %why, "HTTP leg lost");
                self.lose_turn(index, &LostReason::Error(why), ctx);
            }
        }
    }
}

impl SessionActor {
    /// Turn `index` could not reach its account (`why`): another account takes it, else it
    /// is refused, not billed.
    pub(super) fn unreachable(&mut self, index: i32, why: Unreachable, ctx: &mut Context<Self>) {
        let input = Input::Unreachable {
            why,
            message: crate::session::gate::unavailable(&self.deps),
            close: false,
        };
        self.drive(index, input, Instant::now(), None, ctx);
    }
}

impl StreamHandler<LegEvent> for SessionActor {
    fn handle(&mut self, ev: LegEvent, ctx: &mut Self::Context) {
        self.on_leg(ev, ctx);
    }

    /// A leg's stream ended: its last item said how; the session goes on (the default would stop it).
    fn finished(&mut self, _: &mut Self::Context) {}
}
