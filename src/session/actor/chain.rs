//! Continuation (docs/DESIGN.md#continuation) as the session applies it: the decision before a request is
//! written, what a completed response leaves for the next turn, bindings of stored responses.

use super::*;

impl SessionActor {
    /// The continuation decision for the turn about to run on `conn` (docs/DESIGN.md#continuation).
    /// The chain is the lineage the turn names when this session saw that response end, else
    /// its lane's last response (a bare tool output continues it).
    pub(super) fn continuation(&self, turn: &Turn, conn: u64, not_found: bool) -> Decision {
        let named = turn
            .frame
            .previous_response_id
            .as_deref()
            .and_then(|p| Some((p, self.lineages.conn_of(p)?)));
        let continues = named.or_else(|| self.lineages.last_of(&turn.frame.stream_id));
        let same_connection = continues.is_some_and(|(_, c)| c == conn);
        // The history is built only when a replay may need it.
        let history = match continues {
            Some((id, _)) if !same_connection || not_found => self.lineages.history_of(id),
            _ => History::default(),
        };
        let chain = Chain {
            last_response_id: continues.map(|(id, _)| id),
            same_connection,
            history: &history,
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
        let (Some(turn), Some(lease)) = (self.at(index), self.up.lease.as_ref()) else {
            return;
        };
        let decision = self.continuation(turn, lease.conn, false);
        self.read_directly(ctx);
        self.write_request(index, decision, ctx);
    }

    pub(super) fn write_request(
        &mut self,
        index: i32,
        decision: Decision,
        ctx: &mut Context<Self>,
    ) {
        // A replay can make a request larger than its account's WebSocket takes.
        let frame_max = self
            .at(index)
            .and_then(|t| t.account_slot.as_ref())
            .map_or(usize::MAX, |s| self.frame_max_of(&s.account));
        let Some(turn) = self.turns.iter_mut().find(|t| t.index == index) else {
            return;
        };
        let lease = self.up.lease.as_ref();
        if lease.is_none() && !turn.over_http() {
            return;
        }
        let decision = match decision {
            Decision::Replay { .. } if turn.m.replayed() => Decision::FailClosed {
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
            }
            Decision::Inject(id) => {
                debug!(parent: &turn.span, previous_response_id = %id, "continuation: tool output continues the last response");
            }
            _ => {}
        }
        turn.parent = match &decision {
            Decision::Inject(id) => Some(id.clone()),
            _ => turn.frame.previous_response_id.clone(),
        };
        let raw = rewritten.unwrap_or_else(|| turn.frame.raw.clone());
        let now = Instant::now();
        let socket = lease.filter(|_| !turn.over_http() && raw.len() <= frame_max);
        let sent = Input::Sent {
            leg: if socket.is_some() {
                machine::Leg::Socket
            } else {
                machine::Leg::Http
            },
            replayed: matches!(decision, Decision::Replay { .. }),
        };
        turn.m.step(sent, now);
        match socket {
            Some(lease) => {
                if turn.frame.stream_id.is_some() {
                    self.up.named_on.insert(lease.conn);
                }
                turn.sent_bytes = raw.len();
                lease.addr.do_send(SendText(ByteString::from(raw)));
                turn.m.tracker.clock.written(now);
                debug!(parent: &turn.span, conn = lease.conn, account = %lease.account, "request written upstream");
            }
            // Its leg says when the request reached the upstream.
            _ => {
                turn.leg = http_leg::Leg::Http(None);
                if !self.start_http_leg(index, &raw, ctx) {
                    self.unreachable(index, Unreachable::Final, ctx);
                }
            }
        }
    }

    /// A response that completed (or is incomplete) joins its lineage: its id is one a next
    /// turn may name, its connection the one that holds it, its input and output what a replay
    /// of its descendants sends.
    pub(super) fn remember_response(&mut self, index: i32, ending: &Ending) {
        use crate::protocol::events::TerminalKind::{Completed, Incomplete};
        // A continuation the upstream refused evicts what it continued from the connection's
        // cache: the next continuation of it replays rather than asking for it there.
        if let (Ending::UpstreamError(_), Some(parent)) =
            (ending, self.at(index).and_then(|t| t.parent.clone()))
        {
            self.lineages.detach(&parent);
        }
        let (Ending::Terminal(Completed | Incomplete), Some(turn), Some(conn)) = (
            ending,
            self.turns.iter().find(|t| t.index == index),
            self.conn_of(index),
        ) else {
            return;
        };
        let Some(id) = turn.m.tracker.response_id.as_deref() else {
            return;
        };
        // A successor continues the steered response; the relay sent nothing of it.
        let parent = turn
            .parent
            .as_deref()
            .or(turn.frame.previous_response_id.as_deref());
        self.lineages.record(
            &turn.frame.stream_id,
            id,
            parent,
            conn,
            turn.frame.input.as_ref(),
            &turn.m.tracker.output,
        );
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
