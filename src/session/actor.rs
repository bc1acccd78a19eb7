//! `SessionActor`: one per client WebSocket. Every input — a client frame, an upstream event,
//! an admission or lease result, a timer tick, shutdown — is a message into this one
//! single-threaded state machine (docs/DESIGN.md#turn). This file holds the state, the handlers and the
//! turn lifecycle; the parts of a turn live beside it:
//! `admit` (admission, preemption's admission), `chain` (continuation applied), `drain`
//! (preempted turns drained for their usage), `ending` (the usage record, durable before the
//! client hears the end), `outbound` (writing to the client, backpressure).

mod admit;
mod chain;
mod drain;
mod ending;
mod outbound;
mod steer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use chrono::NaiveDateTime;
use serde_json::{Value, json};
use tracing::{Span, debug, info, info_span, warn};

use super::SessionDeps;
use super::admission::{AccountSlot, KeySlot};
use super::messages::{Describe, EndSession, EndWhenIdle, SessionInfo};
use super::registry::{Register, Unregister};
use super::socket::{ClientInput, ClientReader, ClientTx, Outbound, Read};
use super::turn::{Ending, TurnTracker};
use crate::accounting::messages::RecordTurn;
use crate::auth::{AuthError, Principal};
use crate::continuation::{self, Chain, Decision, History};
use crate::db::models::{ApiKey, User};
use crate::ids::random_hex;
use crate::pool::messages::{Acquire, Lease, LeaseError, Parked, Reclaim, Release};
use crate::protocol::errors::{ErrorCode, close};
use crate::protocol::events::EventKind;
use crate::protocol::frames::{self, ClientFrame, CreateFrame};
use crate::record::{Origin, TurnRecord};
use crate::telemetry::metric;
use crate::upstream::messages::{LostReason, SendText, UpstreamEvent};

use super::gate::ACCOUNTING_UNAVAILABLE;

/// Named lanes (`stream_id`) one session may use: the upstream's limit per connection.
const MAX_NAMED_LANES: usize = 32;

/// Bytes sent between two backpressure pings.
const PING_EVERY_BYTES: u64 = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Admitting,
    Leasing,
    Streaming,
    /// The turn ended; its record is on its way to accounting, its last frame waits for that.
    Finishing,
}

struct Turn {
    index: i32,
    turn_id: String,
    accepted_wall: NaiveDateTime,
    tracker: TurnTracker,
    /// What goes upstream (the client's bytes, with `model` added if it was omitted).
    frame: CreateFrame,
    model: String,
    phase: Phase,
    key_slot: Option<KeySlot>,
    account_slot: Option<AccountSlot>,
    forwarded: u32,
    retried: bool,
    /// The conversation was replayed for this turn (never twice).
    replayed: bool,
    /// The account holding the stored response this turn continues (`response_bindings`).
    bound_account: Option<String>,
    last_upstream: Instant,
    cancel_deadline: Option<Instant>,
    drain_deadline: Option<Instant>,
    /// `Create`, or `Steer` for a successor the upstream started on its own.
    origin: Origin,
    /// Its affinity (docs/DESIGN.md#routing), read at admission.
    affinity: Option<crate::session::gate::Affinity>,
    /// Accounts this turn could not reach (failover goes to the others).
    tried: Vec<String>,
    span: Span,
}

/// A preempted turn whose connection is read in the background (after `response.cancel`) for
/// the old response's terminal usage, which bills it (docs/DESIGN.md#preemption). The client has been told.
struct Drain {
    lease: Lease,
    turn: Turn,
    /// When the turn ended for the client (its duration ends there).
    ended_at: Instant,
    deadline: Instant,
}

/// How a turn's end is delivered to the client.
struct Delivery {
    /// The frame sent after the record is acknowledged (terminal event or error event).
    last: Option<String>,
    /// Whether the upstream connection may serve another turn.
    reusable: bool,
    /// Close the socket afterwards with this code.
    close: Option<(u16, &'static str)>,
}

impl Delivery {
    fn new(last: Option<String>, reusable: bool) -> Self {
        Self {
            last,
            reusable,
            close: None,
        }
    }

    /// The turn's last frame; its connection may serve the next turn.
    fn reusable(last: Option<String>) -> Self {
        Self::new(last, true)
    }

    /// The turn's last frame; its connection is in an unknown state and goes.
    fn spent(last: Option<String>) -> Self {
        Self::new(last, false)
    }

    /// …and the socket closes afterwards with `code`.
    fn then_close(mut self, code: u16, reason: &'static str) -> Self {
        self.close = Some((code, reason));
        self
    }
}

pub struct SessionActor {
    id: String,
    deps: Arc<SessionDeps>,
    principal: Principal,
    /// Last standing read from the database: admission falls back to it while the DB is down.
    standing: Option<(ApiKey, User)>,
    _session_slot: KeySlot,
    headers: Vec<(String, String)>,
    turn_index: i32,
    model: Option<String>,
    lease: Option<Lease>,
    /// The connection of the last lease, preferred for the next one (affinity).
    preferred: Option<u64>,
    /// The conversation so far, for replay when a chain's connection is gone (docs/DESIGN.md#continuation).
    history: History,
    /// The session's last response id, and the connection that holds it.
    last_response: Option<(String, u64)>,
    turn: Option<Turn>,
    /// Preempted turns still being drained for their usage.
    drains: Vec<Drain>,
    /// A `response.create` that would preempt the turn in flight, being admitted.
    preempting: Option<CreateFrame>,
    /// The session ends once its drains are done.
    stop_after_drains: bool,
    /// Bumped whenever an async step (admission, lease) is abandoned, so its late result is ignored.
    generation: u64,
    /// `response.create`s waiting behind the turn in flight, in order, with when each was read
    /// (docs/DESIGN.md#overlap): each gets exactly one answer.
    queued: std::collections::VecDeque<(CreateFrame, Instant)>,
    lease_failures: u32,
    idle_since: Instant,
    opened_at: Instant,
    sent_bytes: u64,
    acked_bytes: u64,
    pinged_at: u64,
    /// The client socket: frames out (no actor in between), and the decoder of what comes in.
    client: ClientTx,
    reader: ClientReader,
    client_gone: bool,
    /// Cut off for not reading (`client_too_slow`): nothing more is queued but the last frame.
    cut_off: bool,
    /// The largest frame sent and possibly unread: (its length, the byte mark that shows it
    /// read).
    largest_unread: (u64, u64),
    close_after_turn: Option<(u16, &'static str)>,
    /// Mid-turn steering: accepted steers, the successor the upstream will start.
    steer: steer::SteerState,
    /// Named lanes this session has used.
    lanes: std::collections::HashSet<String>,
    span: Span,
}

impl SessionActor {
    pub fn new(
        deps: Arc<SessionDeps>,
        principal: Principal,
        session_slot: KeySlot,
        headers: Vec<(String, String)>,
        client: ClientTx,
    ) -> Self {
        let id = format!("sess_{}", random_hex(8));
        let reader = ClientReader::new(deps.settings.limits.client_frame_max_bytes);
        let replay_max = deps.settings.session.replay_max_bytes;
        let span = info_span!("session", session = %id, key = %principal.key_prefix, user = %principal.user_name);
        Self {
            id,
            deps,
            principal,
            standing: None,
            _session_slot: session_slot,
            headers,
            turn_index: 0,
            model: None,
            lease: None,
            preferred: None,
            history: History::new(replay_max),
            last_response: None,
            turn: None,
            drains: Vec::new(),
            preempting: None,
            stop_after_drains: false,
            generation: 0,
            queued: std::collections::VecDeque::new(),
            lease_failures: 0,
            idle_since: Instant::now(),
            opened_at: Instant::now(),
            sent_bytes: 0,
            acked_bytes: 0,
            pinged_at: 0,
            client,
            reader,
            client_gone: false,
            cut_off: false,
            largest_unread: (0, 0),
            close_after_turn: None,
            steer: steer::SteerState::default(),
            lanes: std::collections::HashSet::new(),
            span,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn out(&mut self, msg: Outbound) {
        if !self.client_gone {
            self.client.send(msg);
        }
    }

    // ---- turn start -------------------------------------------------------------------------

    fn on_frame(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let accepted = Instant::now();
        match frames::parse(&text) {
            Err(e) => self.protocol_error(e.code, &e.message, ctx),
            Ok(ClientFrame::Create(frame)) => self.on_create(frame, accepted, ctx),
            Ok(ClientFrame::Cancel) => self.on_cancel(text, ctx),
            Ok(ClientFrame::Other(kind)) => self.on_other(kind, text, ctx),
        }
    }

    fn on_create(&mut self, frame: CreateFrame, accepted: Instant, ctx: &mut Context<Self>) {
        // The upstream's limit of named lanes per connection, said by the relay with the
        // upstream's code (all lanes of a session share one upstream connection).
        if let Some(lane) = &frame.stream_id
            && !self.lanes.contains(lane)
        {
            if self.lanes.len() >= MAX_NAMED_LANES {
                let e = Self::frame_error(
                    &frame,
                    ErrorCode::StreamLimitReached,
                    &format!("this session has its maximum of {MAX_NAMED_LANES} named streams"),
                );
                return self.send(e, ctx);
            }
            self.lanes.insert(lane.clone());
        }
        let Some(turn) = &self.turn else {
            return self.start_turn(frame, accepted, ctx);
        };
        let finishing = turn.phase == Phase::Finishing;
        match self.deps.settings.session.on_overlap {
            crate::config::OnOverlap::Queue => self.enqueue(frame, accepted, ctx),
            crate::config::OnOverlap::Reject if !(finishing && self.queued.is_empty()) => {
                let e = Self::frame_error(
                    &frame,
                    ErrorCode::ResponseAlreadyInFlight,
                    "a response is in flight on this session; wait for its terminal event",
                );
                self.send(e, ctx);
            }
            // Handled as soon as the ending turn's record is acknowledged.
            crate::config::OnOverlap::Reject => self.queued.push_back((frame, accepted)),
            crate::config::OnOverlap::Preempt if finishing => {
                self.supersede_waiting(ctx);
                self.queued.push_back((frame, accepted));
            }
            crate::config::OnOverlap::Preempt => self.admit_then_preempt(frame, ctx),
        }
    }

    /// `on_overlap = "queue"`: the create waits its turn, or is refused when too many wait.
    fn enqueue(&mut self, frame: CreateFrame, accepted: Instant, ctx: &mut Context<Self>) {
        let max = self.deps.settings.session.lane_queue_max;
        if self.queued.len() >= max {
            let e = Self::frame_error(
                &frame,
                ErrorCode::LaneQueueFull,
                &format!(
                    "{max} response.create frames already wait on this session; retry after one ends"
                ),
            );
            return self.send(e, ctx);
        }
        self.queued.push_back((frame, accepted));
    }

    /// `on_overlap = "preempt"`: creates still waiting are superseded by a newer one; each is
    /// answered `response_preempted` (it never started, nothing is billed).
    pub(super) fn supersede_waiting(&mut self, ctx: &mut Context<Self>) {
        for (frame, _) in std::mem::take(&mut self.queued) {
            let e = Self::frame_error(
                &frame,
                ErrorCode::ResponsePreempted,
                "this response.create was superseded by a newer one before it started",
            );
            self.send(e, ctx);
        }
    }

    /// Starts the next waiting create, if any.
    pub(super) fn start_next(&mut self, ctx: &mut Context<Self>) {
        if let Some((next, accepted)) = self.queued.pop_front() {
            self.start_turn(next, accepted, ctx);
        }
    }

    fn start_turn(&mut self, mut frame: CreateFrame, accepted: Instant, ctx: &mut Context<Self>) {
        let model = match (&frame.model, &self.model) {
            (Some(m), _) => m.clone(),
            (None, Some(m)) => {
                frame.raw = frames::with_model(&frame.raw, m);
                m.clone()
            }
            (None, None) => {
                let e = Self::frame_error(
                    &frame,
                    ErrorCode::ModelRequired,
                    "the first response.create of a session needs `model`",
                );
                return self.send(e, ctx);
            }
        };
        self.model = Some(model.clone());
        let turn = self.new_turn(frame, model, accepted, Origin::Create, None);
        self.turn = Some(turn);
        self.admit(ctx);
    }

    /// The session's next turn, accepted at `accepted`, started by `origin`, with the id given
    /// (one reserved for it) or a new one.
    fn new_turn(
        &mut self,
        frame: CreateFrame,
        model: String,
        accepted: Instant,
        origin: Origin,
        id: Option<String>,
    ) -> Turn {
        self.turn_index += 1;
        let index = self.turn_index;
        let turn_id = id.unwrap_or_else(|| format!("turn_{}", random_hex(12)));
        let span = info_span!(parent: &self.span, "turn", turn = index, request_id = %turn_id, origin = %origin);
        Turn {
            index,
            turn_id,
            accepted_wall: crate::db::now(),
            tracker: TurnTracker::new(accepted).prompting(frame.prompt_bytes),
            frame,
            model,
            phase: Phase::Admitting,
            key_slot: None,
            account_slot: None,
            forwarded: 0,
            retried: false,
            replayed: false,
            bound_account: None,
            last_upstream: accepted,
            cancel_deadline: None,
            drain_deadline: None,
            origin,
            affinity: None,
            tried: Vec::new(),
            span,
        }
    }

    fn lease_and_send(&mut self, ctx: &mut Context<Self>) {
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        let Some(account) = turn.account_slot.as_ref().map(|s| s.account.clone()) else {
            return;
        };
        let max_age = Duration::from_secs(self.deps.settings.pool.max_age_s);
        if let Some(lease) = &self.lease {
            if *lease.account == *account
                && lease.opened_at.elapsed() < max_age
                && !lease.is_retired()
            {
                self.park(false);
                return self.send_upstream(ctx);
            }
            // Another account, too old, or retired by a pool restart: give it back.
            self.release_lease(true);
        }
        let Some(pool) = self.deps.pool_of(&account) else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let acquire = pool.send(Acquire {
            headers: self.headers.clone(),
            preferred: self.preferred,
            lessee: ctx.address().recipient(),
            arbiter: Some(actix::Arbiter::current()),
            reclaim: Some(ctx.address().recipient()),
        });
        ctx.spawn(acquire.into_actor(self).map(move |res, act, ctx| {
            let res = res.unwrap_or(Err(LeaseError::ShuttingDown));
            if act.generation != generation {
                // Abandoned meanwhile: hand a late lease straight back.
                if let Ok(lease) = res {
                    act.release(&lease, true);
                }
                return;
            }
            match res {
                Ok(lease) => {
                    act.lease_failures = 0;
                    act.preferred = Some(lease.conn);
                    act.lease = Some(lease);
                    act.send_upstream(ctx);
                }
                Err(LeaseError::Timeout) => {
                    act.lease_failures += 1;
                    let e = act.turn_error(
                        ErrorCode::UpstreamUnavailable,
                        "no upstream connection became free in time; retry",
                    );
                    let close = (act.lease_failures
                        >= act.deps.settings.session.max_lease_failures)
                        .then_some((close::TRY_AGAIN_LATER, "upstream_unavailable"));
                    act.finish(
                        Ending::Rejected(ErrorCode::UpstreamUnavailable),
                        Delivery {
                            close,
                            ..Delivery::reusable(Some(e))
                        },
                        ctx,
                    );
                }
                Err(LeaseError::DialFailed(_) | LeaseError::Cooling) if act.failover(ctx) => {}
                Err(err) => {
                    // The detail (upstream URL, host) is for the operator's log only.
                    warn!(parent: &act.span, error = %err, "no upstream connection for the turn");
                    let message = match err {
                        LeaseError::ShuttingDown => "the relay is shutting down".to_string(),
                        _ => crate::session::gate::unavailable(&act.deps),
                    };
                    let e = act.turn_error(ErrorCode::UpstreamUnavailable, &message);
                    act.finish(
                        Ending::Rejected(ErrorCode::UpstreamUnavailable),
                        Delivery::reusable(Some(e)),
                        ctx,
                    );
                }
            }
        }));
    }

    fn on_upstream_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let Some(turn) = self.turn.as_mut().filter(|t| t.phase == Phase::Streaming) else {
            return self.on_frame_between_turns(text, ctx);
        };
        let now = Instant::now();
        turn.last_upstream = now;
        let observed = turn.tracker.observe(&text, now);
        match observed.kind {
            EventKind::Invalid => {
                // Never forwarded; the connection's state is unknown.
                if let Some(lease) = &self.lease {
                    lease.addr.do_send(crate::upstream::messages::CloseConn);
                }
                self.release_lease(false);
                self.on_upstream_lost(
                    LostReason::Protocol("the upstream sent a frame that is not a JSON event"),
                    ctx,
                )
            }
            EventKind::Terminal(kind) => {
                let delivery = Delivery::reusable(Some(text.to_string()));
                self.finish(Ending::Terminal(kind), delivery, ctx);
            }
            EventKind::Error => {
                let nothing_forwarded = turn.forwarded == 0;
                let (code, request_level) = upstream_error_code(&text);
                let label = crate::record::clean_label(code.as_deref().unwrap_or("error"), 64);
                ::metrics::counter!(metric::UPSTREAM_ERRORS, "code" => label).increment(1);
                if code.as_deref() == Some("previous_response_not_found")
                    && turn.forwarded == 0
                    && !turn.replayed
                    && let Some(lease) = self.lease.as_ref()
                    && let Some(turn) = self.turn.as_ref()
                    && let decision @ Decision::Replay { .. } =
                        self.continuation(turn, lease.conn, true)
                {
                    // Once, on the same (clean) connection: the upstream answered.
                    return self.write_request(decision, ctx);
                }
                if nothing_forwarded
                    && account_trouble(code.as_deref())
                    && self.fail_over_in_band(code.as_deref().unwrap_or_default(), ctx)
                {
                    return;
                }
                let delivery = Delivery::new(Some(text.to_string()), request_level);
                self.finish(Ending::UpstreamError(code), delivery, ctx);
            }
            EventKind::Steer(kind) => {
                turn.forwarded += 1;
                let unused = self.steer.observe(kind, &text);
                self.release_reservations(unused);
                self.send(text, ctx);
            }
            _ => {
                turn.forwarded += 1;
                self.send(text, ctx);
            }
        }
    }

    fn on_upstream_lost(&mut self, reason: LostReason, ctx: &mut Context<Self>) {
        // The pool has evicted it already.
        self.lease = None;
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        if turn.phase != Phase::Streaming {
            return;
        }
        // A chained turn is retried too: on the fresh connection the continuation decision
        // replays it or fails closed.
        let transparent = turn.forwarded == 0
            && !turn.retried
            && !self.client_gone
            && !matches!(reason, LostReason::Protocol(_));
        if transparent {
            info!(parent: &turn.span, ?reason, "upstream lost before anything was forwarded; retrying once on a fresh connection");
            turn.retried = true;
            turn.phase = Phase::Leasing;
            self.preferred = None;
            return self.lease_and_send(ctx);
        }
        let (code, message) = match reason {
            LostReason::Closed(Some(close::RESTART | close::TRY_AGAIN_LATER)) => (
                ErrorCode::UpstreamRestarting,
                "the upstream is restarting; retry this turn",
            ),
            LostReason::Protocol(what) => (ErrorCode::UpstreamProtocolError, what),
            _ => (
                ErrorCode::UpstreamConnectionLost,
                "the upstream connection was lost mid-turn; retry this turn",
            ),
        };
        ::metrics::counter!(metric::UPSTREAM_ERRORS, "code" => code.code()).increment(1);
        let e = self.turn_error(code, message);
        self.finish(Ending::UpstreamLost(code), Delivery::spent(Some(e)), ctx);
    }

    // ---- leases ------------------------------------------------------------------------------

    fn release_lease(&mut self, reusable: bool) {
        if let Some(lease) = self.lease.take() {
            self.release(&lease, reusable);
        }
    }

    /// Tells the pool whether the held connection is between turns (reclaimable) or in use.
    fn park(&self, parked: bool) {
        if let Some(lease) = &self.lease
            && let Some(pool) = self.deps.pool_of(&lease.account)
        {
            pool.do_send(Parked {
                conn: lease.conn,
                lease: lease.id,
                parked,
            });
        }
    }

    /// Gives a connection back to its account's pool.
    fn release(&self, lease: &Lease, reusable: bool) {
        if let Some(pool) = self.deps.pool_of(&lease.account) {
            pool.do_send(Release {
                conn: lease.conn,
                lease: lease.id,
                reusable,
            });
        }
    }

    // ---- cancel, other frames, backpressure, client gone -----------------------------------

    /// `response.cancel` / `response.interrupt`: forwarded as the client sent it.
    fn on_cancel(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let grace = Duration::from_millis(self.deps.settings.session.cancel_grace_ms);
        let Some(turn) = self.turn.as_mut() else {
            let e = Self::error_event(ErrorCode::NoActiveResponse, "no response is in flight");
            return self.send(e, ctx);
        };
        match turn.phase {
            Phase::Streaming => {
                if let Some(lease) = &self.lease {
                    lease.addr.do_send(SendText(text));
                }
                turn.cancel_deadline.get_or_insert(Instant::now() + grace);
            }
            Phase::Admitting | Phase::Leasing => {
                let id = turn.turn_id.clone();
                let stream_id = turn.frame.stream_id.clone();
                self.finish(
                    Ending::Cancelled,
                    Delivery::reusable(Some(cancelled_event(&id, stream_id.as_deref()))),
                    ctx,
                );
            }
            Phase::Finishing => {}
        }
    }

    fn on_other(&mut self, kind: String, text: ByteString, ctx: &mut Context<Self>) {
        if kind == "response.steer" {
            return self.on_steer(text, ctx);
        }
        match (&self.lease, self.turn.as_ref().map(|t| t.phase)) {
            (Some(lease), Some(Phase::Streaming)) => lease.addr.do_send(SendText(text)),
            _ => {
                let e = Self::error_event(
                    ErrorCode::NoActiveResponse,
                    &format!("`{kind}` needs a response in flight"),
                );
                self.send(e, ctx);
            }
        }
    }

    fn on_client_gone(&mut self, ctx: &mut Context<Self>) {
        if self.client_gone {
            return;
        }
        self.client_gone = true;
        let drain = Duration::from_millis(self.deps.settings.session.drain_ms);
        let Some(turn) = self.turn.as_mut() else {
            return self.stop_when_drained(ctx);
        };
        match turn.phase {
            Phase::Streaming => {
                // Slots go at once; the upstream is read a while longer for the terminal.
                turn.key_slot = None;
                turn.account_slot = None;
                turn.drain_deadline = Some(Instant::now() + drain);
                debug!(parent: &turn.span, "client gone mid-turn; draining the upstream");
            }
            Phase::Admitting | Phase::Leasing => {
                self.finish(Ending::ClientGone, Delivery::reusable(None), ctx);
            }
            Phase::Finishing => {}
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let deps = self.deps.clone();
        let s = &deps.settings;
        let read_timeout = Duration::from_millis(s.upstream.read_timeout_ms);
        while let Some(i) = self.drains.iter().position(|d| now >= d.deadline) {
            // No terminal in time: the connection's state is unknown, it is closed.
            self.end_drain(i, false, ctx);
        }
        if let Some(turn) = self.turn.as_ref() {
            if turn.phase != Phase::Streaming {
                return;
            }
            if turn.drain_deadline.is_some_and(|d| now >= d) {
                return self.finish(Ending::ClientGone, Delivery::spent(None), ctx);
            }
            if turn.cancel_deadline.is_some_and(|d| now >= d) {
                let id = turn
                    .tracker
                    .response_id
                    .clone()
                    .unwrap_or_else(|| turn.turn_id.clone());
                let stream_id = turn.frame.stream_id.clone();
                return self.finish(
                    Ending::Cancelled,
                    Delivery::spent(Some(cancelled_event(&id, stream_id.as_deref()))),
                    ctx,
                );
            }
            let first_event_timeout = Duration::from_millis(s.upstream.first_event_timeout_ms);
            let silent = now.duration_since(turn.last_upstream);
            if turn.tracker.events == 0 && silent >= first_event_timeout {
                // The request went out and nothing came back: the upstream may have gone
                // silent (a graceful restart keeps its old sockets open and mute).
                if let Some(lease) = &self.lease {
                    lease.addr.do_send(crate::upstream::messages::CloseConn);
                }
                self.release_lease(false);
                return self.on_upstream_lost(LostReason::Error("no first event".into()), ctx);
            }
            if silent >= read_timeout {
                if let Some(lease) = &self.lease {
                    lease.addr.do_send(crate::upstream::messages::CloseConn);
                }
                self.release_lease(false);
                return self.on_upstream_lost(LostReason::Error("read timeout".into()), ctx);
            }
            return;
        }
        let limit = Duration::from_millis(s.upstream.first_event_timeout_ms);
        if let Some(unused) = self.steer.successor_overdue(now, limit) {
            warn!(parent: &self.span, "the successor of a steered response never started; going on");
            self.release_reservations(unused);
            self.start_next(ctx);
        }
        let idle = now.duration_since(self.idle_since);
        if self.lease.is_some()
            && !self.steer.awaiting()
            && idle >= Duration::from_millis(s.session.lease_idle_ms)
        {
            // Give the connection back, but prefer it next time.
            self.release_lease(true);
        }
        if idle >= Duration::from_millis(s.session.idle_timeout_ms) {
            self.close(close::NORMAL, "websocket idle timeout", ctx);
        }
    }
}

/// The relay's own `response.cancelled` (the upstream never answered the cancel), on the
/// turn's lane.
fn cancelled_event(response_id: &str, stream_id: Option<&str>) -> String {
    let mut v = json!({"type": "response.cancelled", "response": {"id": response_id, "object": "response", "status": "cancelled", "usage": null}});
    if let Some(id) = stream_id {
        v["stream_id"] = json!(id);
    }
    v.to_string()
}

/// Upstream error codes that say the account, not the request, is in trouble: before anything
/// of the turn was forwarded, the turn fails over (docs/DESIGN.md#accounts).
fn account_trouble(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "rate_limit_exceeded"
                | "usage_limit_reached"
                | "insufficient_quota"
                | "invalid_api_key"
                | "server_error"
                | "server_is_overloaded"
                | "service_unavailable"
        )
    )
}

/// An upstream `error` event's code, and whether it concerns only the request (the socket stays
/// usable) rather than the connection.
fn upstream_error_code(text: &str) -> (Option<String>, bool) {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let code = v
        .pointer("/error/code")
        .and_then(Value::as_str)
        .map(str::to_string);
    let kind = v
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let request_level = matches!(code.as_deref(), Some("previous_response_not_found"))
        || (kind == "invalid_request_error"
            && code.as_deref() != Some("websocket_connection_limit_reached"));
    (code, request_level)
}

/// The client error of a refused standing.
pub fn auth_error_code(e: &AuthError) -> ErrorCode {
    match e {
        AuthError::Missing => ErrorCode::MissingApiKey,
        AuthError::Invalid => ErrorCode::InvalidApiKey,
        AuthError::Revoked => ErrorCode::ApiKeyRevoked,
        AuthError::UserDisabled => ErrorCode::UserDisabled,
        AuthError::QuotaExhausted => ErrorCode::QuotaExhausted,
        AuthError::BalanceExhausted => ErrorCode::BalanceExhausted,
        AuthError::Db(_) => ErrorCode::NotReady,
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        ::metrics::gauge!(metric::SESSIONS_OPEN).increment(1.0);
        self.deps.registry.do_send(Register {
            id: self.id.clone(),
            session: ctx.address().recipient(),
            when_idle: ctx.address().recipient(),
            describe: ctx.address().recipient(),
        });
        let s = &self.deps.settings;
        let shortest = [
            s.session.lease_idle_ms,
            s.session.idle_timeout_ms,
            s.upstream.read_timeout_ms,
            s.upstream.first_event_timeout_ms,
            s.session.cancel_grace_ms,
            s.session.drain_ms,
        ]
        .into_iter()
        .min()
        .unwrap_or(1000);
        let every = Duration::from_millis((shortest / 4).clamp(10, 1000));
        ctx.run_interval(every, |act, ctx| act.tick(ctx));
        info!(parent: &self.span, "session opened");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        ::metrics::gauge!(metric::SESSIONS_OPEN).decrement(1.0);
        let unused = self.steer.take_reserved();
        self.release_reservations(unused);
        let clean = self.turn.is_none();
        self.release_lease(clean);
        // Preempted turns still draining are recorded with what was seen (estimated usage).
        for d in std::mem::take(&mut self.drains) {
            let record = self.close_drain(&d, false);
            self.deps.accounting.do_send(RecordTurn(record));
        }
        // Make sure the transport goes too.
        self.out(Outbound::Close(close::NORMAL, String::new()));
        self.deps.registry.do_send(Unregister {
            id: self.id.clone(),
        });
        info!(parent: &self.span, turns = self.turn_index, "session closed");
    }
}

/// The client's bytes, straight from the request body.
impl StreamHandler<Result<actix_web::web::Bytes, actix_web::error::PayloadError>> for SessionActor {
    fn handle(
        &mut self,
        chunk: Result<actix_web::web::Bytes, actix_web::error::PayloadError>,
        ctx: &mut Self::Context,
    ) {
        let Ok(chunk) = chunk else {
            return self.on_client(ClientInput::Gone, ctx);
        };
        let mut steps = Vec::new();
        self.reader.feed(&chunk, |step| steps.push(step));
        for step in steps {
            match step {
                Read::Input(input) => self.on_client(input, ctx),
                Read::Ping(p) => self.client.pong(p),
                Read::Close(reason) => {
                    self.client.echo_close(reason);
                    self.on_client(ClientInput::Gone, ctx);
                }
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        // EOF without a close frame (Codex never sends one). The session outlives its client
        // while a turn drains, so this must not stop the actor (the default would).
        self.on_client(ClientInput::Gone, ctx);
    }
}

impl SessionActor {
    fn on_client(&mut self, msg: ClientInput, ctx: &mut Context<Self>) {
        match msg {
            ClientInput::Text(text) => self.on_frame(text, ctx),
            ClientInput::Binary => self.protocol_error(
                ErrorCode::BinaryFrame,
                "binary frames are not supported; send JSON text frames",
                ctx,
            ),
            ClientInput::Pong(p) => {
                if let Ok(mark) = <[u8; 8]>::try_from(p.as_ref()) {
                    self.acked_bytes = self.acked_bytes.max(u64::from_be_bytes(mark));
                }
            }
            ClientInput::InvalidUtf8 => self.refuse_frame(
                ErrorCode::InvalidJson,
                "a text frame that is not valid UTF-8",
                Some(close::INVALID_PAYLOAD),
                ctx,
            ),
            ClientInput::Oversize => {
                let max = self.deps.settings.limits.client_frame_max_bytes;
                self.protocol_error(
                    ErrorCode::FrameTooLarge,
                    &format!("frame larger than {max} bytes"),
                    ctx,
                )
            }
            ClientInput::Gone => self.on_client_gone(ctx),
        }
    }
}

impl Handler<UpstreamEvent> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: UpstreamEvent, ctx: &mut Self::Context) {
        let current = self.lease.as_ref().map(|l| l.conn);
        match msg {
            UpstreamEvent::Text { conn, text } if Some(conn) == current => {
                self.on_upstream_text(text, ctx)
            }
            UpstreamEvent::Lost { conn, reason } if Some(conn) == current => {
                self.on_upstream_lost(reason, ctx)
            }
            // A preempted turn's connection (or one this session no longer holds).
            UpstreamEvent::Text { conn, text } => self.on_drain_event(conn, Some(text), ctx),
            UpstreamEvent::Lost { conn, .. } => self.on_drain_event(conn, None, ctx),
        }
    }
}

impl Handler<EndSession> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: EndSession, ctx: &mut Self::Context) {
        let code = msg.0;
        let close = code.spec().close.unwrap_or(close::GOING_AWAY);
        let e = self.turn_error(code, "the session was ended by the relay");
        match self.turn.as_ref().map(|t| t.phase) {
            None => {
                // An operator's end is said in words too; a shutdown's close code says it.
                if code == ErrorCode::SessionEnded {
                    self.send(e, ctx);
                }
                self.close(close, code.code(), ctx)
            }
            Some(Phase::Finishing) => self.close_after_turn = Some((close, code.code())),
            Some(phase) => {
                let reusable = phase != Phase::Streaming;
                self.finish(
                    Ending::Aborted(code),
                    Delivery {
                        last: Some(e),
                        reusable,
                        close: Some((close, code.code())),
                    },
                    ctx,
                );
            }
        }
    }
}

impl Handler<EndWhenIdle> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: EndWhenIdle, ctx: &mut Self::Context) {
        let code = ErrorCode::ShuttingDown;
        let close = (code.spec().close.unwrap_or(close::GOING_AWAY), code.code());
        if self.turn.is_none() {
            self.close(close.0, close.1, ctx);
        } else {
            // The turn finishes normally; `finish` closes after its last frame. What waits
            // behind it will not run: each is answered now.
            self.close_after_turn = Some(close);
            self.answer_waiting(ErrorCode::ShuttingDown, ctx);
        }
    }
}

impl Handler<Reclaim> for SessionActor {
    type Result = bool;

    /// The pool needs the connection this session holds between turns (docs/DESIGN.md#idle-reclaim). Given back
    /// only when no turn is in flight; the next turn continues its chain through §4.6.
    fn handle(&mut self, msg: Reclaim, _: &mut Self::Context) -> bool {
        let holds = self.lease.as_ref().is_some_and(|l| l.conn == msg.conn);
        // A successor the upstream is about to start needs this connection too.
        if !holds || self.turn.is_some() || self.steer.awaiting() {
            return false;
        }
        debug!(parent: &self.span, conn = msg.conn, "connection reclaimed by the pool between turns");
        self.release_lease(true);
        true
    }
}

impl Handler<Describe> for SessionActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _: &mut Self::Context) -> Self::Result {
        let state = match self.turn.as_ref().map(|t| t.phase) {
            None => "idle",
            Some(Phase::Admitting) => "admitting",
            Some(Phase::Leasing) => "leasing",
            Some(Phase::Streaming) => "streaming",
            Some(Phase::Finishing) => "finishing",
        };
        MessageResult(SessionInfo {
            id: self.id.clone(),
            key_prefix: self.principal.key_prefix.clone(),
            user: self.principal.user_name.clone(),
            account: self.lease.as_ref().map(|l| l.account.to_string()),
            turns: self.turn_index,
            state,
            age_s: self.opened_at.elapsed().as_secs(),
            lanes: self.lanes.len(),
            queued: self.queued.len(),
        })
    }
}
