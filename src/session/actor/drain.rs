//! Preemption (docs/DESIGN.md#preemption): the old response is cancelled and drained in the background for
//! its usage while the new turn runs.

use super::*;
use crate::session::turn::{self, Step};

impl SessionActor {
    /// Preempts streaming turn `index` (docs/DESIGN.md#preemption): the client is told at once;
    /// the old response gets `response.cancel` and is read in the background, up to
    /// `session.drain_ms`, for its terminal usage. When no other lane uses the connection the
    /// drain takes it and the lane's next turn gets a fresh lease; otherwise the drain reads
    /// its lane's events on the shared connection, where the upstream answers a lane in order.
    pub(super) fn preempt_streaming(&mut self, index: i32, event: String, ctx: &mut Context<Self>) {
        let Some(pos) = self.turns.iter().position(|t| t.index == index) else {
            return;
        };
        let Some((conn, account)) = self
            .up
            .lease
            .as_ref()
            .map(|l| (l.conn, l.account.to_string()))
        else {
            return;
        };
        let shared = self.lease_in_use(Some(index));
        let mut turn = self.turns.remove(pos);
        turn.generation += 1;
        turn.key_slot = None;
        turn.account_slot = None;
        let mut cancel = match turn.m.tracker.response_id.clone() {
            Some(id) => json!({"type": "response.cancel", "response_id": id}),
            None => json!({"type": "response.cancel"}),
        };
        if let Some(lane) = &turn.frame.stream_id {
            cancel["stream_id"] = json!(lane);
        }
        if let Some(lease) = &self.up.lease {
            lease.addr.do_send(SendText(cancel.to_string().into()));
        }
        let lease = if shared { None } else { self.up.lease.take() };
        debug!(parent: &turn.span, conn, shared, "preempted; draining the old response in the background");
        let now = Instant::now();
        self.drains.push(Drain {
            lease,
            conn,
            account,
            turn,
            ended_at: now,
            deadline: now + Duration::from_millis(self.deps.settings.session.drain_ms),
        });
        self.idle_since = now;
        self.send(event, ctx);
        self.pump(ctx);
    }

    /// An upstream event for a connection a drain owns; `None` means the connection was lost.
    pub(super) fn on_drain_event(
        &mut self,
        conn: u64,
        text: Option<ByteString>,
        ctx: &mut Context<Self>,
    ) {
        let Some(i) = self
            .drains
            .iter()
            .position(|d| d.lease.as_ref().is_some_and(|l| l.conn == conn))
        else {
            return;
        };
        match text {
            Some(text) => self.on_drain_text(i, text, ctx),
            None => self.end_drain(i, false, ctx),
        }
    }

    /// An event of drain `i`'s response.
    pub(super) fn on_drain_text(&mut self, i: usize, text: ByteString, ctx: &mut Context<Self>) {
        let d = &mut self.drains[i];
        // Its client was told already: nothing is relayed, nothing recovered.
        let relayed = turn::Relayed {
            forwarded: true,
            replayed: true,
        };
        match turn::step(&mut d.turn.m.tracker, &text, Instant::now(), relayed) {
            Step::End { reusable, .. } => self.end_drain(i, reusable, ctx),
            Step::Invalid => self.end_drain(i, false, ctx),
            Step::Forward | Step::Steer(_) => {}
        }
    }

    /// A drain is over: a connection it owns goes back (clean only after a terminal), and the
    /// preempted turn is recorded with what the drain saw.
    pub(super) fn end_drain(&mut self, i: usize, clean: bool, ctx: &mut Context<Self>) {
        let d = self.drains.swap_remove(i);
        if d.lease.is_none() && !clean && self.up.lease.as_ref().is_some_and(|l| l.conn == d.conn) {
            // Its response may still run on the shared connection: no new turn goes there.
            self.up.spent = true;
        }
        self.settle_lease();
        let record = self.close_drain(&d, clean);
        info!(parent: &d.turn.span, status = %record.status, usage_source = %record.usage_source,
            input_tokens = record.usage.input_tokens, clean, "preempted turn drained");
        // Nobody waits on it: the client was told when the turn was preempted.
        ctx.spawn(
            self.record(record, false)
                .into_actor(self)
                .map(|_, act, ctx| {
                    if act.stop_after_drains && act.drains.is_empty() {
                        ctx.stop();
                    }
                }),
        );
    }

    /// Gives a connection the drain owns back and makes the preempted turn's record from what
    /// the drain saw (the upstream's usage, or the estimates).
    pub(super) fn close_drain(&self, d: &Drain, clean: bool) -> TurnRecord {
        if let Some(lease) = &d.lease {
            self.release(lease, clean);
        }
        let outcome = d.turn.m.tracker.finish(Ending::Preempted, d.ended_at);
        let record = self.record_of(&d.turn, outcome, d.account.clone());
        crate::telemetry::turn_ended(&record, d.turn.m.tracker.usage_malformed);
        crate::telemetry::record_turn(&d.turn.span, &record);
        record
    }

    /// Stops the session once no preempted turn is still draining.
    pub(super) fn stop_when_drained(&mut self, ctx: &mut Context<Self>) {
        if self.drains.is_empty() {
            ctx.stop();
        } else {
            self.stop_after_drains = true;
        }
    }
}
