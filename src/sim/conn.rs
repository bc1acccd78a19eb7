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

const LIMIT_MESSAGE: &str = "Responses websocket connection limit reached (60 minutes). Create a new websocket connection to continue.";

struct InFlight {
    steps: VecDeque<Step>,
    remembered: Remembered,
    completes: bool,
    store: bool,
    timer: Option<SpawnHandle>,
}

pub struct SimConn {
    id: u64,
    shared: Arc<SimShared>,
    opened: Instant,
    last_pong: Instant,
    in_flight: Option<InFlight>,
    /// The connection-local cache: the latest response this socket produced.
    latest: Option<Remembered>,
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
            in_flight: None,
            latest: None,
            ignore_pings: false,
            aged_out: false,
        }
    }

    fn send_event(&mut self, mut event: Value, ctx: &mut WebsocketContext<Self>) {
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

    fn on_create(&mut self, req: Value, ctx: &mut WebsocketContext<Self>) {
        if self.in_flight.is_some() {
            let e = wrapped_error(
                400,
                Some("response_already_in_flight"),
                "A response is already in progress on this connection; wait for its terminal event.",
                None,
            );
            return self.send_event(e, ctx);
        }
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
                return self.send_event(e, ctx);
            }
        };
        if script.once
            && !self
                .shared
                .fire_once(directive.as_deref().unwrap_or_default())
        {
            script.fault = None;
        }
        let latest = self.latest.clone();
        let shared = self.shared.clone();
        let known = |id: &str| {
            latest
                .clone()
                .filter(|r| r.response_id == id)
                .or_else(|| shared.stored(id))
        };
        if let Err(e) = events::check_request(&req, known) {
            return self.send_event(e, ctx);
        }
        self.ignore_pings |= script.ignore_pings;
        let (_, tag) = self.shared.next_tag();
        let created_at = chrono::Utc::now().timestamp();
        let plan = events::plan(&req, &script, &Ids::new(&tag), created_at);
        self.shared.response_started(self.id);
        self.in_flight = Some(InFlight {
            steps: plan.steps,
            remembered: plan.remembered,
            completes: plan.completes,
            store: req.get("store").and_then(Value::as_bool).unwrap_or(true),
            timer: None,
        });
        self.pump(ctx);
    }

    /// Executes steps until a delay, a stall or the end of the plan.
    fn pump(&mut self, ctx: &mut WebsocketContext<Self>) {
        loop {
            let Some(flight) = self.in_flight.as_mut() else {
                return;
            };
            flight.timer = None;
            let Some(step) = flight.steps.pop_front() else {
                return self.finish(ctx);
            };
            match step {
                Step::Event(e) => self.send_event(e, ctx),
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
                    let handle = ctx.run_later(d, |act, ctx| act.pump(ctx));
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
                // In flight forever: no further event, a new create is refused.
                Step::Stall => return,
            }
        }
    }

    fn finish(&mut self, ctx: &mut WebsocketContext<Self>) {
        if let Some(flight) = self.in_flight.take()
            && flight.completes
        {
            if flight.store {
                self.shared.store(flight.remembered.clone());
            }
            self.latest = Some(flight.remembered);
        }
        if self.aged_out {
            self.age_out(ctx);
        }
    }

    fn on_cancel(&mut self, ctx: &mut WebsocketContext<Self>) {
        let Some(flight) = self.in_flight.take() else {
            return;
        };
        if let Some(timer) = flight.timer {
            ctx.cancel_future(timer);
        }
        let id = flight.remembered.response_id;
        self.send_event(
            json!({"type": "response.cancelled", "response": {"id": id, "object": "response", "status": "cancelled", "usage": null}}),
            ctx,
        );
    }

    fn age_out(&mut self, ctx: &mut WebsocketContext<Self>) {
        let e = wrapped_error(
            400,
            Some("websocket_connection_limit_reached"),
            LIMIT_MESSAGE,
            None,
        );
        self.send_event(e, ctx);
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
            if act.in_flight.is_some() {
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
                    return self.send_event(e, ctx);
                };
                match value.get("type").and_then(Value::as_str).unwrap_or("") {
                    "" | "response.create" => self.on_create(value, ctx),
                    "response.cancel" | "response.interrupt" => self.on_cancel(ctx),
                    other => {
                        let e = wrapped_error(
                            400,
                            Some("invalid_event_type"),
                            &format!(
                                "Invalid value: '{other}'. Supported values are: 'response.create'."
                            ),
                            Some("type"),
                        );
                        self.send_event(e, ctx);
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
                self.send_event(e, ctx);
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
