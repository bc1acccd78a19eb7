//! Mid-turn steering (docs/DESIGN.md#steering): `response.steer` is admitted as the turn it
//! will cause (a key that cannot pay gets a `response.steer.failed`-shaped refusal and nothing
//! goes upstream), forwarded, and the successor the upstream then starts on its own — after the
//! steered response ends `incomplete` (`steered`), or after a normal completion — is a turn of
//! its own (`origin = 'steer'`), timed from its `response.created`, billed like any turn.

use super::*;
use crate::protocol::events::{SteerKind, TerminalKind, classify};

/// What an automatic successor inherits from the response it follows.
#[derive(Debug, Clone)]
pub(super) struct Template {
    model: String,
    store: bool,
    previous: Option<String>,
}

impl Template {
    pub(super) fn of(frame: &CreateFrame, model: &str, previous: Option<String>) -> Self {
        Self {
            model: model.to_string(),
            store: frame.store,
            previous,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct SteerState {
    /// Steers the upstream accepted that no successor has taken up yet.
    accepted: u32,
    /// Inputs of the steers sent: the successor's input (history, input estimate).
    inputs: Vec<Value>,
    /// Since when a successor is expected (what waits behind it waits for it too).
    awaiting_since: Option<Instant>,
    /// The settings of the last response that ended, which a successor inherits.
    template: Option<Template>,
    /// Turn ids reserved for successors (one per steer sent by a limited key), oldest first:
    /// the successor takes the first; the others are released.
    reserved: Vec<String>,
}

impl SteerState {
    /// An upstream `response.steer.*` event of the turn in flight; returns the reservations
    /// that no successor will use.
    pub(super) fn observe(&mut self, kind: SteerKind, text: &str) -> Vec<String> {
        match kind {
            SteerKind::Accepted => {
                self.accepted += 1;
                Vec::new()
            }
            SteerKind::Failed => {
                // A failure after acceptance names the steer; one before it names none.
                let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                if v.pointer("/steer/id").is_some() {
                    self.accepted = self.accepted.saturating_sub(1);
                }
                if self.accepted == 0 {
                    self.inputs.clear();
                }
                // The failed steer's reservation goes.
                if self.reserved.is_empty() {
                    Vec::new()
                } else {
                    vec![self.reserved.remove(0)]
                }
            }
            // The response waits for the client's tool output: no automatic successor (the
            // client sends explicit creates).
            SteerKind::Pending => self.give_up(),
        }
    }

    /// No successor will come: forget the steers; returns their reservations.
    fn give_up(&mut self) -> Vec<String> {
        self.accepted = 0;
        self.inputs.clear();
        self.awaiting_since = None;
        std::mem::take(&mut self.reserved)
    }

    /// The lane's turn ended: when the upstream will start a successor on its own, the lane
    /// awaits it; otherwise the steers' reservations are returned for release.
    pub(super) fn turn_ended(&mut self, ending: &Ending, template: Template) -> Vec<String> {
        let terminal = matches!(
            ending,
            Ending::Terminal(TerminalKind::Completed | TerminalKind::Incomplete)
        );
        if terminal {
            self.template = Some(template);
        }
        if terminal && self.accepted > 0 {
            self.awaiting_since = Some(Instant::now());
            Vec::new()
        } else {
            self.give_up()
        }
    }

    /// The connection is gone: no successor will come on it.
    pub(super) fn connection_lost(&mut self) -> Vec<String> {
        if self.awaiting() {
            self.give_up()
        } else {
            Vec::new()
        }
    }

    pub(super) fn awaiting(&self) -> bool {
        self.awaiting_since.is_some()
    }

    /// A successor expected for longer than `limit` is given up on (once): the reservations
    /// to release, `None` when not overdue.
    pub(super) fn successor_overdue(
        &mut self,
        now: Instant,
        limit: Duration,
    ) -> Option<Vec<String>> {
        let overdue = self
            .awaiting_since
            .is_some_and(|since| now.duration_since(since) >= limit);
        overdue.then(|| self.give_up())
    }

    /// Reservations still held (the successor takes the first; the session ends).
    pub(super) fn take_reserved(&mut self) -> Vec<String> {
        std::mem::take(&mut self.reserved)
    }

    /// The successor's input: the steers' inputs, in order.
    fn take_input(&mut self) -> Option<Value> {
        let inputs = std::mem::take(&mut self.inputs);
        let message = |v: Value| match v {
            Value::String(text) => vec![json!({"role": "user", "content": text})],
            Value::Array(items) => items,
            other => vec![other],
        };
        match inputs.len() {
            0 => None,
            1 => inputs.into_iter().next(),
            _ => Some(Value::Array(inputs.into_iter().flat_map(message).collect())),
        }
    }
}

/// The refusal of a steer by the relay, shaped as the upstream's `response.steer.failed` (the
/// input handed back), with the relay's error code.
fn steer_refused(steer: &Value, code: ErrorCode, message: &str, stream_id: Option<&str>) -> String {
    let spec = code.spec();
    let mut v = json!({
        "type": "response.steer.failed",
        "steer": {
            "previous_response_id": steer.get("previous_response_id").cloned().unwrap_or(Value::Null),
            "input": steer.get("input").cloned().unwrap_or(Value::Null),
        },
        "error": {"type": spec.error_type, "code": spec.code, "message": message},
    });
    if let Some(id) = stream_id {
        v["stream_id"] = json!(id);
    }
    v.to_string()
}

impl SessionActor {
    /// `response.steer`: the successor it will cause is admitted first (standing, quota and
    /// balance, accounting, accounts) and, for a limited key, its expected cost reserved under
    /// the turn id it will have; refused → `response.steer.failed` from the relay and nothing
    /// upstream. Admitted → forwarded unchanged, if the response is still running.
    pub(super) fn on_steer(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let steer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let (target, lane) = self.target_of(&text);
        if target.and_then(|i| self.at(i)).is_some_and(Turn::over_http) {
            // Nothing to send it on: the response runs over an HTTP leg.
            let e = steer_refused(
                &steer,
                ErrorCode::NoActiveResponse,
                "this response runs over HTTP (its account's upstream WebSocket cannot carry it) and cannot be steered; send a new response.create",
                lane.as_deref(),
            );
            return self.send(e, ctx);
        }
        if !self.steerable(&lane) {
            // Answered as the upstream answers a steer that raced its response's end: the
            // input handed back, never a bare `error` (docs/DESIGN.md#steering).
            let e = steer_refused(
                &steer,
                ErrorCode::NoActiveResponse,
                "no response is in flight to steer (it may have just ended); send a new response.create",
                lane.as_deref(),
            );
            return self.send(e, ctx);
        }
        let admitted = self
            .read_standing()
            .into_actor(self)
            .map(move |res, act, ctx| {
                if let Some((code, message)) = act.refusal(res) {
                    let e = steer_refused(&steer, code, &message, lane.as_deref());
                    return act.send(e, ctx);
                }
                let successor = TurnId::random().to_string();
                let input_bytes = steer.get("input").map_or(0, |v| v.to_string().len());
                let model = act.model.clone().unwrap_or_default();
                let Some(reservation) = act.reservation_for(gate::ReservationAsk {
                    request_id: successor.clone(),
                    model: &model,
                    service_tier: None,
                    previous_response_id: None,
                    warmup: false,
                    prompt_bytes: input_bytes,
                    max_output_tokens: None,
                }) else {
                    return act.forward_steer(steer, text, None, lane, ctx);
                };
                let reserve = act.take_reservation(reservation);
                ctx.spawn(reserve.into_actor(act).map(move |res, act, ctx| match res {
                    Ok(()) => act.forward_steer(steer, text, Some(successor), lane, ctx),
                    Err((code, message)) => {
                        let e = steer_refused(&steer, code, message, lane.as_deref());
                        act.send(e, ctx);
                    }
                }));
            });
        ctx.spawn(admitted);
    }

    /// A response is running on `lane` on a held connection.
    fn steerable(&self, lane: &LaneId) -> bool {
        self.up.lease.is_some()
            && self
                .turns
                .iter()
                .any(|t| &t.frame.stream_id == lane && t.on_lease())
    }

    /// Sends an admitted steer upstream if its response still runs; else it is refused and
    /// its reservation released.
    fn forward_steer(
        &mut self,
        steer: Value,
        text: ByteString,
        reserved: Option<String>,
        lane: LaneId,
        ctx: &mut Context<Self>,
    ) {
        if !self.steerable(&lane) {
            self.release_reservations(reserved.into_iter().collect());
            let e = steer_refused(
                &steer,
                ErrorCode::NoActiveResponse,
                "the response ended before the steer could be sent",
                lane.as_deref(),
            );
            return self.send(e, ctx);
        }
        if let Some(lease) = &self.up.lease {
            lease.addr.do_send(SendText(text));
        }
        let state = self.steers.entry(lane).or_default();
        if let Some(input) = steer.get("input") {
            state.inputs.push(input.clone());
        }
        state.reserved.extend(reserved);
    }

    /// An upstream frame of a lane with no turn streaming. A `response.created` is a successor
    /// the upstream started on its own: a turn of its own. On a lane with no turn at all, any
    /// other event but a terminal or an error came after its response's end and is forwarded.
    /// A terminal or an error there, or any event for a lane whose next turn has not started
    /// streaming, is a protocol error, logged once per session and not forwarded (the other
    /// lanes go on); a frame that is not an event at all leaves the connection in an unknown
    /// state: it is dropped.
    pub(super) fn on_unattributed(
        &mut self,
        lane: LaneId,
        text: ByteString,
        ctx: &mut Context<Self>,
    ) {
        let kind = classify(&text);
        let idle_lane = !self.turns.iter().any(|t| t.frame.stream_id == lane);
        if idle_lane && self.up.lease.is_some() && kind == EventKind::Created {
            return self.start_successor(lane, text, ctx);
        }
        if kind == EventKind::Invalid {
            return self.drop_connection(
                LostReason::Protocol("the upstream sent a frame that is not a JSON event"),
                ctx,
            );
        }
        if kind == EventKind::Error && lane.is_none() {
            // An error of no lane while only named lanes run concerns the connection: every
            // turn on it ends (each retried once when nothing of it was forwarded).
            let code = crate::session::turn::read_error(&text).code;
            let code = code.unwrap_or_else(|| "error".into());
            warn!(parent: &self.span, code = %code, "upstream error outside any lane; the connection goes");
            return self.drop_connection(
                LostReason::Error(format!("upstream error outside any lane: {code}")),
                ctx,
            );
        }
        if idle_lane && !matches!(kind, EventKind::Terminal(_) | EventKind::Error) {
            // An event after its response's terminal (`codex.rate_limits`, a steer's answer
            // that raced the end, …) reaches the client as it would direct, until the lane's
            // next create (docs/DESIGN.md#late-events).
            if let EventKind::Steer(k) = kind {
                let unused = self.steers.entry(lane).or_default().observe(k, &text);
                self.release_reservations(unused);
            }
            return self.send(text, ctx);
        }
        ::metrics::counter!(metric::UPSTREAM_ERRORS, "code" => "unattributed_frame").increment(1);
        if !self.unattributed_logged {
            self.unattributed_logged = true;
            warn!(parent: &self.span, lane = ?lane, "upstream frame for a lane with no response in flight (not a successor's response.created); not forwarded");
        }
    }

    /// The upstream's automatic successor on `lane`: a turn timed from its `response.created`,
    /// on the connection the steered response used.
    fn start_successor(&mut self, lane: LaneId, created: ByteString, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let last = self.lineages.last_of(&lane).map(|(id, _)| id.to_string());
        let model = self.model.clone().unwrap_or_default();
        let state = self.steers.entry(lane.clone()).or_default();
        let template = state.template.clone().unwrap_or(Template {
            model,
            store: false,
            previous: last,
        });
        let input = state.take_input();
        state.accepted = 0;
        state.awaiting_since = None;
        // The first reservation is the successor's (its record settles it); others go.
        let mut reserved = state.take_reserved().into_iter();
        let id = reserved.next();
        self.release_reservations(reserved.collect());
        let prompt_bytes = input.as_ref().map_or(0, |v| v.to_string().len());
        let frame = CreateFrame {
            raw: String::new(),
            model: Some(template.model.clone()),
            previous_response_id: template.previous,
            store: template.store,
            warmup: false,
            has_tool_output: false,
            prompt_bytes,
            input,
            max_output_tokens: None,
            stream_id: lane,
            stream: false,
            background: false,
            prompt_cache_key: None,
            service_tier: None,
            compaction: false,
        };
        let mut turn = self.new_turn(frame, template.model, now, Origin::Steer, id);
        // Nothing of it was sent by the relay: it cannot be retried or replayed elsewhere.
        turn.m.started_upstream(now);
        info!(parent: &turn.span, "the upstream started a successor (steering)");
        self.turns.push(turn);
        self.park(false);
        self.on_upstream_text(created, ctx);
    }
}
