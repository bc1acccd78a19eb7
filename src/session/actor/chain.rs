//! Continuation (docs/DESIGN.md#continuation) as the session applies it: the decision before a request is
//! written, what a completed response leaves for the next turn, bindings of stored responses.

use super::*;

impl SessionActor {
    /// The continuation decision for the turn about to run on `conn` (docs/DESIGN.md#continuation).
    pub(super) fn continuation(&self, turn: &Turn, conn: u64, not_found: bool) -> Decision {
        let chain = Chain {
            last_response_id: self.last_response.as_ref().map(|(id, _)| id.as_str()),
            same_connection: self.last_response.as_ref().is_some_and(|(_, c)| *c == conn),
            history: &self.history,
        };
        let frame = continuation::Turn {
            previous_response_id: turn.frame.previous_response_id.as_deref(),
            store: turn.frame.store,
            input: turn.frame.input.as_ref(),
        };
        if not_found {
            continuation::after_not_found(chain, frame)
        } else {
            continuation::before_send(chain, frame)
        }
    }

    /// Writes the turn's request on the lease, after the continuation decision: as sent, with
    /// the last response id injected, replayed (once) without the lost id, or not at all
    /// (`continuation_unavailable`).
    pub(super) fn send_upstream(&mut self, index: i32, ctx: &mut Context<Self>) {
        let (Some(turn), Some(lease)) = (self.at(index), self.lease.as_ref()) else {
            return;
        };
        let decision = self.continuation(turn, lease.conn, false);
        self.write_request(index, decision, ctx);
    }

    pub(super) fn write_request(
        &mut self,
        index: i32,
        decision: Decision,
        ctx: &mut Context<Self>,
    ) {
        let Some(turn) = self.turns.iter_mut().find(|t| t.index == index) else {
            return;
        };
        let Some(lease) = self.lease.as_ref() else {
            return;
        };
        let decision = match decision {
            Decision::Replay { .. } if turn.replayed => Decision::FailClosed {
                reason: "the chain was lost again after its conversation was replayed once for this turn; start a new chain".into(),
            },
            d => d,
        };
        let rewritten = continuation::rewrite(&turn.frame.raw, &decision);
        match &decision {
            Decision::FailClosed { reason } => {
                info!(parent: &turn.span, reason = %reason, "continuation: fail closed, nothing sent upstream");
                let e = Self::frame_error(&turn.frame, ErrorCode::ContinuationUnavailable, reason);
                return self.finish(
                    index,
                    Ending::Rejected(ErrorCode::ContinuationUnavailable),
                    Delivery::reusable(Some(e)),
                    ctx,
                );
            }
            Decision::Replay { input, reason } => {
                info!(parent: &turn.span, reason, items = input.len(), "continuation: chain lost; previous_response_id dropped, conversation replayed");
                turn.replayed = true;
            }
            Decision::Inject(id) => {
                debug!(parent: &turn.span, previous_response_id = %id, "continuation: tool output continues the last response");
            }
            _ => {}
        }
        let raw = rewritten.unwrap_or_else(|| turn.frame.raw.clone());
        let now = Instant::now();
        lease.addr.do_send(SendText(ByteString::from(raw)));
        turn.tracker.clock.written(now);
        turn.last_upstream = now;
        turn.phase = Phase::Streaming;
        debug!(parent: &turn.span, conn = lease.conn, account = %lease.account, "request written upstream");
    }

    /// A response that completed (or is incomplete) continues the chain: its id is the one a
    /// next turn may name, its connection the one that holds it, and its input and output
    /// join the history a replay would send.
    pub(super) fn remember_response(&mut self, index: i32, ending: &Ending) {
        use crate::protocol::events::TerminalKind::{Completed, Incomplete};
        let (Ending::Terminal(Completed | Incomplete), Some(turn), Some(lease)) = (
            ending,
            self.turns.iter().find(|t| t.index == index),
            self.lease.as_ref(),
        ) else {
            return;
        };
        let Some(id) = turn.tracker.response_id.clone() else {
            return;
        };
        self.history
            .record_turn(turn.frame.input.as_ref(), &turn.tracker.output);
        self.last_response = Some((id, lease.conn));
    }

    /// A completed `store:true` response is bound to its account before the client hears of it.
    pub(super) fn bind_stored(
        &self,
        record: &TurnRecord,
        store: bool,
    ) -> impl Future<Output = ()> + 'static {
        crate::session::gate::bind_stored(&self.deps, record, store, self.span.clone())
    }
}
