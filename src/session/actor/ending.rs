//! The end of a turn: its usage record, made durable before the client hears the end (docs/DESIGN.md#nothing-lost).

use super::*;
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
            transport: crate::record::Transport::Ws,
            span: &turn.span,
        };
        gate::record_of(&self.deps, &self.principal, who, outcome, account)
    }

    /// Ends the turn in flight: its record goes to accounting, and only once accounting has
    /// acknowledged it (durable) does the client get the turn's last frame. Not acknowledged
    /// within `accounting.ack_timeout_ms` → the client gets `accounting_unavailable` instead
    /// (never a terminal without a durable record); the record stays with accounting, which
    /// writes it when it can.
    pub(super) fn finish(&mut self, ending: Ending, delivery: Delivery, ctx: &mut Context<Self>) {
        if self
            .turn
            .as_ref()
            .is_none_or(|t| t.phase == Phase::Finishing)
        {
            return;
        }
        self.remember_response(&ending);
        // After a terminal, the upstream may start a successor on its own (steering).
        let (expect_successor, unused) = self.steer.turn_ended(
            &ending,
            self.turn
                .as_ref()
                .map(|t| steer::Template::of(&t.frame, &t.model, t.tracker.response_id.clone())),
        );
        self.release_reservations(unused);
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        self.generation += 1;
        let streaming = turn.phase == Phase::Streaming;
        turn.phase = Phase::Finishing;
        // The account that served the turn, else the one it was refused on or last tried.
        let account = self
            .lease
            .as_ref()
            .map(|l| l.account.to_string())
            .or_else(|| turn.account_slot.as_ref().map(|s| s.account.clone()))
            .or_else(|| turn.tried.last().cloned())
            .unwrap_or_default();
        // Slots are free as soon as the turn is over, whatever happens next.
        turn.key_slot = None;
        turn.account_slot = None;
        // A refusal because accounting is down does not wait for accounting.
        let wait = ending != Ending::Rejected(ErrorCode::AccountingUnavailable);
        let outcome = turn.tracker.finish(ending, Instant::now());
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        let record = self.record_of(turn, outcome, account);
        gate::turn_ended(
            &self.deps,
            turn.affinity.as_ref(),
            &record,
            turn.tracker.usage_malformed,
            &turn.span,
        );
        if streaming && !delivery.reusable {
            self.release_lease(false);
        }
        let store = self.turn.as_ref().is_some_and(|t| t.frame.store);
        let bind = self.bind_stored(&record, store);
        let durable = self.record(record, wait);
        let durable = async move { futures_util::future::join(durable, bind).await.0 };
        // The fallback answer is the turn's, so it carries the turn's lane.
        let stream_id = self.turn.as_ref().and_then(|t| t.frame.stream_id.clone());
        // `wait`: nothing else happens in this session until the record is safe.
        ctx.wait(durable.into_actor(self).map(move |durable, act, ctx| {
            act.turn = None;
            act.idle_since = Instant::now();
            act.park(true);
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
            if let Some((code, reason)) = delivery.close.or(act.close_after_turn) {
                return act.close(code, reason, ctx);
            }
            if act.client_gone {
                return act.stop_when_drained(ctx);
            }
            // What waits behind starts once the upstream's successor has run.
            if !expect_successor {
                act.start_next(ctx);
            }
        }));
    }

    /// Hands a record to accounting; resolves to whether it is durable in time.
    pub(super) fn record(
        &self,
        record: TurnRecord,
        wait: bool,
    ) -> impl Future<Output = bool> + 'static {
        gate::make_durable(&self.deps, record, wait)
    }
}
