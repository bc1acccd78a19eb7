//! The end of a turn: its usage record, made durable before the client hears the end (docs/DESIGN.md#nothing-lost).

use super::*;
use crate::session::admission::KeySlot;
use crate::session::gate;

impl SessionActor {
    /// The usage record of `turn`, ended with `outcome`, on `account`.
    pub(super) fn record_of(
        &self,
        turn: &Turn,
        outcome: crate::session::turn::Outcome,
        account: String,
    ) -> TurnRecord {
        let who = gate::TurnIdentity {
            request_id: &turn.turn_id,
            session_id: &self.id,
            turn_index: turn.index,
            model: &turn.model,
            warmup: turn.frame.warmup,
            accepted_at: turn.accepted_wall,
            origin: turn.origin,
            service_tier: turn.frame.service_tier.as_deref(),
            transport: crate::record::Transport::Ws,
            upstream_transport: if turn.over_http() {
                crate::record::Transport::Http
            } else {
                crate::record::Transport::Ws
            },
            span: &turn.span,
        };
        gate::record_of(&self.deps, &self.principal, who, outcome, account)
    }

    /// Ends turn `index`: its record goes to accounting, and only once accounting has
    /// acknowledged it (durable) does the client get the turn's last frame. Not acknowledged
    /// within `accounting.ack_timeout_ms` → the client gets `accounting_unavailable` instead
    /// (never a terminal without a durable record); the record stays with accounting, which
    /// writes it when it can.
    pub(super) fn finish(
        &mut self,
        index: i32,
        ending: Ending,
        delivery: Delivery,
        ctx: &mut Context<Self>,
    ) {
        if self
            .at(index)
            .is_none_or(|t| t.m.phase() == Phase::Finishing)
        {
            return;
        }
        self.remember_response(index, &ending);
        let Some(turn) = self.turns.iter_mut().find(|t| t.index == index) else {
            return;
        };
        // After a terminal, the upstream may start a successor on its own (steering).
        let template =
            steer::Template::of(&turn.frame, &turn.model, turn.m.tracker.response_id.clone());
        let steer = self.steers.entry(turn.frame.stream_id.clone()).or_default();
        let unused = steer.turn_ended(&ending, template);
        gate::release_reservations(&self.deps, unused);
        turn.generation += 1;
        let on_lease = turn.on_lease();
        let over_http = turn.over_http();
        // The account that served the turn, else the one it was refused on or last tried.
        let held = self
            .up
            .lease
            .as_ref()
            .filter(|_| !over_http)
            .map(|l| l.account.to_string());
        let streaming = turn.m.finished();
        let account = streaming
            .then(|| held.clone())
            .flatten()
            .or_else(|| turn.account_slot.as_ref().map(|s| s.account.clone()))
            .or_else(|| turn.tried.last().cloned())
            .or(held)
            .unwrap_or_default();
        // Slots are free as soon as the turn is over, whatever happens next; the client hears
        // the end once the fleet's count has the key's slot back.
        let released = KeySlot::release(turn.key_slot.take());
        turn.account_slot = None;
        // A refusal because accounting is down does not wait for accounting.
        let wait = ending != Ending::Rejected(ErrorCode::AccountingUnavailable);
        let ending_kind = ending.clone();
        let outcome = turn.m.tracker.finish(ending, Instant::now());
        let Some(turn) = self.at(index) else {
            return;
        };
        let record = self.record_of(turn, outcome, account);
        let remembered = gate::turn_ended(
            &self.deps,
            turn.affinity.as_ref(),
            &record,
            turn.m.tracker.usage_malformed,
            &turn.span,
        );
        let store = turn.frame.store;
        // The fallback answer is the turn's, so it carries the turn's lane.
        let stream_id = turn.frame.stream_id.clone();
        if over_http && !matches!(ending_kind, Ending::Terminal(_)) {
            // A leg still running is stopped (dropping its request stops the upstream).
            self.stop_http_leg(index, ctx);
        }
        if on_lease && !delivery.reusable {
            if self.lease_in_use(Some(index)) {
                // Other lanes still read it: no new turn on it, closed once they end.
                self.up.spent = true;
            } else {
                self.release_lease(false);
            }
        }
        let bind = self.bind_stored(&record, store);
        let durable = self.record(record, wait);
        let durable = async move {
            futures_util::future::join4(durable, bind, released, remembered)
                .await
                .0
        };
        // `wait`: nothing else happens in this session until the record is safe, so the
        // turn's last frame precedes everything after it.
        ctx.wait(durable.into_actor(self).map(move |durable, act, ctx| {
            act.turns.retain(|t| t.index != index);
            act.idle_since = Instant::now();
            act.settle_lease();
            let last = if durable {
                delivery.last
            } else {
                warn!(parent: &act.span, "turn record not durable in time: accounting_unavailable instead of the terminal event");
                Some(
                    ErrorCode::AccountingUnavailable
                        .ws_event_on(ACCOUNTING_UNAVAILABLE, stream_id.as_deref())
                        .to_string(),
                )
            };
            if let Some(last) = last {
                act.send(last, ctx);
            }
            if let Some(close) = delivery.close {
                act.close_when_idle.get_or_insert(close);
            }
            if act.turns.is_empty() {
                if let Some((code, reason)) = act.close_when_idle {
                    return act.close(code, reason, ctx);
                }
                if act.client.gone {
                    return act.stop_when_drained(ctx);
                }
            }
            // What waits behind starts (a lane expecting a successor waits for it).
            act.pump(ctx);
        }));
    }

    /// Hands a record to accounting; resolves to whether it is durable in time.
    pub(super) fn record(
        &self,
        record: TurnRecord,
        wait: bool,
    ) -> impl Future<Output = bool> + 'static {
        gate::make_durable(&self.deps, record, wait, self.standing.as_ref())
    }
}
