//! Preemption (docs/DESIGN.md#preemption): the old response is cancelled and drained in the background for
//! its usage while the new turn runs.

use super::*;

impl SessionActor {
    /// Preempts the streaming turn (docs/DESIGN.md#preemption): the client is told at once and the new turn
    /// starts on a fresh lease, while the old connection gets `response.cancel` and is read in
    /// the background, up to `session.drain_ms`, for the old response's terminal usage.
    pub(super) fn preempt_streaming(&mut self, event: String, ctx: &mut Context<Self>) {
        let (Some(mut turn), Some(lease)) = (self.turn.take(), self.lease.take()) else {
            return;
        };
        self.generation += 1;
        turn.key_slot = None;
        turn.account_slot = None;
        turn.phase = Phase::Finishing;
        let id = turn.tracker.response_id.clone();
        let cancel = match id {
            Some(id) => json!({"type": "response.cancel", "response_id": id}),
            None => json!({"type": "response.cancel"}),
        };
        lease.addr.do_send(SendText(cancel.to_string().into()));
        debug!(parent: &turn.span, conn = lease.conn, "preempted; draining the old response in the background");
        let now = Instant::now();
        self.drains.push(Drain {
            lease,
            turn,
            ended_at: now,
            deadline: now + Duration::from_millis(self.deps.settings.session.drain_ms),
        });
        self.idle_since = now;
        self.send(event, ctx);
        self.start_next(ctx);
    }

    /// An upstream event for a drained connection; `None` means the connection was lost.
    pub(super) fn on_drain_event(
        &mut self,
        conn: u64,
        text: Option<ByteString>,
        ctx: &mut Context<Self>,
    ) {
        let Some(i) = self.drains.iter().position(|d| d.lease.conn == conn) else {
            return;
        };
        let Some(text) = text else {
            return self.end_drain(i, false, ctx);
        };
        let d = &mut self.drains[i];
        match d.turn.tracker.observe(&text, Instant::now()).kind {
            EventKind::Terminal(_) => self.end_drain(i, true, ctx),
            EventKind::Invalid => self.end_drain(i, false, ctx),
            EventKind::Error => {
                let (_, request_level) = upstream_error_code(&text);
                self.end_drain(i, request_level, ctx)
            }
            _ => {}
        }
    }

    /// A drain is over: the connection goes back (clean only after a terminal), and the
    /// preempted turn is recorded with what the drain saw.
    pub(super) fn end_drain(&mut self, i: usize, clean: bool, ctx: &mut Context<Self>) {
        let d = self.drains.swap_remove(i);
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

    /// Gives a drained connection back and makes the preempted turn's record from what the
    /// drain saw (the upstream's usage, or the estimates).
    pub(super) fn close_drain(&self, d: &Drain, clean: bool) -> TurnRecord {
        self.release(&d.lease, clean);
        let outcome = d.turn.tracker.finish(Ending::Preempted, d.ended_at);
        let record = self.record_of(&d.turn, outcome, d.lease.account.to_string());
        crate::telemetry::turn_ended(&record, d.turn.tracker.usage_malformed);
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
