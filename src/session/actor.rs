//! `SessionActor`: one per client WebSocket, the executor of its turns' machines
//! (docs/DESIGN.md#turn-machine). Every input — a client frame, an upstream event, an admission
//! or lease result, a timer tick, shutdown — is a message into this one actor; what it means to
//! a turn is that turn's `TurnMachine::step`, and the actor carries out the effects (`drive`).
//! Its turns run side by side, one per lane (`stream_id`), on the session's one upstream
//! connection; which create starts or waits is decided by `session::lanes`, an event's turn by
//! its `stream_id`. This file holds the state, the handlers and the executor; the parts of a
//! turn live beside it:
//! `admit` (admission, preemption's admission), `chain` (continuation applied), `drain`
//! (preempted turns drained for their usage), `ending` (the usage record, durable before the
//! client hears the end), `outbound` (writing to the client, backpressure).

mod admit;
mod chain;
mod drain;
mod ending;
mod http_leg;
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
use super::machine::{self, Effect, Input, Last, Phase, Rescue, TurnMachine, Unreachable};
use super::messages::{Describe, EndSession, EndWhenIdle, SessionInfo};
use super::registry::{Register, Unregister};
use super::socket::{ClientInput, ClientReader, ClientTx, Outbound, Read};
use super::turn::{Ending, TurnTracker};
use crate::accounting::messages::RecordTurn;
use crate::auth::{AuthError, Principal};
use crate::continuation::{self, Chain, Decision, History, Lineages};
use crate::db::models::{ApiKey, User};
use crate::ids::{SessionId, TurnId};
use crate::pool::messages::{Acquire, Home, Lease, LeaseError, Parked, Reclaim, Release};
use crate::pool::placement::Claim;
use crate::protocol::errors::{ErrorCode, close};
use crate::protocol::events::EventKind;
use crate::protocol::frames::{self, ClientFrame, CreateFrame};
use crate::record::{Origin, TurnRecord};
use crate::telemetry::metric;
use crate::upstream::messages::{LostReason, SendText, UpstreamEvent};

use super::gate::{self, ACCOUNTING_UNAVAILABLE};
use super::lanes::{Arrival, LaneId, LaneState, Lanes, MAX_NAMED_LANES};
use super::lifecycle;
use crate::protocol::events::stream_id_of;

/// Bytes sent between two backpressure pings.
const PING_EVERY_BYTES: u64 = 256 * 1024;

struct Turn {
    index: i32,
    /// Bumped when an async step of the turn (admission, reservation) is abandoned, so its
    /// late result is ignored.
    generation: u64,
    turn_id: TurnId,
    accepted_wall: NaiveDateTime,
    /// Its life: phase, tracker, deadlines (docs/DESIGN.md#turn-machine).
    m: TurnMachine,
    /// What goes upstream (the client's bytes, with `model` added if it was omitted).
    frame: CreateFrame,
    model: String,
    key_slot: Option<KeySlot>,
    account_slot: Option<AccountSlot>,
    /// The response it continues, as sent (named by the client or injected by the relay).
    parent: Option<String>,
    /// The account holding the stored response this turn continues (`response_bindings`).
    bound_account: Option<String>,
    /// `Create`, or `Steer` for a successor the upstream started on its own.
    origin: Origin,
    /// Its affinity (docs/DESIGN.md#routing), read at admission.
    affinity: Option<crate::session::gate::Affinity>,
    /// Accounts this turn could not reach (failover goes to the others).
    tried: Vec<String>,
    /// How its request reaches the upstream.
    leg: http_leg::Leg,
    /// Bytes of the request frame last written on the session's connection.
    sent_bytes: usize,
    span: Span,
}

/// A preempted turn whose response is read in the background (after `response.cancel`) for its
/// terminal usage, which bills it (docs/DESIGN.md#preemption). The client has been told.
struct Drain {
    /// The connection it owns, when no other lane used it; `None`: it is read on the session's
    /// connection, where its lane's events reach it before the lane's next turn.
    lease: Option<Lease>,
    conn: u64,
    account: String,
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
}

/// The session's upstream connection (docs/DESIGN.md#overlap): the lease its lanes share, and
/// what the session knows of it.
#[derive(Default)]
struct Upstream {
    lease: Option<Lease>,
    /// The held connection takes no new turn (a turn left it in an unknown state while other
    /// lanes still use it); it is closed once they end.
    spent: bool,
    /// The lease being acquired: (its generation, its account). Turns leasing meanwhile wait
    /// for it; a late result of an abandoned one is handed back.
    acquiring: Option<(u64, String)>,
    /// Bumps the generation of lease acquisitions.
    generation: u64,
    /// The connection of the last lease, preferred for the next one (affinity).
    preferred: Option<u64>,
    /// Lease timeouts in a row.
    failures: u32,
    /// When the connection last sent anything (a lane's silence is the lane's, while others
    /// are answered).
    heard_at: Option<Instant>,
    /// The lease whose frames the session reads itself (docs/DESIGN.md#direct-reads).
    direct: Option<u64>,
    /// The lease whose direct reads were tried at its first frame relayed as a message.
    direct_settled: Option<u64>,
    /// The idle connection this session was placed beside, claimed until its first lease
    /// (docs/DESIGN.md#placement).
    claim: Option<Claim>,
    /// Connections that carried a named lane of this session: the upstream keeps a lane's name
    /// for the connection's life, so they are closed when given back, never lent to another
    /// session (docs/DESIGN.md#overlap).
    named_on: std::collections::HashSet<u64>,
}

/// The client socket: frames out (no actor in between), the decoder of what comes in, and the
/// backpressure bookkeeping (docs/DESIGN.md#slow-clients).
struct Client {
    tx: ClientTx,
    reader: ClientReader,
    gone: bool,
    /// Cut off for not reading (`client_too_slow`): nothing more is queued but the last frame.
    cut_off: bool,
    sent_bytes: u64,
    acked_bytes: u64,
    pinged_at: u64,
    /// The largest frame sent and possibly unread: (its length, the byte mark that shows it
    /// read).
    largest_unread: (u64, u64),
}

pub struct SessionActor {
    id: SessionId,
    deps: Arc<SessionDeps>,
    principal: Principal,
    /// Last standing read from the database: admission falls back to it while the DB is down.
    standing: Option<(ApiKey, User)>,
    _session_slot: KeySlot,
    headers: Vec<(String, String)>,
    turn_index: i32,
    model: Option<String>,
    /// The session's upstream connection, shared by its lanes.
    up: Upstream,
    /// The session's responses as a tree of lineages (lanes fork each other), for replay when
    /// a chain's connection is gone (docs/DESIGN.md#continuation).
    lineages: Lineages,
    /// Turns in flight, at most one per lane.
    turns: Vec<Turn>,
    /// Preempted turns still being drained for their usage.
    drains: Vec<Drain>,
    /// The session ends once its drains are done.
    stop_after_drains: bool,
    /// Named lanes and the creates waiting for theirs (docs/DESIGN.md#overlap): each gets
    /// exactly one answer.
    lanes: Lanes,
    idle_since: Instant,
    opened_at: Instant,
    /// The client socket.
    client: Client,
    /// Close the socket with this once no turn is in flight.
    close_when_idle: Option<(u16, &'static str)>,
    /// Mid-turn steering per lane: accepted steers, the successor the upstream will start.
    steers: std::collections::HashMap<LaneId, steer::SteerState>,
    /// An upstream frame no turn could take was logged (once per session).
    unattributed_logged: bool,
    span: Span,
}

impl SessionActor {
    pub fn new(
        deps: Arc<SessionDeps>,
        principal: Principal,
        session_slot: KeySlot,
        headers: Vec<(String, String)>,
        client: ClientTx,
        claim: Option<Claim>,
    ) -> Self {
        let id = SessionId::random();
        let reader = ClientReader::new(deps.settings.limits.client_frame_max_bytes);
        let replay_max = deps.settings.session.replay_max_bytes;
        let lanes = Lanes::bounded(deps.settings.session.lane_queue_max_bytes);
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
            up: Upstream {
                claim,
                ..Upstream::default()
            },
            lineages: Lineages::new(replay_max),
            turns: Vec::new(),
            drains: Vec::new(),
            stop_after_drains: false,
            lanes,
            idle_since: Instant::now(),
            opened_at: Instant::now(),
            client: Client {
                tx: client,
                reader,
                gone: false,
                cut_off: false,
                sent_bytes: 0,
                acked_bytes: 0,
                pinged_at: 0,
                largest_unread: (0, 0),
            },
            close_when_idle: None,
            steers: std::collections::HashMap::new(),
            unattributed_logged: false,
            span,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn out(&mut self, msg: Outbound) {
        if !self.client.gone {
            self.client.tx.send(msg);
        }
    }

    // ---- turn start -------------------------------------------------------------------------

    fn on_frame(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let accepted = Instant::now();
        match frames::parse(&text) {
            Err(e) => self.protocol_error(e.code, &e.message, ctx),
            Ok(ClientFrame::Create(frame)) => self.on_create(*frame, accepted, ctx),
            Ok(ClientFrame::Cancel) => self.on_cancel(text, ctx),
            Ok(ClientFrame::Other(kind)) => self.on_other(kind, text, ctx),
        }
    }

    fn on_create(&mut self, frame: CreateFrame, accepted: Instant, ctx: &mut Context<Self>) {
        let s = &self.deps.settings.session;
        let (mode, queue_max) = (s.on_overlap, s.lane_queue_max);
        let state = self.lane_state(&frame.stream_id);
        match self
            .lanes
            .arrive(&frame, state, self.turns.len(), mode, queue_max)
        {
            Arrival::Start => self.start_turn(frame, accepted, ctx),
            Arrival::Queued => {
                if mode == crate::config::OnOverlap::Preempt {
                    self.supersede_waiting(&frame.stream_id, ctx);
                }
                self.lanes.push(frame, accepted);
            }
            Arrival::Preempt => self.admit_then_preempt(frame, ctx),
            Arrival::Refused(code) => {
                let message = match code {
                    ErrorCode::StreamLimitReached => {
                        format!("this session has its maximum of {MAX_NAMED_LANES} named streams")
                    }
                    ErrorCode::LaneQueueFull
                        if self.lanes.waiting_on(&frame.stream_id) >= queue_max =>
                    {
                        format!(
                            "{queue_max} response.create frames already wait on this stream; retry after one ends"
                        )
                    }
                    ErrorCode::LaneQueueFull => format!(
                        "the response.create frames waiting in this session would exceed {} bytes; retry after one ends",
                        self.deps.settings.session.lane_queue_max_bytes
                    ),
                    _ => "a response is in flight on this stream; wait for its terminal event"
                        .to_string(),
                };
                let e = Self::frame_error(&frame, code, &message);
                self.send(e, ctx);
            }
        }
    }

    /// What `lane` is doing, as a new create on it cares.
    fn lane_state(&self, lane: &LaneId) -> LaneState {
        lane_state(&self.turns, &self.steers, lane)
    }

    /// `on_overlap = "preempt"`: creates still waiting on `lane` are superseded by a newer one;
    /// each is answered `response_preempted` (it never started, nothing is billed).
    pub(super) fn supersede_waiting(&mut self, lane: &LaneId, ctx: &mut Context<Self>) {
        for w in self.lanes.take_lane(lane) {
            let e = Self::frame_error(
                &w.frame,
                ErrorCode::ResponsePreempted,
                "this response.create was superseded by a newer one before it started",
            );
            self.send(e, ctx);
        }
    }

    /// Starts what may start now: turns waiting for the session's connection, then the creates
    /// whose lanes are free (docs/DESIGN.md#overlap).
    pub(super) fn pump(&mut self, ctx: &mut Context<Self>) {
        self.serve_leasing(ctx);
        if self.client.gone || self.close_when_idle.is_some() {
            return;
        }
        let (turns, steers) = (&self.turns, &self.steers);
        let ready = self
            .lanes
            .startable(|lane| lane_state(turns, steers, lane), turns.len());
        for w in ready {
            self.start_turn(w.frame, w.accepted, ctx);
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
        let index = turn.index;
        self.turns.push(turn);
        self.admit(index, ctx);
    }

    /// The time limits every turn of this session lives by.
    fn turn_limits(&self) -> machine::Limits {
        let (s, up) = (&self.deps.settings.session, &self.deps.settings.upstream);
        machine::Limits {
            cancel_grace: Duration::from_millis(s.cancel_grace_ms),
            drain: Duration::from_millis(s.drain_ms),
            first_event: Duration::from_millis(up.first_event_timeout_ms),
            read: Duration::from_millis(up.read_timeout_ms),
        }
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
        let origin = match origin {
            Origin::Create if frame.compaction => Origin::Compaction,
            other => other,
        };
        let turn_id = id.map_or_else(TurnId::random, TurnId::from);
        let span = crate::turn_span!(parent: &self.span, "turn", turn = index, request_id = %turn_id, origin = %origin);
        Turn {
            index,
            generation: 0,
            turn_id,
            accepted_wall: crate::db::now(),
            m: TurnMachine::new(
                TurnTracker::new(accepted).prompting(frame.prompt_bytes),
                self.turn_limits(),
                accepted,
            ),
            frame,
            model,
            key_slot: None,
            account_slot: None,
            parent: None,
            bound_account: None,
            origin,
            affinity: None,
            tried: Vec::new(),
            leg: http_leg::Leg::Lease,
            sent_bytes: 0,
            span,
        }
    }

    /// The turn `index`, if still in flight.
    fn at(&self, index: i32) -> Option<&Turn> {
        self.turns.iter().find(|t| t.index == index)
    }

    fn at_mut(&mut self, index: i32) -> Option<&mut Turn> {
        self.turns.iter_mut().find(|t| t.index == index)
    }

    /// The connection turn `index`'s response is on: the leased one, or none for an HTTP leg.
    fn conn_of(&self, index: i32) -> Option<u64> {
        match self.at(index)?.leg {
            http_leg::Leg::Http(_) => Some(http_leg::NO_CONNECTION),
            http_leg::Leg::Lease => self.up.lease.as_ref().map(|l| l.conn),
        }
    }

    /// The turns in `phase`, oldest first.
    fn in_phase(&self, phase: Phase) -> Vec<i32> {
        self.turns
            .iter()
            .filter(|t| t.m.phase() == phase)
            .map(|t| t.index)
            .collect()
    }

    /// Whether the held connection serves a response other than turn `except`'s: a streaming
    /// turn, a preempted one drained on it, or a successor the upstream will start.
    fn lease_in_use(&self, except: Option<i32>) -> bool {
        self.turns
            .iter()
            .any(|t| t.on_lease() && Some(t.index) != except)
            || self.drains.iter().any(|d| d.lease.is_none())
            || self.steers.values().any(steer::SteerState::awaiting)
    }

    /// Sends turn `index` on the session's connection once it holds one of the turn's account
    /// (docs/DESIGN.md#overlap): the held one if it fits; else, when no other lane uses it, it is
    /// given back and one is acquired. Otherwise the turn waits (`pump` tries again).
    fn lease_and_send(&mut self, index: i32, ctx: &mut Context<Self>) {
        let Some(account) = self
            .at(index)
            .and_then(|t| t.account_slot.as_ref())
            .map(|s| s.account.clone())
        else {
            return;
        };
        if self.needs_http(index, &account) {
            return self.send_over_http(index, ctx);
        }
        let max_age = Duration::from_secs(self.deps.settings.pool.max_age_s);
        if let Some(lease) = &self.up.lease {
            let held = lifecycle::Held {
                account: &lease.account,
                opened_at: lease.opened_at,
                retired: lease.is_retired(),
                spent: self.up.spent,
                in_use: self.lease_in_use(Some(index)),
            };
            match lifecycle::fit(held, &account, max_age, Instant::now()) {
                lifecycle::Fit::Send => {
                    self.park(false);
                    return self.send_upstream(index, ctx);
                }
                lifecycle::Fit::Wait => return,
                lifecycle::Fit::Exchange { reusable } => self.release_lease(reusable),
            }
        }
        if self.up.acquiring.is_some() {
            return;
        }
        let Some(pool) = self.deps.pool_of(&account) else {
            return;
        };
        self.up.generation += 1;
        let generation = self.up.generation;
        self.up.acquiring = Some((generation, account.clone()));
        let acquire = pool.send(Acquire {
            headers: self.headers.clone(),
            preferred: self.up.preferred,
            lessee: ctx.address().recipient(),
            home: Some(Home::current()),
            reclaim: Some(ctx.address().recipient()),
            queue: true,
        });
        ctx.spawn(acquire.into_actor(self).map(move |res, act, ctx| {
            let res = res.unwrap_or(Err(LeaseError::ShuttingDown));
            let current = act
                .up
                .acquiring
                .as_ref()
                .is_some_and(|(g, _)| *g == generation);
            let wanted = act.turns.iter().any(|t| t.m.phase() == Phase::Leasing);
            if !current || !wanted {
                // Abandoned meanwhile: hand a late lease straight back.
                if current {
                    act.up.acquiring = None;
                }
                if let Ok(lease) = res {
                    act.release(&lease, true);
                }
                return;
            }
            act.up.acquiring = None;
            match res {
                Ok(lease) => {
                    act.up.claim = None;
                    act.up.failures = 0;
                    act.up.preferred = Some(lease.conn);
                    act.up.lease = Some(lease);
                    act.up.spent = false;
                    act.up.heard_at = None;
                    act.read_directly(ctx);
                    act.serve_leasing(ctx);
                }
                Err(err) => act.lease_failed(&account, err, ctx),
            }
        }));
    }

    /// Reads the leased connection's frames on this actor when the connection runs on this
    /// thread — one task and no mailbox message per event (docs/DESIGN.md#direct-reads).
    /// Tried when a lease arrives and before each request, in case the connection had not yet
    /// learnt of the lease; says whether the session now reads the lease's frames itself.
    pub(super) fn read_directly(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(lease) = self.up.lease.as_ref() else {
            return false;
        };
        if self.up.direct == Some(lease.id) {
            return true;
        }
        let Some(reader) = crate::upstream::socket::attach(lease.id) else {
            return false;
        };
        self.up.direct = Some(lease.id);
        lease_reads(&lease.account, "direct");
        ctx.add_stream(reader);
        true
    }

    /// A frame of the current lease came (a frame read directly finds it settled at once). One
    /// that came as a message from the connection actor means the connection has learnt of the
    /// lease: whether its socket can be read on this thread is
    /// settled now, and tried once per lease (the grant can reach the session before the
    /// connection learns of it). Frames relayed before are all in the mailbox already, which
    /// actix drains before it polls the session's streams: none is overtaken
    /// (docs/DESIGN.md#direct-reads).
    fn read_directly_once_relayed(&mut self, ctx: &mut Context<Self>) {
        let Some(lease) = self.up.lease.as_ref() else {
            return;
        };
        if self.up.direct_settled == Some(lease.id) || self.up.direct == Some(lease.id) {
            return;
        }
        self.up.direct_settled = Some(lease.id);
        let account = lease.account.clone();
        if !self.read_directly(ctx) {
            lease_reads(&account, "relayed");
        }
    }

    /// Turns waiting for a connection get one, in the order they were accepted.
    fn serve_leasing(&mut self, ctx: &mut Context<Self>) {
        for index in self.in_phase(Phase::Leasing) {
            self.lease_and_send(index, ctx);
        }
    }

    /// No connection of `account` for the turns waiting on one.
    fn lease_failed(&mut self, account: &str, err: LeaseError, ctx: &mut Context<Self>) {
        let waiting: Vec<i32> = self
            .turns
            .iter()
            .filter(|t| {
                t.m.phase() == Phase::Leasing
                    && t.account_slot
                        .as_ref()
                        .is_some_and(|s| s.account == account)
            })
            .map(|t| t.index)
            .collect();
        if matches!(err, LeaseError::Timeout) {
            self.up.failures += 1;
        } else if !matches!(
            err,
            LeaseError::DialFailed(_) | LeaseError::Cooling | LeaseError::WebSocketRefused
        ) {
            // The detail (upstream URL, host) is for the operator's log only.
            warn!(parent: &self.span, error = %err, "no upstream connection for the turn");
        }
        let close = self.up.failures >= self.deps.settings.session.max_lease_failures;
        let (why, message) = match &err {
            // The account turned out to be HTTP only: its turns go there now.
            LeaseError::WebSocketRefused => (Unreachable::NoWebSocket, None),
            // A connection of this account did not come in time (all busy, or its handshake
            // hangs): another account that can take the turn does.
            LeaseError::Timeout => (
                Unreachable::Timeout,
                Some("no upstream connection became free in time; retry"),
            ),
            LeaseError::DialFailed(_) | LeaseError::Cooling => (Unreachable::Down, None),
            LeaseError::ShuttingDown => (Unreachable::Final, Some("the relay is shutting down")),
            LeaseError::Busy => (Unreachable::Final, None),
        };
        let message = message.map_or_else(
            || crate::session::gate::unavailable(&self.deps),
            str::to_string,
        );
        for index in waiting {
            let input = Input::Unreachable {
                why: why.clone(),
                message: message.clone(),
                close: close && matches!(err, LeaseError::Timeout),
            };
            self.drive(index, input, Instant::now(), None, ctx);
        }
        // Turns of other accounts waited for this acquisition to end.
        self.serve_leasing(ctx);
    }

    /// An upstream event on the session's connection: to the turn of its lane (docs/DESIGN.md#overlap).
    fn on_upstream_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.up.heard_at = Some(now);
        let lane = stream_id_of(&text);
        if lane.is_none()
            && crate::protocol::events::refuses_stream_id(&text)
            && self.lanes_refused(ctx)
        {
            return;
        }
        // A preempted response drained on this connection takes its lane's events until its end.
        if let Some(d) = self
            .drains
            .iter()
            .position(|d| d.lease.is_none() && d.turn.frame.stream_id.as_deref() == lane)
        {
            return self.on_drain_text(d, text, ctx);
        }
        let Some(i) = self
            .turns
            .iter()
            .position(|t| t.on_lease() && t.frame.stream_id.as_deref() == lane)
        else {
            let lane = lane.map(str::to_string);
            return self.on_unattributed(lane, text, ctx);
        };
        self.on_turn_text(i, text, now, ctx);
    }

    /// An upstream event of the turn at `i`, read at `now`, from its leased connection or its
    /// HTTP leg.
    #[inline]
    fn on_turn_text(&mut self, i: usize, text: ByteString, now: Instant, ctx: &mut Context<Self>) {
        let index = self.turns[i].index;
        self.drive(index, Input::Upstream(&text), now, Some(&text), ctx);
    }

    /// Feeds `input` to turn `index`'s machine and carries out what it answers
    /// (docs/DESIGN.md#turn-machine). `text`: the upstream event stepped, or the client frame
    /// a cancel forwards.
    pub(super) fn drive(
        &mut self,
        index: i32,
        input: Input<'_>,
        now: Instant,
        text: Option<&ByteString>,
        ctx: &mut Context<Self>,
    ) {
        let Some(turn) = self.at_mut(index) else {
            return;
        };
        let effects = turn.m.step(input, now);
        for effect in effects {
            self.carry_out(index, effect, text, ctx);
        }
    }

    fn carry_out(
        &mut self,
        index: i32,
        effect: Effect,
        text: Option<&ByteString>,
        ctx: &mut Context<Self>,
    ) {
        match effect {
            Effect::Lease => self.lease_and_send(index, ctx),
            Effect::Retry => {
                if let Some(turn) = self.at(index) {
                    info!(parent: &turn.span, "upstream lost before anything was forwarded; retrying once on a fresh connection");
                }
                self.up.preferred = None;
                self.lease_and_send(index, ctx);
            }
            Effect::Forward => {
                if let Some(text) = text {
                    self.send(text.clone(), ctx);
                }
            }
            Effect::Steer(kind) => {
                let (Some(turn), Some(text)) = (self.at(index), text) else {
                    return;
                };
                let lane = turn.frame.stream_id.clone();
                let unused = self.steers.entry(lane).or_default().observe(kind, text);
                self.release_reservations(unused);
                self.send(text.clone(), ctx);
            }
            Effect::Rescue(rescue) => {
                if !self.rescue(index, rescue, ctx) {
                    self.drive(index, Input::NotRescued, Instant::now(), text, ctx);
                }
            }
            Effect::ForwardCancel => {
                if let (Some(lease), Some(text)) = (&self.up.lease, text) {
                    lease.addr.do_send(SendText(text.clone()));
                }
            }
            Effect::StopLeg => self.stop_http_leg(index, ctx),
            Effect::Drain(message) => {
                let e = self.turn_error(index, ErrorCode::ResponsePreempted, &message);
                self.preempt_streaming(index, e, ctx);
            }
            Effect::FreeSlots => {
                if let Some(turn) = self.at_mut(index) {
                    turn.key_slot = None;
                    turn.account_slot = None;
                    debug!(parent: &turn.span, "client gone mid-turn; draining the upstream");
                }
            }
            Effect::DropConnection(why) => self.drop_connection(why, ctx),
            Effect::CountError(code) => crate::telemetry::upstream_error(&code),
            Effect::Finish(end) => {
                let delivery = self.delivery(index, end.last, end.reusable, end.close, text);
                self.finish(index, end.ending, delivery, ctx);
            }
        }
    }

    /// How turn `index`'s end reaches the client: its last frame in the WebSocket mode's shape.
    fn delivery(
        &self,
        index: i32,
        last: Last,
        reusable: bool,
        close: bool,
        text: Option<&ByteString>,
    ) -> Delivery {
        let last = match last {
            Last::Upstream => text.map(ToString::to_string),
            Last::Error(code, message) => Some(self.turn_error(index, code, &message)),
            Last::Verbatim(event) => Some(event),
            Last::Cancelled => self.at(index).map(|t| {
                let id = t.m.tracker.response_id.clone();
                let id = id.unwrap_or_else(|| t.turn_id.to_string());
                cancelled_event(&id, t.frame.stream_id.as_deref())
            }),
            Last::Nothing => None,
        };
        Delivery {
            close: close.then_some((close::TRY_AGAIN_LATER, "upstream_unavailable")),
            ..Delivery::new(last, reusable)
        }
    }

    /// Tries to save turn `index` (docs/DESIGN.md#turn-machine): `true` when it goes on.
    fn rescue(&mut self, index: i32, rescue: Rescue, ctx: &mut Context<Self>) -> bool {
        match rescue {
            Rescue::Replay => {
                if let Some(conn) = self.conn_of(index)
                    && let Some(turn) = self.at(index)
                    && let decision @ Decision::Replay { .. } = self.continuation(turn, conn, true)
                {
                    // Once, on the same (clean) connection: the upstream answered.
                    self.write_request(index, decision, ctx);
                    return true;
                }
                false
            }
            Rescue::FailOver(code) => self.fail_over_in_band(index, &code, ctx),
            Rescue::OtherAccount => self.failover(index, ctx),
            Rescue::Http => {
                let account = self
                    .at(index)
                    .and_then(|t| t.account_slot.as_ref())
                    .map(|s| s.account.clone());
                match account {
                    Some(account) if self.needs_http(index, &account) => {
                        self.send_over_http(index, ctx);
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// The connection is in an unknown state: it is closed, and every turn on it lost.
    fn drop_connection(&mut self, reason: LostReason, ctx: &mut Context<Self>) {
        if let Some(lease) = &self.up.lease {
            lease.addr.do_send(crate::upstream::messages::CloseConn);
        }
        self.release_lease(false);
        self.on_upstream_lost(reason, ctx)
    }

    /// The session's connection is gone: every turn streaming on it is retried (nothing of it
    /// forwarded yet) or ends with the error; responses drained on it end with what was seen.
    fn on_upstream_lost(&mut self, reason: LostReason, ctx: &mut Context<Self>) {
        if reason == LostReason::Closed(Some(close::TOO_BIG)) {
            self.learn_frame_limit();
        }
        // The pool has evicted it already.
        self.up.lease = None;
        self.up.spent = false;
        self.up.heard_at = None;
        while let Some(i) = self.drains.iter().position(|d| d.lease.is_none()) {
            self.end_drain(i, false, ctx);
        }
        for lane in self.steers.values_mut() {
            let unused = lane.connection_lost();
            gate::release_reservations(&self.deps, unused);
        }
        let on_lease: Vec<i32> = self
            .turns
            .iter()
            .filter(|t| t.on_lease())
            .map(|t| t.index)
            .collect();
        for index in on_lease {
            self.lose_turn(index, &reason, ctx);
        }
        self.pump(ctx);
    }

    fn lose_turn(&mut self, index: i32, reason: &LostReason, ctx: &mut Context<Self>) {
        self.drive(index, Input::Lost(reason), Instant::now(), None, ctx);
    }

    // ---- leases ------------------------------------------------------------------------------

    fn release_lease(&mut self, reusable: bool) {
        if let Some(lease) = self.up.lease.take() {
            self.release(&lease, reusable);
        }
    }

    /// Tells the pool whether the held connection is between turns (reclaimable) or in use.
    fn park(&self, parked: bool) {
        if let Some(lease) = &self.up.lease
            && let Some(pool) = self.deps.pool_of(&lease.account)
        {
            pool.do_send(Parked {
                conn: lease.conn,
                lease: lease.id,
                parked,
            });
        }
    }

    /// Gives a connection back to its account's pool (to be closed, if it carried a named lane).
    fn release(&self, lease: &Lease, reusable: bool) {
        if let Some(pool) = self.deps.pool_of(&lease.account) {
            pool.do_send(Release {
                conn: lease.conn,
                lease: lease.id,
                reusable: reusable && !self.up.named_on.contains(&lease.conn),
            });
        }
    }

    // ---- cancel, other frames, backpressure, client gone -----------------------------------

    /// The turn a client frame aims at (`response.cancel`, `response.steer`): the one whose
    /// response it names, else the one of the lane it names, else the only turn in flight,
    /// else the default lane's.
    fn target_of(&self, text: &str) -> (Option<i32>, LaneId) {
        let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        let named = |key: &str| v.get(key).and_then(Value::as_str);
        let by_response = ["response_id", "previous_response_id"]
            .into_iter()
            .filter_map(named)
            .find_map(|id| {
                self.turns
                    .iter()
                    .find(|t| t.m.tracker.response_id.as_deref() == Some(id))
            });
        let lane: Option<LaneId> = named("stream_id").map(|l| Some(l.to_string()));
        let turn = by_response
            .or_else(|| {
                lane.as_ref()
                    .and_then(|l| self.turns.iter().find(|t| &t.frame.stream_id == l))
            })
            .or_else(|| (self.turns.len() == 1).then(|| &self.turns[0]))
            .or_else(|| self.turns.iter().find(|t| t.frame.stream_id.is_none()));
        match turn {
            Some(t) => (Some(t.index), t.frame.stream_id.clone()),
            None => (None, lane.unwrap_or_default()),
        }
    }

    /// `response.cancel` / `response.interrupt`: forwarded as the client sent it.
    fn on_cancel(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let (target, lane) = self.target_of(&text);
        let Some(index) = target else {
            let e = ErrorCode::NoActiveResponse
                .ws_event_on("no response is in flight", lane.as_deref())
                .to_string();
            return self.send(e, ctx);
        };
        self.drive(index, Input::Cancel, Instant::now(), Some(&text), ctx);
    }

    fn on_other(&mut self, kind: String, text: ByteString, ctx: &mut Context<Self>) {
        if kind == "response.steer" {
            return self.on_steer(text, ctx);
        }
        let streaming = self.turns.iter().any(Turn::on_lease);
        match &self.up.lease {
            Some(lease) if streaming => lease.addr.do_send(SendText(text)),
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
        if self.client.gone {
            return;
        }
        self.client.gone = true;
        if self.turns.is_empty() {
            return self.stop_when_drained(ctx);
        }
        let now = Instant::now();
        for index in self.turns.iter().map(|t| t.index).collect::<Vec<_>>() {
            self.drive(index, Input::ClientGone, now, None, ctx);
        }
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let deps = self.deps.clone();
        let s = &deps.settings;
        let first_event_timeout = Duration::from_millis(s.upstream.first_event_timeout_ms);
        while let Some(i) = self.drains.iter().position(|d| now >= d.deadline) {
            // No terminal in time: the connection's state is unknown.
            self.end_drain(i, false, ctx);
        }
        let connection_silent = self.up.heard_at.map(|at| now.duration_since(at));
        for index in self.in_phase(Phase::Streaming) {
            let others = self.lease_in_use(Some(index));
            let tick = Input::Tick {
                connection_silent,
                others,
            };
            self.drive(index, tick, now, None, ctx);
        }
        let mut overdue = false;
        for lane in self.steers.values_mut() {
            if let Some(unused) = lane.successor_overdue(now, first_event_timeout) {
                gate::release_reservations(&self.deps, unused);
                overdue = true;
            }
        }
        if overdue {
            warn!(parent: &self.span, "the successor of a steered response never started; going on");
            self.pump(ctx);
        }
        if !self.turns.is_empty() {
            return;
        }
        let idle = now.duration_since(self.idle_since);
        if self.up.lease.is_some()
            && !self.lease_in_use(None)
            && idle >= Duration::from_millis(s.session.lease_idle_ms)
        {
            // Give the connection back, but prefer it next time.
            self.release_lease(true);
        }
        if idle >= Duration::from_millis(s.session.idle_timeout_ms) {
            self.close(close::NORMAL, "websocket idle timeout", ctx);
        }
    }

    /// After a turn ends: the connection is parked when nothing uses it, and closed when spent.
    fn settle_lease(&mut self) {
        if self.lease_in_use(None) || self.turns.iter().any(|t| t.m.phase() != Phase::Finishing) {
            return;
        }
        if self.up.spent {
            self.up.spent = false;
            self.release_lease(false);
        } else {
            self.park(true);
        }
    }
}

/// Counts a lease by how its frames reach the session (docs/DESIGN.md#direct-reads).
fn lease_reads(account: &str, reads: &'static str) {
    ::metrics::counter!(metric::LEASE_READS, "account" => account.to_string(), "reads" => reads)
        .increment(1);
}

/// What `lane` is doing, as a new create on it cares: its turn's phase, else whether a successor
/// the upstream will start on its own comes first.
fn lane_state(
    turns: &[Turn],
    steers: &std::collections::HashMap<LaneId, steer::SteerState>,
    lane: &LaneId,
) -> LaneState {
    match turns.iter().find(|t| &t.frame.stream_id == lane) {
        Some(t) if t.m.phase() == Phase::Finishing => LaneState::Ending,
        Some(_) => LaneState::Busy,
        None if steers.get(lane).is_some_and(steer::SteerState::awaiting) => LaneState::Busy,
        None => LaneState::Free,
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

/// The client error of a refused standing.
pub fn auth_error_code(e: &AuthError) -> ErrorCode {
    match e {
        AuthError::Missing => ErrorCode::MissingApiKey,
        AuthError::Invalid => ErrorCode::InvalidApiKey,
        AuthError::Revoked => ErrorCode::ApiKeyRevoked,
        AuthError::UserDisabled => ErrorCode::UserDisabled,
        AuthError::QuotaExhausted => ErrorCode::QuotaExhausted,
        AuthError::BalanceExhausted => ErrorCode::BalanceExhausted,
        AuthError::ModelNotAllowed(_) => ErrorCode::ModelNotAllowed,
        AuthError::ServiceTierNotAllowed(_) => ErrorCode::ServiceTierNotAllowed,
        AuthError::Db(_) => ErrorCode::NotReady,
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
        ::metrics::gauge!(metric::SESSIONS_OPEN).increment(1.0);
        self.deps.registry.do_send(Register {
            id: self.id.to_string(),
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
        for lane in self.steers.values_mut() {
            let unused = lane.take_reserved();
            gate::release_reservations(&self.deps, unused);
        }
        let clean = self.turns.is_empty() && !self.up.spent;
        self.release_lease(clean);
        // Preempted turns still draining are recorded with what was seen (estimated usage).
        for d in std::mem::take(&mut self.drains) {
            let mut record = self.close_drain(&d, false);
            // Its draw ends with it (its excess, if any, waits for the record: best effort).
            gate::end_draw(&self.deps, &mut record);
            self.deps.accounting.do_send(RecordTurn(record));
        }
        // Make sure the transport goes too.
        self.out(Outbound::Close(close::NORMAL, String::new()));
        self.deps.registry.do_send(Unregister {
            id: self.id.to_string(),
        });
        info!(parent: &self.span, turns = self.turn_index, "session closed");
    }
}

/// The client's bytes, straight from its socket.
impl StreamHandler<std::io::Result<actix_web::web::Bytes>> for SessionActor {
    fn handle(&mut self, chunk: std::io::Result<actix_web::web::Bytes>, ctx: &mut Self::Context) {
        let Ok(chunk) = chunk else {
            return self.on_client(ClientInput::Gone, ctx);
        };
        let mut steps = Vec::new();
        self.client.reader.feed(&chunk, |step| steps.push(step));
        for step in steps {
            match step {
                Read::Input(input) => self.on_client(input, ctx),
                Read::Ping(p) => self.client.tx.pong(p),
                Read::Close(reason) => {
                    self.client.tx.echo_close(reason);
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
                    self.client.acked_bytes = self.client.acked_bytes.max(u64::from_be_bytes(mark));
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
        let current = self.up.lease.as_ref().map(|l| l.conn);
        match msg {
            UpstreamEvent::Text { conn, text } if Some(conn) == current => {
                self.on_upstream_text(text, ctx);
                self.read_directly_once_relayed(ctx);
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

/// The leased connection's text frames, read on this actor (`read_directly`): the same as
/// `UpstreamEvent::Text` from the connection actor.
impl StreamHandler<(u64, ByteString)> for SessionActor {
    fn handle(&mut self, (conn, text): (u64, ByteString), ctx: &mut Self::Context) {
        <Self as Handler<UpstreamEvent>>::handle(self, UpstreamEvent::Text { conn, text }, ctx);
    }

    /// The lease ended, or its connection took the socket back: its frames come as messages.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<EndSession> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: EndSession, ctx: &mut Self::Context) {
        let code = msg.0;
        let close = code.spec().close.unwrap_or(close::GOING_AWAY);
        if self.turns.is_empty() {
            // An operator's end is said in words too; a shutdown's close code says it.
            if code == ErrorCode::SessionEnded {
                let e = Self::error_event(code, "the session was ended by the relay");
                self.send(e, ctx);
            }
            return self.close(close, code.code(), ctx);
        }
        // Every turn in flight ends with the error; the socket closes after the last.
        self.close_when_idle = Some((close, code.code()));
        self.answer_waiting(code, ctx);
        let message = "the session was ended by the relay";
        for index in self.running() {
            let abort = Input::Abort(code, message.into());
            self.drive(index, abort, Instant::now(), None, ctx);
        }
    }
}

impl Handler<EndWhenIdle> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: EndWhenIdle, ctx: &mut Self::Context) {
        let code = ErrorCode::ShuttingDown;
        let close = (code.spec().close.unwrap_or(close::GOING_AWAY), code.code());
        if self.turns.is_empty() {
            self.close(close.0, close.1, ctx);
        } else {
            // The turns finish normally; `finish` closes after the last one's last frame.
            // What waits behind them will not run: each is answered now.
            self.close_when_idle = Some(close);
            self.answer_waiting(ErrorCode::ShuttingDown, ctx);
        }
    }
}

impl Handler<Reclaim> for SessionActor {
    type Result = bool;

    /// The pool needs the connection this session holds between turns (docs/DESIGN.md#idle-reclaim). Given back
    /// only when no turn is in flight; the next turn continues its chain through §4.6.
    fn handle(&mut self, msg: Reclaim, _: &mut Self::Context) -> bool {
        let holds = self.up.lease.as_ref().is_some_and(|l| l.conn == msg.conn);
        // A successor the upstream is about to start needs this connection too.
        if !holds || !self.turns.is_empty() || self.lease_in_use(None) {
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
        // The most advanced phase of its turns.
        let has = |p: Phase| self.turns.iter().any(|t| t.m.phase() == p);
        let state = [
            Phase::Streaming,
            Phase::Finishing,
            Phase::Leasing,
            Phase::Admitting,
        ]
        .into_iter()
        .find(|p| has(*p))
        .map_or("idle", Phase::name);
        MessageResult(SessionInfo {
            id: self.id.to_string(),
            key_prefix: self.principal.key_prefix.clone(),
            user: self.principal.user_name.clone(),
            account: self.up.lease.as_ref().map(|l| l.account.to_string()),
            turns: self.turn_index,
            state,
            age_s: self.opened_at.elapsed().as_secs(),
            lanes: self.lanes.named(),
            queued: self.lanes.waiting(),
        })
    }
}
