//! One simulated upstream socket: validates `response.create`, executes the turn's plan step by
//! step (delays, events, faults), keeps the connection-local cache, pings, and ages out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorContext, AsyncContext, SpawnHandle, StreamHandler};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use serde_json::{Value, json};

use super::events::{self, Ids, Remembered, Step, wrapped_error};
use super::monotonic_ns;
use super::script::Script;
use super::server::SimShared;
use crate::protocol::frames::valid_stream_id;

const LIMIT_MESSAGE: &str = "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.";

struct InFlight {
    steps: VecDeque<Step>,
    remembered: Remembered,
    completes: bool,
    store: bool,
    timer: Option<SpawnHandle>,
    /// The request, for the successor a steer starts.
    req: Value,
    /// A steer lets it complete rather than ending it `steered`.
    steer_completes: bool,
}

// Responses in flight on one connection (more are queued on their lanes), named lanes one
// connection may open: the upstream's limits.
use crate::protocol::frames::{MAX_IN_FLIGHT, MAX_NAMED_LANES};

/// One lane (`stream_id`; `""` is the implicit default lane): its FIFO of creates and the
/// response it runs.
#[derive(Default)]
struct Lane {
    in_flight: Option<InFlight>,
    queue: VecDeque<Value>,
    /// The latest response this lane produced (the connection-local cache holds each lane's).
    latest: Option<Remembered>,
}

pub struct SimConn {
    id: u64,
    shared: Arc<SimShared>,
    opened: Instant,
    last_pong: Instant,
    lanes: std::collections::HashMap<String, Lane>,
    ignore_pings: bool,
    /// The age limit passed during a response; enforced when it ends.
    aged_out: bool,
}

impl SimConn {
    pub fn new(id: u64, shared: Arc<SimShared>) -> Self {
        let now = Instant::now();
        Self {
            id,
            shared,
            opened: now,
            last_pong: now,
            lanes: std::collections::HashMap::new(),
            ignore_pings: false,
            aged_out: false,
        }
    }

    fn in_flight(&self) -> usize {
        self.lanes
            .values()
            .filter(|l| l.in_flight.is_some())
            .count()
    }

    /// Sends an event of `lane` (tagged with its `stream_id` when named).
    fn send_event(&mut self, lane: &str, mut event: Value, ctx: &mut WebsocketContext<Self>) {
        if !lane.is_empty() {
            event["stream_id"] = json!(lane);
        }
        event["sim_ts_ns"] = json!(monotonic_ns());
        let text = event.to_string();
        self.shared.frame(self.id, "out", || text.clone());
        ctx.text(text);
    }

    fn close(&mut self, code: u16, why: &str, ctx: &mut WebsocketContext<Self>) {
        self.shared
            .frame(self.id, "out", || format!("<close {code}>"));
        ctx.close(Some(CloseReason {
            code: CloseCode::from(code),
            description: (!why.is_empty()).then(|| why.to_string()),
        }));
        ctx.stop();
    }

    /// A `response.create`: refused for a bad lane or lane limit, else queued on its lane
    /// (FIFO) and started when the lane and the connection have room.
    fn on_create(&mut self, req: Value, ctx: &mut WebsocketContext<Self>) {
        if self.shared.config.refuse_stream_id && req.get("stream_id").is_some() {
            // What a backend without lanes answers (its words, its code: none).
            let e = wrapped_error(
                400,
                None,
                "Unsupported parameter: stream_id",
                Some("stream_id"),
            );
            return self.send_event("", e, ctx);
        }
        let lane = match req.get("stream_id") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(id)) if valid_stream_id(id) => id.clone(),
            Some(_) => {
                let e = wrapped_error(
                    400,
                    Some("invalid_stream_id"),
                    "stream_id must be 1-256 characters of letters, digits, '_', '.' or '-'.",
                    Some("stream_id"),
                );
                return self.send_event("", e, ctx);
            }
        };
        let named = self.lanes.keys().filter(|k| !k.is_empty()).count();
        if !lane.is_empty() && !self.lanes.contains_key(&lane) && named >= MAX_NAMED_LANES {
            let e = wrapped_error(
                400,
                Some("websocket_stream_limit_reached"),
                "This connection has its maximum of 32 named streams.",
                Some("stream_id"),
            );
            return self.send_event(&lane, e, ctx);
        }
        self.lanes
            .entry(lane.clone())
            .or_default()
            .queue
            .push_back(req);
        self.start_queued(ctx);
    }

    /// Starts the head of every lane that runs nothing, while the connection has room.
    fn start_queued(&mut self, ctx: &mut WebsocketContext<Self>) {
        loop {
            if self.in_flight() >= MAX_IN_FLIGHT {
                return;
            }
            let Some(lane) = self
                .lanes
                .iter()
                .find(|(_, l)| l.in_flight.is_none() && !l.queue.is_empty())
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            let Some(req) = self.lanes.get_mut(&lane).and_then(|l| l.queue.pop_front()) else {
                return;
            };
            self.start(&lane, req, ctx);
        }
    }

    fn start(&mut self, lane: &str, req: Value, ctx: &mut WebsocketContext<Self>) {
        let directive = events::directive_of(&req);
        let mut script = match directive.as_deref().map(Script::parse) {
            None => Script::default(),
            Some(Ok(s)) => s,
            Some(Err(why)) => {
                let e = wrapped_error(
                    400,
                    Some("invalid_sim_directive"),
                    &why,
                    Some("metadata.sim"),
                );
                return self.send_event(lane, e, ctx);
            }
        };
        if script.once
            && !self
                .shared
                .fire_once(directive.as_deref().unwrap_or_default())
        {
            script.fault = None;
        }
        let cached: Vec<Remembered> = self
            .lanes
            .values()
            .filter_map(|l| l.latest.clone())
            .collect();
        let shared = self.shared.clone();
        let known = |id: &str| {
            cached
                .iter()
                .find(|r| r.response_id == id)
                .cloned()
                .or_else(|| shared.stored(id))
        };
        if let Err(e) = events::check_request(&req, known) {
            return self.send_event(lane, e, ctx);
        }
        self.ignore_pings |= script.ignore_pings;
        let (_, tag) = self.shared.next_tag();
        let created_at = chrono::Utc::now().timestamp();
        let plan = events::plan(&req, &script, &Ids::new(&tag), created_at);
        self.shared.response_started(self.id);
        if let Some(l) = self.lanes.get_mut(lane) {
            l.in_flight = Some(InFlight {
                steps: plan.steps,
                remembered: plan.remembered,
                completes: plan.completes,
                store: req.get("store").and_then(Value::as_bool).unwrap_or(true),
                timer: None,
                steer_completes: script.steer_completes,
                req,
            });
        }
        self.pump(lane.to_string(), ctx);
    }

    /// Executes a lane's steps until a delay, a stall or the end of its plan.
    fn pump(&mut self, lane: String, ctx: &mut WebsocketContext<Self>) {
        loop {
            let Some(flight) = self.lanes.get_mut(&lane).and_then(|l| l.in_flight.as_mut()) else {
                return;
            };
            flight.timer = None;
            let Some(step) = flight.steps.pop_front() else {
                return self.finish(&lane, ctx);
            };
            match step {
                Step::Event(e) => self.send_event(&lane, e, ctx),
                Step::Text(t) => {
                    self.shared.frame(self.id, "out", || t.clone());
                    ctx.text(t);
                }
                Step::Binary(b) => {
                    self.shared
                        .frame(self.id, "out", || format!("<binary {} bytes>", b.len()));
                    ctx.binary(b);
                }
                Step::Delay(d) => {
                    let again = lane.clone();
                    let handle = ctx.run_later(d, move |act, ctx| act.pump(again, ctx));
                    flight.timer = Some(handle);
                    return;
                }
                Step::Close(code) => return self.close(code, "simulated close", ctx),
                Step::Drop => {
                    // Stopping without a close frame ends the TCP connection bare.
                    self.shared.frame(self.id, "out", || "<drop>".into());
                    ctx.stop();
                    return;
                }
                // In flight forever: no further event; the lane's next create waits.
                Step::Stall => return,
            }
        }
    }

    fn finish(&mut self, lane: &str, ctx: &mut WebsocketContext<Self>) {
        let failed = match self.lanes.get_mut(lane).and_then(|l| l.in_flight.take()) {
            Some(flight) if flight.completes => {
                if flight.store {
                    self.shared.store(flight.remembered.clone());
                }
                if let Some(l) = self.lanes.get_mut(lane) {
                    l.latest = Some(flight.remembered);
                }
                None
            }
            Some(flight) => flight
                .req
                .get("previous_response_id")
                .and_then(Value::as_str)
                .map(str::to_string),
            None => None,
        };
        // A continuation that failed evicts the response it continued from this socket's cache
        // (as the service does): its next continuation is `previous_response_not_found`.
        if let Some(previous) = failed {
            for l in self.lanes.values_mut() {
                if l.latest.as_ref().is_some_and(|r| r.response_id == previous) {
                    l.latest = None;
                }
            }
        }
        if self.aged_out && self.in_flight() == 0 {
            return self.age_out(ctx);
        }
        self.start_queued(ctx);
    }

    /// `response.steer` (mid-turn steering): accepted for a response in flight — the successor
    /// (the request with the steering input, continuing the steered response) is queued first
    /// on its lane, and the response ends `incomplete` (reason `steered`) at once, or completes
    /// normally under `steer_completes`; refused (`response.steer.failed`) otherwise.
    fn on_steer(&mut self, req: &Value, ctx: &mut WebsocketContext<Self>) {
        let prev = req
            .get("previous_response_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let input = req.get("input").cloned().unwrap_or(Value::Null);
        let lane = self
            .lanes
            .iter()
            .find(|(_, l)| {
                l.in_flight
                    .as_ref()
                    .is_some_and(|f| f.remembered.response_id == prev)
            })
            .map(|(k, _)| k.clone());
        let Some(lane) = lane else {
            let e = json!({"type": "response.steer.failed",
                "steer": {"previous_response_id": prev, "input": input},
                "error": {"code": "response_not_active", "message": "No active response with this id on this connection."}});
            return self.send_event("", e, ctx);
        };
        let (_, tag) = self.shared.next_tag();
        let accepted = json!({"type": "response.steer.accepted",
            "steer": {"id": format!("steer_{tag}"), "previous_response_id": prev}});
        self.send_event(&lane, accepted, ctx);
        let Some(l) = self.lanes.get_mut(&lane) else {
            return;
        };
        let Some(flight) = l.in_flight.as_mut() else {
            return;
        };
        let mut successor = flight.req.clone();
        successor["input"] = input;
        successor["previous_response_id"] = json!(prev);
        if let Some(m) = successor.as_object_mut() {
            m.remove("metadata");
        }
        l.queue.push_front(successor);
        if flight.steer_completes {
            return;
        }
        // Ends at this boundary: the planned terminal, as `incomplete` (steered).
        if let Some(timer) = flight.timer.take() {
            ctx.cancel_future(timer);
        }
        let terminal = flight.steps.iter().rev().find_map(|s| match s {
            Step::Event(e)
                if matches!(
                    e["type"].as_str(),
                    Some("response.completed" | "response.incomplete" | "response.failed")
                ) =>
            {
                Some(e.clone())
            }
            _ => None,
        });
        flight.steps.clear();
        if let Some(mut t) = terminal {
            t["type"] = json!("response.incomplete");
            t["response"]["status"] = json!("incomplete");
            t["response"]["incomplete_details"] = json!({"reason": "steered"});
            flight.steps.push_back(Step::Event(t));
        }
        // The steered response is known to its successor.
        flight.completes = true;
        self.pump(lane, ctx);
    }

    /// `response.cancel` / `response.interrupt`: the named response (`response_id`), else the
    /// lane's (`stream_id`, else the default lane's).
    fn on_cancel(&mut self, req: &Value, ctx: &mut WebsocketContext<Self>) {
        let by_id = req.get("response_id").and_then(Value::as_str);
        let lane = match by_id {
            Some(id) => self
                .lanes
                .iter()
                .find(|(_, l)| {
                    l.in_flight
                        .as_ref()
                        .is_some_and(|f| f.remembered.response_id == id)
                })
                .map(|(k, _)| k.clone()),
            None => Some(
                req.get("stream_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
            ),
        };
        let Some(lane) = lane else {
            return;
        };
        let Some(flight) = self.lanes.get_mut(&lane).and_then(|l| l.in_flight.take()) else {
            return;
        };
        if let Some(timer) = flight.timer {
            ctx.cancel_future(timer);
        }
        let id = flight.remembered.response_id;
        self.send_event(
            &lane,
            json!({"type": "response.cancelled", "response": {"id": id, "object": "response", "status": "cancelled", "usage": null}}),
            ctx,
        );
        self.start_queued(ctx);
    }

    fn age_out(&mut self, ctx: &mut WebsocketContext<Self>) {
        let e = wrapped_error(
            400,
            Some("websocket_connection_limit_reached"),
            LIMIT_MESSAGE,
            None,
        );
        self.send_event("", e, ctx);
        self.close(1000, "", ctx);
    }
}

impl Actor for SimConn {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let cfg = &self.shared.config;
        let (ping_every, pong_timeout, max_age) =
            (cfg.ping_interval, cfg.pong_timeout, cfg.max_age);
        ctx.run_interval(ping_every, move |act, ctx| {
            if act.last_pong.elapsed() > pong_timeout {
                return act.close(1011, "keepalive ping timeout", ctx);
            }
            act.shared.frame(act.id, "out", || "<ping>".into());
            ctx.ping(b"sim");
        });
        // The age limit is checked at the deadline, or when the response in flight ends.
        let wait = max_age.saturating_sub(self.opened.elapsed());
        ctx.run_later(wait.max(Duration::from_millis(1)), |act, ctx| {
            if act.in_flight() > 0 {
                act.aged_out = true;
            } else {
                act.age_out(ctx);
            }
        });
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.shared.closed(self.id);
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for SimConn {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                self.shared
                    .frame(self.id, "in", || format!("<protocol error {e}>"));
                let code = match e {
                    ws::ProtocolError::Overflow => 1009,
                    _ => 1002,
                };
                return self.close(code, "protocol error", ctx);
            }
        };
        match msg {
            ws::Message::Text(text) => {
                self.shared.frame(self.id, "in", || text.to_string());
                let Ok(value) = serde_json::from_str::<Value>(&text) else {
                    let e = wrapped_error(
                        400,
                        Some("invalid_json"),
                        "The message is not valid JSON.",
                        None,
                    );
                    return self.send_event("", e, ctx);
                };
                match value.get("type").and_then(Value::as_str).unwrap_or("") {
                    "" | "response.create" => self.on_create(value, ctx),
                    "response.cancel" | "response.interrupt" => self.on_cancel(&value, ctx),
                    "response.steer" => self.on_steer(&value, ctx),
                    other => {
                        let e = wrapped_error(
                            400,
                            Some("invalid_event_type"),
                            &format!(
                                "Invalid value: '{other}'. Supported values are: 'response.create'."
                            ),
                            Some("type"),
                        );
                        self.send_event("", e, ctx);
                    }
                }
            }
            ws::Message::Binary(b) => {
                self.shared
                    .frame(self.id, "in", || format!("<binary {} bytes>", b.len()));
                let e = wrapped_error(
                    400,
                    Some("invalid_frame"),
                    "Binary frames are not supported.",
                    None,
                );
                self.send_event("", e, ctx);
            }
            ws::Message::Ping(p) => {
                self.shared.frame(self.id, "in", || "<ping>".into());
                if !self.ignore_pings {
                    ctx.pong(&p);
                }
            }
            ws::Message::Pong(_) => {
                self.shared.frame(self.id, "in", || "<pong>".into());
                self.last_pong = Instant::now();
            }
            ws::Message::Close(reason) => {
                let code = reason.as_ref().map_or(1005, |r| u16::from(r.code));
                self.shared
                    .frame(self.id, "in", || format!("<close {code}>"));
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Continuation(_) | ws::Message::Nop => {}
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // EOF from the client without a close frame.
        self.shared.frame(self.id, "in", || "<eof>".into());
        ctx.stop();
    }
}
