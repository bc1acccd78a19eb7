//! `SessionActor`: one per client WebSocket. Every input — a client frame, an upstream event,
//! an admission or lease result, a timer tick, shutdown — is a message into this one
//! single-threaded state machine (SPEC §4).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use chrono::NaiveDateTime;
use serde_json::{Value, json};
use tracing::{Span, debug, info, info_span, warn};

use super::SessionDeps;
use super::admission::{AccountSlot, SlotGuard};
use super::messages::{EndSession, EndWhenIdle};
use super::registry::{Register, Unregister};
use super::socket::{ClientInput, Outbound};
use super::turn::{Ending, TurnTracker};
use crate::accounting::messages::RecordTurn;
use crate::auth::{AuthError, Principal, check_standing};
use crate::continuation::{self, Chain, Decision, History};
use crate::db::models::{ApiKey, User};
use crate::db::queries;
use crate::pool::messages::{Acquire, Lease, LeaseError, Parked, Reclaim, Release};
use crate::protocol::errors::ErrorCode;
use crate::protocol::events::EventKind;
use crate::protocol::frames::{self, ClientFrame, CreateFrame};
use crate::record::TurnRecord;
use crate::upstream::messages::{LostReason, SendText, UpstreamEvent};

/// The client's message when usage cannot be recorded.
const ACCOUNTING_UNAVAILABLE: &str =
    "usage cannot be recorded right now, so the relay does not serve turns; retry later";

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
    key_slot: Option<SlotGuard>,
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
    span: Span,
}

/// A preempted turn whose connection is read in the background (after `response.cancel`) for
/// the old response's terminal usage, which bills it (SPEC §4.3). The client has been told.
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

pub struct SessionActor {
    id: String,
    deps: Arc<SessionDeps>,
    principal: Principal,
    /// Last standing read from the database: admission falls back to it while the DB is down.
    standing: Option<(ApiKey, User)>,
    _session_slot: SlotGuard,
    headers: Vec<(String, String)>,
    turn_index: i32,
    model: Option<String>,
    lease: Option<Lease>,
    /// The connection of the last lease, preferred for the next one (affinity).
    preferred: Option<u64>,
    /// The conversation so far, for replay when a chain's connection is gone (SPEC §4.6).
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
    queued: Option<CreateFrame>,
    lease_failures: u32,
    idle_since: Instant,
    sent_bytes: u64,
    acked_bytes: u64,
    pinged_at: u64,
    /// The client socket transport (set right after the upgrade).
    client: Option<Recipient<Outbound>>,
    client_gone: bool,
    /// Cut off for not reading (`client_too_slow`): nothing more is queued but the last frame.
    cut_off: bool,
    /// The largest frame sent and possibly unread: (its length, the byte mark that shows it
    /// read).
    largest_unread: (u64, u64),
    close_after_turn: Option<(u16, &'static str)>,
    span: Span,
}

impl SessionActor {
    pub fn new(
        deps: Arc<SessionDeps>,
        principal: Principal,
        session_slot: SlotGuard,
        headers: Vec<(String, String)>,
    ) -> Self {
        let id = format!("sess_{}", random_hex(8));
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
            queued: None,
            lease_failures: 0,
            idle_since: Instant::now(),
            sent_bytes: 0,
            acked_bytes: 0,
            pinged_at: 0,
            client: None,
            client_gone: false,
            cut_off: false,
            largest_unread: (0, 0),
            close_after_turn: None,
            span,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn out(&self, msg: Outbound) {
        if let Some(c) = &self.client
            && !self.client_gone
        {
            c.do_send(msg);
        }
    }

    // ---- writing to the client -------------------------------------------------------------

    /// Queues a frame for the client. Every byte counts against
    /// `limits.client_send_buffer_bytes`, the relay's own error events included (SPEC §4.4b).
    /// The largest frame not yet shown read is allowed on top of the limit, so a client that
    /// reads is never cut off because one event is large; a client that does not read is cut
    /// off before this frame is queued once the rest of what it left unread is over the limit —
    /// what one connection holds queued never exceeds the limit plus its largest frame.
    fn send(&mut self, text: impl Into<ByteString>, ctx: &mut Context<Self>) {
        if self.client_gone {
            return;
        }
        let text: ByteString = text.into();
        if self.cut_off {
            // Only the cut-off's own last frame, right before the close.
            return self.out(Outbound::Text(text));
        }
        if self.acked_bytes >= self.largest_unread.1 {
            self.largest_unread = (0, 0);
        }
        let unread = self.sent_bytes.saturating_sub(self.acked_bytes);
        let beyond_largest = unread.saturating_sub(self.largest_unread.0);
        if beyond_largest as usize > self.deps.settings.limits.client_send_buffer_bytes {
            return self.too_slow(unread, ctx);
        }
        let len = text.len() as u64;
        self.sent_bytes += len;
        if len >= self.largest_unread.0 {
            self.largest_unread = (len, self.sent_bytes);
        }
        self.out(Outbound::Text(text));
        if self.sent_bytes - self.pinged_at >= PING_EVERY_BYTES {
            // The pong comes back only after the client has read everything before the ping.
            self.pinged_at = self.sent_bytes;
            self.out(Outbound::Ping(self.sent_bytes.to_be_bytes().to_vec()));
        }
    }

    /// The client does not read: `client_too_slow`, close 1008 (a turn in flight ends first).
    fn too_slow(&mut self, unread: u64, ctx: &mut Context<Self>) {
        self.cut_off = true;
        warn!(parent: &self.span, unread, "client not reading: cut off (client_too_slow)");
        let e = Self::error_event(
            ErrorCode::ClientTooSlow,
            "the client is not reading its events",
        );
        match self.turn.as_ref().map(|t| t.phase) {
            Some(phase) if phase != Phase::Finishing => self.finish(
                Ending::Aborted("client_too_slow"),
                Delivery {
                    last: Some(e),
                    reusable: false,
                    close: Some((1008, "client_too_slow")),
                },
                ctx,
            ),
            Some(_) => self.close_after_turn = Some((1008, "client_too_slow")),
            None => {
                self.out(Outbound::Text(e.into()));
                self.close(1008, "client_too_slow", ctx);
            }
        }
    }

    fn error_event(code: ErrorCode, message: &str) -> String {
        code.ws_event(message).to_string()
    }

    fn close(&mut self, code: u16, reason: &str, ctx: &mut Context<Self>) {
        self.out(Outbound::Close(code, reason.to_string()));
        ctx.stop();
    }

    /// A refusal that is not a turn: the error event, then the close its table row says.
    fn protocol_error(&mut self, code: ErrorCode, message: &str, ctx: &mut Context<Self>) {
        self.refuse_frame(code, message, code.spec().close, ctx)
    }

    /// The error event of `code`, then close with `close` (after ending a turn in flight).
    fn refuse_frame(
        &mut self,
        code: ErrorCode,
        message: &str,
        close: Option<u16>,
        ctx: &mut Context<Self>,
    ) {
        let event = Self::error_event(code, message);
        match close {
            Some(close) if self.turn.is_some() => {
                // The turn in flight ends first, with this error as its last frame.
                self.finish(
                    Ending::Aborted(code.code()),
                    Delivery {
                        last: Some(event),
                        reusable: false,
                        close: Some((close, code.code())),
                    },
                    ctx,
                );
            }
            Some(close) => {
                self.send(event, ctx);
                self.close(close, code.code(), ctx);
            }
            None => self.send(event, ctx),
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
        if let Some(turn) = &self.turn {
            if turn.phase == Phase::Finishing {
                // Handled as soon as the ending turn's record is acknowledged.
                self.queued = Some(frame);
                return;
            }
            match self.deps.settings.session.on_overlap {
                crate::config::OnOverlap::Reject => {
                    let e = Self::error_event(
                        ErrorCode::ResponseAlreadyInFlight,
                        "a response is in flight on this session; wait for its terminal event",
                    );
                    return self.send(e, ctx);
                }
                crate::config::OnOverlap::Preempt => return self.admit_then_preempt(frame, ctx),
            }
        }
        self.start_turn(frame, accepted, ctx);
    }

    /// SPEC §4.3: the new frame is admitted first — a refused frame gets its error event and
    /// preempts nothing; an admitted one ends the turn in flight (`response_preempted`) and
    /// starts. The latest frame wins while the check runs.
    fn admit_then_preempt(&mut self, frame: CreateFrame, ctx: &mut Context<Self>) {
        let checking = self.preempting.is_some();
        self.preempting = Some(frame);
        if checking {
            return;
        }
        ctx.spawn(self.read_standing().into_actor(self).map(|res, act, ctx| {
            let Some(frame) = act.preempting.take() else {
                return;
            };
            if let Some((code, message)) = act.refusal(res) {
                let e = Self::error_event(code, &message);
                return act.send(e, ctx);
            }
            let Some(turn) = act.turn.as_ref() else {
                // The turn in flight ended meanwhile.
                return act.start_turn(frame, Instant::now(), ctx);
            };
            act.queued = Some(frame);
            if turn.phase == Phase::Finishing {
                return;
            }
            let e = Self::error_event(
                ErrorCode::ResponsePreempted,
                "this response was ended by a newer response.create",
            );
            if turn.phase == Phase::Streaming {
                return act.preempt_streaming(e, ctx);
            }
            act.finish(
                Ending::Preempted,
                Delivery {
                    last: Some(e),
                    reusable: true,
                    close: None,
                },
                ctx,
            );
        }));
    }

    fn start_turn(&mut self, mut frame: CreateFrame, accepted: Instant, ctx: &mut Context<Self>) {
        let model = match (&frame.model, &self.model) {
            (Some(m), _) => m.clone(),
            (None, Some(m)) => {
                frame.raw = frames::with_model(&frame.raw, m);
                m.clone()
            }
            (None, None) => {
                let e = Self::error_event(
                    ErrorCode::ModelRequired,
                    "the first response.create of a session needs `model`",
                );
                return self.send(e, ctx);
            }
        };
        self.model = Some(model.clone());
        self.turn_index += 1;
        let index = self.turn_index;
        let turn_id = format!("turn_{}", random_hex(12));
        let span = info_span!(parent: &self.span, "turn", turn = index, request_id = %turn_id);
        self.turn = Some(Turn {
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
            span,
        });
        self.admit(ctx);
    }

    /// Per-turn admission: standing re-read from the database, then the key and account slots.
    fn admit(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let standing = self.read_standing();
        let binding = self.read_binding();
        let reads = futures_util::future::join(standing, binding);
        ctx.spawn(reads.into_actor(self).map(move |(res, binding), act, ctx| {
            if act.generation != generation {
                return;
            }
            if let Some((code, message)) = act.refusal(res) {
                return act.reject(code, &message, ctx);
            }
            if let Some((code, message)) = act.apply_binding(binding) {
                return act.reject(code, &message, ctx);
            }
            let slots = act.deps.slots.clone();
            let Some(key_slot) =
                slots.key_turn(act.principal.key_id, act.principal.max_concurrent_turns)
            else {
                return act.reject(
                    ErrorCode::ConcurrencyLimitExceeded,
                    "this key has its maximum of turns in flight",
                    ctx,
                );
            };
            let candidates = act.account_candidates();
            let Some(account_slot) = slots.account_turn(&candidates) else {
                return act.reject(
                    ErrorCode::AccountBusy,
                    "every upstream account is at its turn limit",
                    ctx,
                );
            };
            if let Some(turn) = act.turn.as_mut() {
                turn.key_slot = Some(key_slot);
                turn.account_slot = Some(account_slot);
                turn.phase = Phase::Leasing;
            }
            act.lease_and_send(ctx);
        }));
    }

    /// The key and its user, re-read for a turn (bounded: a database that does not answer
    /// counts as down).
    fn read_standing(
        &self,
    ) -> impl Future<Output = Result<Option<(ApiKey, User)>, crate::db::DbError>> + 'static {
        let db = self.deps.db.clone();
        let key_id = self.principal.key_id;
        async move {
            crate::db::within(crate::db::READ_DEADLINE, queries::keys::by_id(&db, key_id)).await
        }
    }

    /// Why a new turn must be refused before anything else (standing, accounting, accounts),
    /// given the standing just read.
    fn refusal(
        &mut self,
        read: Result<Option<(ApiKey, User)>, crate::db::DbError>,
    ) -> Option<(ErrorCode, String)> {
        let standing = match read {
            Ok(Some(s)) => {
                self.standing = Some(s.clone());
                Some(s)
            }
            Ok(None) => None,
            Err(e) => {
                // The database is down: decide on the last standing seen.
                warn!(parent: &self.span, error = %e, "standing read failed; using the last one");
                self.standing.clone()
            }
        };
        let refused = match &standing {
            // Never read, and unreadable now: the connect-time check stands.
            None if self.standing.is_none() => None,
            None => Some(AuthError::Revoked),
            Some((key, user)) => {
                let pending = self.deps.pending_spend.of(key.id, user.id);
                check_standing(key, user, pending).err()
            }
        };
        if let Some(r) = refused {
            return Some((auth_error_code(&r), r.to_string()));
        }
        if self.deps.accounting_health.refusal().is_some() {
            // The cause (paths, hosts) is for the operator's log and /readyz, not clients.
            return Some((
                ErrorCode::AccountingUnavailable,
                ACCOUNTING_UNAVAILABLE.into(),
            ));
        }
        if self.deps.accounts.is_empty() {
            return Some((
                ErrorCode::NoUpstreamAccounts,
                "the relay has no upstream account configured".into(),
            ));
        }
        None
    }

    /// Accounts in the order this session prefers them: the one it holds a lease on first; a
    /// turn continuing a stored response goes to the account holding it, and only there.
    fn account_candidates(&self) -> Vec<(String, usize)> {
        let all = self
            .deps
            .accounts
            .iter()
            .map(|a| (a.name.clone(), a.turn_limit));
        if let Some(bound) = self.turn.as_ref().and_then(|t| t.bound_account.as_deref()) {
            return all.filter(|(n, _)| n == bound).collect();
        }
        let held = self.lease.as_ref().map(|l| l.account.to_string());
        let mut out: Vec<(String, usize)> = all.collect();
        if let Some(h) = held {
            out.sort_by_key(|(n, _)| *n != h);
        }
        out
    }

    /// The binding of the stored response a turn continues (`store:true` with
    /// `previous_response_id`), read with the standing; `None` when there is none to read or
    /// the database does not answer (the turn then goes to any account).
    fn read_binding(&self) -> impl Future<Output = Option<(String, i64)>> + 'static {
        let db = self.deps.db.clone();
        let prev = self
            .turn
            .as_ref()
            .filter(|t| t.frame.store)
            .and_then(|t| t.frame.previous_response_id.clone());
        async move {
            let prev = prev?;
            let read = queries::bindings::lookup(&db, &prev);
            crate::db::within(crate::db::READ_DEADLINE, read)
                .await
                .ok()
                .flatten()
        }
    }

    /// Applies a stored response's binding: another key's response is refused; the account
    /// holding it serves the turn (when this relay has it).
    fn apply_binding(&mut self, binding: Option<(String, i64)>) -> Option<(ErrorCode, String)> {
        let (account, key_id) = binding?;
        if key_id != self.principal.key_id {
            return Some((
                ErrorCode::PreviousResponseForbidden,
                "previous_response_id names a response created with another key".into(),
            ));
        }
        if self.deps.accounts.iter().any(|a| a.name == account) {
            if let Some(turn) = self.turn.as_mut() {
                turn.bound_account = Some(account);
            }
        } else {
            warn!(parent: &self.span, %account, "stored response bound to an account this relay does not have");
        }
        None
    }

    fn reject(&mut self, code: ErrorCode, message: &str, ctx: &mut Context<Self>) {
        let e = Self::error_event(code, message);
        self.finish(
            Ending::Rejected(code.code()),
            Delivery {
                last: Some(e),
                reusable: true,
                close: None,
            },
            ctx,
        );
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
            if *lease.account == *account && lease.opened_at.elapsed() < max_age {
                self.park(false);
                return self.send_upstream(ctx);
            }
            // Another account, or too old: give it back.
            self.release_lease(true);
        }
        let Some(handle) = self.deps.accounts.iter().find(|a| a.name == account) else {
            return;
        };
        self.generation += 1;
        let generation = self.generation;
        let acquire = handle.pool.send(Acquire {
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
                if let Ok(lease) = res
                    && let Some(h) = act.deps.accounts.iter().find(|a| *a.name == *lease.account)
                {
                    h.pool.do_send(Release {
                        conn: lease.conn,
                        reusable: true,
                    });
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
                    let e = Self::error_event(
                        ErrorCode::UpstreamUnavailable,
                        "no upstream connection became free in time; retry",
                    );
                    let close = (act.lease_failures
                        >= act.deps.settings.session.max_lease_failures)
                        .then_some((1013, "upstream_unavailable"));
                    act.finish(
                        Ending::Rejected("upstream_unavailable"),
                        Delivery {
                            last: Some(e),
                            reusable: true,
                            close,
                        },
                        ctx,
                    );
                }
                Err(err) => {
                    // The detail (upstream URL, host) is for the operator's log only.
                    warn!(parent: &act.span, error = %err, "no upstream connection for the turn");
                    let message = match err {
                        LeaseError::ShuttingDown => "the relay is shutting down",
                        _ => "the upstream could not be reached; retry",
                    };
                    let e = Self::error_event(ErrorCode::UpstreamUnavailable, message);
                    act.finish(
                        Ending::Rejected("upstream_unavailable"),
                        Delivery {
                            last: Some(e),
                            reusable: true,
                            close: None,
                        },
                        ctx,
                    );
                }
            }
        }));
    }

    /// The continuation decision for the turn about to run on `conn` (SPEC §4.6).
    fn continuation(&self, turn: &Turn, conn: u64, not_found: bool) -> Decision {
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
    fn send_upstream(&mut self, ctx: &mut Context<Self>) {
        let (Some(turn), Some(lease)) = (self.turn.as_ref(), self.lease.as_ref()) else {
            return;
        };
        let decision = self.continuation(turn, lease.conn, false);
        self.write_request(decision, ctx);
    }

    fn write_request(&mut self, decision: Decision, ctx: &mut Context<Self>) {
        let (Some(turn), Some(lease)) = (self.turn.as_mut(), self.lease.as_ref()) else {
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
                let e = Self::error_event(ErrorCode::ContinuationUnavailable, reason);
                return self.finish(
                    Ending::Rejected(ErrorCode::ContinuationUnavailable.code()),
                    Delivery {
                        last: Some(e),
                        reusable: true,
                        close: None,
                    },
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

    // ---- upstream events --------------------------------------------------------------------

    fn on_upstream_text(&mut self, text: ByteString, ctx: &mut Context<Self>) {
        let Some(turn) = self.turn.as_mut().filter(|t| t.phase == Phase::Streaming) else {
            // Data between turns: the connection's state is unknown now.
            warn!(parent: &self.span, "upstream frame outside a turn; dropping the connection");
            return self.release_lease(false);
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
                let delivery = Delivery {
                    last: Some(text.to_string()),
                    reusable: true,
                    close: None,
                };
                self.finish(Ending::Terminal(kind), delivery, ctx);
            }
            EventKind::Error => {
                let (code, request_level) = upstream_error_code(&text);
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
                let delivery = Delivery {
                    last: Some(text.to_string()),
                    reusable: request_level,
                    close: None,
                };
                self.finish(Ending::UpstreamError(code), delivery, ctx);
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
            LostReason::Closed(Some(1012 | 1013)) => (
                ErrorCode::UpstreamRestarting,
                "the upstream is restarting; retry this turn",
            ),
            LostReason::Protocol(what) => (ErrorCode::UpstreamProtocolError, what),
            _ => (
                ErrorCode::UpstreamConnectionLost,
                "the upstream connection was lost mid-turn; retry this turn",
            ),
        };
        let e = Self::error_event(code, message);
        self.finish(
            Ending::UpstreamLost(code.code()),
            Delivery {
                last: Some(e),
                reusable: false,
                close: None,
            },
            ctx,
        );
    }

    // ---- turn end ---------------------------------------------------------------------------

    /// The usage record of `turn`, ended with `outcome`, on `account`.
    fn record_of(
        &self,
        turn: &Turn,
        outcome: crate::session::turn::Outcome,
        account: String,
    ) -> TurnRecord {
        TurnRecord {
            request_id: turn.turn_id.clone(),
            response_id: outcome.response_id,
            api_key_id: self.principal.key_id,
            user_id: self.principal.user_id,
            session_id: self.id.clone(),
            turn_index: turn.index,
            account,
            model: turn.model.clone(),
            status: outcome.status.to_string(),
            usage_source: outcome.usage_source.to_string(),
            warmup: turn.frame.warmup,
            usage: outcome.usage,
            cost_nanousd: self
                .deps
                .prices
                .cost(&turn.model, &outcome.usage, turn.frame.warmup),
            timing: outcome.timing,
            error_code: outcome.error_code,
            accepted_at: turn.accepted_wall,
        }
    }

    /// Ends the turn in flight: its record goes to accounting, and only once accounting has
    /// acknowledged it (durable) does the client get the turn's last frame. Not acknowledged
    /// within `accounting.ack_timeout_ms` → the client gets `accounting_unavailable` instead
    /// (never a terminal without a durable record); the record stays with accounting, which
    /// writes it when it can.
    fn finish(&mut self, ending: Ending, delivery: Delivery, ctx: &mut Context<Self>) {
        if self
            .turn
            .as_ref()
            .is_none_or(|t| t.phase == Phase::Finishing)
        {
            return;
        }
        self.remember_response(&ending, delivery.last.as_deref());
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        self.generation += 1;
        let streaming = turn.phase == Phase::Streaming;
        turn.phase = Phase::Finishing;
        // Slots are free as soon as the turn is over, whatever happens next.
        turn.key_slot = None;
        turn.account_slot = None;
        // A refusal because accounting is down does not wait for accounting.
        let wait = ending != Ending::Rejected(ErrorCode::AccountingUnavailable.code());
        let outcome = turn.tracker.finish(ending, Instant::now());
        let account = self
            .lease
            .as_ref()
            .map(|l| l.account.to_string())
            .unwrap_or_default();
        let Some(turn) = self.turn.as_ref() else {
            return;
        };
        let record = self.record_of(turn, outcome, account);
        info!(parent: &turn.span, status = record.status, usage_source = record.usage_source,
            response_id = record.response_id.as_deref(), input_tokens = record.usage.input_tokens,
            first_token_ms = ?record.timing.first_token_ms, duration_ms = record.timing.duration_ms, "turn ended");
        if streaming && !delivery.reusable {
            self.release_lease(false);
        }
        let store = self.turn.as_ref().is_some_and(|t| t.frame.store);
        let bind = self.bind_stored(&record, store);
        let durable = self.record(record, wait);
        let durable = async move { futures_util::future::join(durable, bind).await.0 };
        // `wait`: nothing else happens in this session until the record is safe.
        ctx.wait(durable.into_actor(self).map(move |durable, act, ctx| {
            act.turn = None;
            act.idle_since = Instant::now();
            act.park(true);
            let last = if durable {
                delivery.last
            } else {
                warn!(parent: &act.span, "turn record not durable in time: accounting_unavailable instead of the terminal event");
                Some(Self::error_event(ErrorCode::AccountingUnavailable, ACCOUNTING_UNAVAILABLE))
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
            if let Some(next) = act.queued.take() {
                act.start_turn(next, Instant::now(), ctx);
            }
        }));
    }

    /// A response that completed (or is incomplete) continues the chain: its id is the one a
    /// next turn may name, its connection the one that holds it, and its input and output
    /// join the history a replay would send.
    fn remember_response(&mut self, ending: &Ending, terminal: Option<&str>) {
        use crate::protocol::events::TerminalKind::{Completed, Incomplete};
        let (Ending::Terminal(Completed | Incomplete), Some(turn), Some(lease)) =
            (ending, self.turn.as_ref(), self.lease.as_ref())
        else {
            return;
        };
        let Some(id) = turn.tracker.response_id.clone() else {
            return;
        };
        let output = terminal.map(continuation::output_items).unwrap_or_default();
        self.history.record_turn(turn.frame.input.as_ref(), &output);
        self.last_response = Some((id, lease.conn));
    }

    /// A completed `store:true` response is bound to its account and key (`response_bindings`)
    /// before the client hears of it, so its chain continues there from any relay instance.
    /// A failure is logged: the chain then goes to any account (the upstream decides).
    fn bind_stored(&self, record: &TurnRecord, store: bool) -> impl Future<Output = ()> + 'static {
        let binding = (store && record.status == "completed")
            .then(|| record.response_id.clone())
            .flatten()
            .map(|id| (id, record.account.clone(), record.api_key_id));
        let db = self.deps.db.clone();
        let ttl = chrono::Duration::seconds(
            i64::try_from(self.deps.settings.session.binding_ttl_s).unwrap_or(i64::MAX / 2),
        );
        let span = self.span.clone();
        async move {
            let Some((id, account, key)) = binding else {
                return;
            };
            let expires = crate::db::now() + ttl;
            let write = queries::bindings::bind(&db, &id, &account, key, expires);
            if let Err(e) = crate::db::within(crate::db::READ_DEADLINE, write).await {
                warn!(parent: &span, error = %e, response_id = %id, "stored response not bound to its account");
            }
        }
    }

    /// Hands a record to accounting; resolves to whether it is durable within
    /// `accounting.ack_timeout_ms` (at once `true` when `wait` is false: the caller does not
    /// hold anything back for it).
    fn record(&self, record: TurnRecord, wait: bool) -> impl Future<Output = bool> + 'static {
        let accounting = self.deps.accounting.clone();
        let limit = Duration::from_millis(self.deps.settings.accounting.ack_timeout_ms);
        async move {
            let acked = accounting.send(RecordTurn(record));
            if !wait {
                // Queued with the actor all the same; it writes the record when it can.
                tokio::spawn(acked);
                return true;
            }
            matches!(tokio::time::timeout(limit, acked).await, Ok(Ok(Ok(()))))
        }
    }

    /// Preempts the streaming turn (SPEC §4.3): the client is told at once and the new turn
    /// starts on a fresh lease, while the old connection gets `response.cancel` and is read in
    /// the background, up to `session.drain_ms`, for the old response's terminal usage.
    fn preempt_streaming(&mut self, event: String, ctx: &mut Context<Self>) {
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
        if let Some(next) = self.queued.take() {
            self.start_turn(next, now, ctx);
        }
    }

    /// An upstream event for a drained connection; `None` means the connection was lost.
    fn on_drain_event(&mut self, conn: u64, text: Option<ByteString>, ctx: &mut Context<Self>) {
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
    fn end_drain(&mut self, i: usize, clean: bool, ctx: &mut Context<Self>) {
        let d = self.drains.swap_remove(i);
        self.release(&d.lease, clean);
        let outcome = d.turn.tracker.finish(Ending::Preempted, d.ended_at);
        let record = self.record_of(&d.turn, outcome, d.lease.account.to_string());
        info!(parent: &d.turn.span, status = record.status, usage_source = record.usage_source,
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

    /// Stops the session once no preempted turn is still draining.
    fn stop_when_drained(&mut self, ctx: &mut Context<Self>) {
        if self.drains.is_empty() {
            ctx.stop();
        } else {
            self.stop_after_drains = true;
        }
    }

    fn release_lease(&mut self, reusable: bool) {
        if let Some(lease) = self.lease.take() {
            self.release(&lease, reusable);
        }
    }

    /// Tells the pool whether the held connection is between turns (reclaimable) or in use.
    fn park(&self, parked: bool) {
        if let Some(lease) = &self.lease
            && let Some(h) = self
                .deps
                .accounts
                .iter()
                .find(|a| *a.name == *lease.account)
        {
            h.pool.do_send(Parked {
                conn: lease.conn,
                parked,
            });
        }
    }

    /// Gives a connection back to its account's pool.
    fn release(&self, lease: &Lease, reusable: bool) {
        if let Some(h) = self
            .deps
            .accounts
            .iter()
            .find(|a| *a.name == *lease.account)
        {
            h.pool.do_send(Release {
                conn: lease.conn,
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
                self.finish(
                    Ending::Cancelled,
                    Delivery {
                        last: Some(cancelled_event(&id)),
                        reusable: true,
                        close: None,
                    },
                    ctx,
                );
            }
            Phase::Finishing => {}
        }
    }

    fn on_other(&mut self, kind: String, text: ByteString, ctx: &mut Context<Self>) {
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
                self.finish(
                    Ending::ClientGone,
                    Delivery {
                        last: None,
                        reusable: true,
                        close: None,
                    },
                    ctx,
                );
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
                return self.finish(
                    Ending::ClientGone,
                    Delivery {
                        last: None,
                        reusable: false,
                        close: None,
                    },
                    ctx,
                );
            }
            if turn.cancel_deadline.is_some_and(|d| now >= d) {
                let id = turn
                    .tracker
                    .response_id
                    .clone()
                    .unwrap_or_else(|| turn.turn_id.clone());
                return self.finish(
                    Ending::Cancelled,
                    Delivery {
                        last: Some(cancelled_event(&id)),
                        reusable: false,
                        close: None,
                    },
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
        let idle = now.duration_since(self.idle_since);
        if self.lease.is_some() && idle >= Duration::from_millis(s.session.lease_idle_ms) {
            // Give the connection back, but prefer it next time.
            self.release_lease(true);
        }
        if idle >= Duration::from_millis(s.session.idle_timeout_ms) {
            self.close(1000, "websocket idle timeout", ctx);
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if getrandom::fill(&mut b).is_err() {
        // Uniqueness, not secrecy, is what ids need.
        let n = crate::sim::monotonic_ns().to_le_bytes();
        b.iter_mut()
            .zip(n.iter().cycle())
            .for_each(|(x, y)| *x = *y);
    }
    hex::encode(b)
}

fn cancelled_event(response_id: &str) -> String {
    json!({"type": "response.cancelled", "response": {"id": response_id, "object": "response", "status": "cancelled", "usage": null}}).to_string()
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
        self.deps.registry.do_send(Register {
            id: self.id.clone(),
            session: ctx.address().recipient(),
            when_idle: ctx.address().recipient(),
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
        let clean = self.turn.is_none();
        self.release_lease(clean);
        // Preempted turns still draining are recorded with what was seen (estimated usage).
        for d in std::mem::take(&mut self.drains) {
            self.release(&d.lease, false);
            let outcome = d.turn.tracker.finish(Ending::Preempted, d.ended_at);
            let record = self.record_of(&d.turn, outcome, d.lease.account.to_string());
            self.deps.accounting.do_send(RecordTurn(record));
        }
        // Make sure the transport goes too.
        self.out(Outbound::Close(1000, String::new()));
        self.deps.registry.do_send(Unregister {
            id: self.id.clone(),
        });
        info!(parent: &self.span, turns = self.turn_index, "session closed");
    }
}

/// The transport to write to; sent once, right after the upgrade.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach(pub Recipient<Outbound>);

impl Handler<Attach> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: Attach, _: &mut Self::Context) {
        self.client = Some(msg.0);
    }
}

impl Handler<ClientInput> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: ClientInput, ctx: &mut Self::Context) {
        match msg {
            ClientInput::Text(text) => self.on_frame(text, ctx),
            ClientInput::Binary => self.protocol_error(
                ErrorCode::BinaryFrame,
                "binary frames are not supported; send JSON text frames",
                ctx,
            ),
            ClientInput::Pong(p) => {
                if let Ok(mark) = <[u8; 8]>::try_from(p.as_slice()) {
                    self.acked_bytes = self.acked_bytes.max(u64::from_be_bytes(mark));
                }
            }
            ClientInput::InvalidUtf8 => self.refuse_frame(
                ErrorCode::InvalidJson,
                "a text frame that is not valid UTF-8",
                Some(1007),
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
        let close = code.spec().close.unwrap_or(1001);
        let e = Self::error_event(code, "the session was ended by the relay");
        match self.turn.as_ref().map(|t| t.phase) {
            None => self.close(close, code.code(), ctx),
            Some(Phase::Finishing) => self.close_after_turn = Some((close, code.code())),
            Some(phase) => {
                let reusable = phase != Phase::Streaming;
                self.finish(
                    Ending::Aborted(code.code()),
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
        let close = (code.spec().close.unwrap_or(1001), code.code());
        if self.turn.is_none() {
            self.close(close.0, close.1, ctx);
        } else {
            // The turn finishes normally; `finish` closes after its last frame.
            self.close_after_turn = Some(close);
            self.queued = None;
            self.preempting = None;
        }
    }
}

impl Handler<Reclaim> for SessionActor {
    type Result = bool;

    /// The pool needs the connection this session holds between turns (SPEC §4.4c). Given back
    /// only when no turn is in flight; the next turn continues its chain through §4.6.
    fn handle(&mut self, msg: Reclaim, _: &mut Self::Context) -> bool {
        let holds = self.lease.as_ref().is_some_and(|l| l.conn == msg.conn);
        if !holds || self.turn.is_some() {
            return false;
        }
        debug!(parent: &self.span, conn = msg.conn, "connection reclaimed by the pool between turns");
        self.release_lease(true);
        true
    }
}
