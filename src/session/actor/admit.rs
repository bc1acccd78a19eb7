//! Admission of a turn (docs/DESIGN.md#turn, §4.3): standing, accounting, accounts, stored-response
//! bindings, slots; admission before preemption.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::db::queries::reservations::NewReservation;
use crate::session::admission::{KeySlot, SlotGuard};
use crate::session::fleet::{SlotKind, Taken};
use crate::session::gate;

/// Standing reads are failing (process-wide): the state is logged when it changes only.
static STANDING_READS_FAILING: AtomicBool = AtomicBool::new(false);

impl SessionActor {
    /// docs/DESIGN.md#preemption: the new frame is admitted first — a refused frame gets its error event and
    /// preempts nothing; an admitted one ends the turn in flight (`response_preempted`) and
    /// starts. The latest frame wins while the check runs.
    pub(super) fn admit_then_preempt(&mut self, frame: CreateFrame, ctx: &mut Context<Self>) {
        // A frame still being checked is superseded: it is answered, never started.
        if let Some(older) = self.preempting.replace(frame) {
            let e = Self::frame_error(
                &older,
                ErrorCode::ResponsePreempted,
                "this response.create was superseded by a newer one before it started",
            );
            self.send(e, ctx);
            return;
        }
        ctx.spawn(self.read_standing().into_actor(self).map(|res, act, ctx| {
            let Some(frame) = act.preempting.take() else {
                return;
            };
            if let Some((code, message)) = act.refusal(res) {
                let e = Self::frame_error(&frame, code, &message);
                return act.send(e, ctx);
            }
            let Some(phase) = act.turn.as_ref().map(|t| t.phase) else {
                // The turn in flight ended meanwhile.
                return act.start_turn(frame, Instant::now(), ctx);
            };
            act.supersede_waiting(ctx);
            act.queued.push_back((frame, Instant::now()));
            if phase == Phase::Finishing {
                return;
            }
            let e = act.turn_error(
                ErrorCode::ResponsePreempted,
                "this response was ended by a newer response.create",
            );
            if phase == Phase::Streaming {
                return act.preempt_streaming(e, ctx);
            }
            act.finish(Ending::Preempted, Delivery::reusable(Some(e)), ctx);
        }));
    }

    /// Per-turn admission: standing re-read from the database, then the key and account slots.
    pub(super) fn admit(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        let generation = self.generation;
        let standing = self.read_standing();
        let binding = self.read_binding();
        let affinity = self.read_affinity();
        let reads = futures_util::future::join3(standing, binding, affinity);
        ctx.spawn(
            reads
                .into_actor(self)
                .map(move |(res, binding, affinity), act, ctx| {
                    if act.generation != generation {
                        return;
                    }
                    if let Some(turn) = act.turn.as_mut() {
                        turn.affinity = affinity;
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
                        turn.account_slot = Some(account_slot);
                    }
                    act.fleet_slot_then_reserve(key_slot, generation, ctx);
                }),
        );
    }

    /// docs/DESIGN.md#fleet-slots: a key with a turn limit counts its turn for the whole
    /// fleet too (relays sharing PostgreSQL) before its reservation.
    fn fleet_slot_then_reserve(
        &mut self,
        local: SlotGuard,
        generation: u64,
        ctx: &mut Context<Self>,
    ) {
        let limit = self.principal.max_concurrent_turns;
        let Some(fleet) = self.deps.fleet.clone().filter(|_| limit.is_some()) else {
            if let Some(turn) = self.turn.as_mut() {
                turn.key_slot = Some(KeySlot::new(local, None));
            }
            return self.reserve_then_lease(generation, ctx);
        };
        let key = self.principal.key_id;
        let take = async move { fleet.take(key, SlotKind::Turn, limit).await };
        ctx.spawn(take.into_actor(self).map(move |taken, act, ctx| {
            if act.generation != generation {
                return;
            }
            match taken {
                Taken::Full => act.reject(
                    ErrorCode::ConcurrencyLimitExceeded,
                    "this key has its maximum of turns in flight (across relays)",
                    ctx,
                ),
                Taken::Granted(slot) => {
                    if let Some(turn) = act.turn.as_mut() {
                        turn.key_slot = Some(KeySlot::new(local, slot));
                    }
                    act.reserve_then_lease(generation, ctx);
                }
            }
        }));
    }

    /// docs/DESIGN.md#reservations: a key with a quota, or a user with a balance, reserves the
    /// turn's expected cost in the database before anything goes upstream; a reservation that
    /// does not fit refuses the turn, and one that cannot be taken (the database is down)
    /// refuses it too — money fails closed. Others go straight to the lease.
    fn reserve_then_lease(&mut self, generation: u64, ctx: &mut Context<Self>) {
        let Some(reservation) = self.reservation() else {
            return self.start_leasing(ctx);
        };
        let request_id = reservation.request_id.clone();
        let reserve = self.take_reservation(reservation);
        ctx.spawn(reserve.into_actor(self).map(move |res, act, ctx| {
            if act.generation != generation {
                // The turn ended meanwhile (its record may be written already): a reservation
                // taken late is dropped rather than left to expire.
                if res.is_ok() {
                    act.release_reservations(vec![request_id]);
                }
                return;
            }
            match res {
                Ok(()) => act.start_leasing(ctx),
                Err((code, message)) => act.reject(code, message, ctx),
            }
        }));
    }

    /// Takes a reservation (docs/DESIGN.md#reservations).
    pub(super) fn take_reservation(
        &self,
        reservation: NewReservation,
    ) -> impl Future<Output = Result<(), (ErrorCode, &'static str)>> + 'static {
        gate::take_reservation(&self.deps, reservation, self.span.clone())
    }

    /// Drops reservations whose turns will not run.
    pub(super) fn release_reservations(&self, ids: Vec<String>) {
        gate::release_reservations(&self.deps, ids);
    }

    fn start_leasing(&mut self, ctx: &mut Context<Self>) {
        if let Some(turn) = self.turn.as_mut() {
            turn.phase = Phase::Leasing;
        }
        self.lease_and_send(ctx);
    }

    /// The reservation the turn in flight takes, if its key or user is limited.
    fn reservation(&self) -> Option<NewReservation> {
        let turn = self.turn.as_ref()?;
        self.reservation_for(
            turn.turn_id.clone(),
            &turn.model,
            turn.frame.warmup,
            turn.frame.prompt_bytes,
            turn.frame.max_output_tokens,
        )
    }

    /// The reservation of turn `request_id` (a create, or the successor of a steer), if the
    /// key or its user is limited.
    pub(super) fn reservation_for(
        &self,
        request_id: String,
        model: &str,
        warmup: bool,
        prompt_bytes: usize,
        max_output_tokens: Option<u64>,
    ) -> Option<NewReservation> {
        gate::reservation_for(
            &self.deps,
            self.standing.as_ref(),
            gate::ReservationAsk {
                request_id,
                model,
                warmup,
                prompt_bytes,
                max_output_tokens,
            },
        )
    }

    /// The key and its user, re-read for a turn.
    pub(super) fn read_standing(
        &self,
    ) -> impl Future<Output = Result<Option<(ApiKey, User)>, crate::db::DbError>> + 'static {
        gate::read_standing(self.deps.db.clone(), self.principal.key_id)
    }

    /// Why a new turn must be refused before anything else (standing, accounting, accounts),
    /// given the standing just read.
    pub(super) fn refusal(
        &mut self,
        read: Result<Option<(ApiKey, User)>, crate::db::DbError>,
    ) -> Option<(ErrorCode, String)> {
        let standing = match read {
            Ok(Some(s)) => {
                if STANDING_READS_FAILING.swap(false, Ordering::Relaxed) {
                    info!(parent: &self.span, "standing reads work again");
                }
                self.standing = Some(s.clone());
                Some(s)
            }
            Ok(None) => None,
            Err(e) => {
                // The database is down: decide on the last standing seen. Logged once when
                // reads start failing and once when they work again, not per turn.
                if !STANDING_READS_FAILING.swap(true, Ordering::Relaxed) {
                    warn!(parent: &self.span, error = %e, "standing reads failing; turns are admitted on the last standing read");
                }
                self.standing.clone()
            }
        };
        let refused = match &standing {
            // Never read, and unreadable now: the connect-time check stands.
            None if self.standing.is_none() => None,
            other => gate::standing_refusal(&self.deps, other.as_ref()),
        };
        refused.or_else(|| gate::service_refusal(&self.deps))
    }

    /// Accounts in the order this session prefers them (docs/DESIGN.md#accounts): the one it
    /// holds a lease on first among those not cooling; accounts the turn already failed to
    /// reach are left out; a turn continuing a stored response goes to its account only.
    pub(super) fn account_candidates(&self) -> Vec<(String, usize)> {
        let turn = self.turn.as_ref();
        let affinity = turn.and_then(|t| t.affinity.as_ref());
        let held = self.lease.as_ref().map(|l| l.account.to_string());
        let route = gate::Route {
            tried: turn.map_or(&[], |t| &t.tried),
            bound: turn.and_then(|t| t.bound_account.as_deref()),
            held: held.as_deref(),
            sticky: affinity.and_then(|a| a.sticky()),
            seed: affinity.map_or_else(
                || crate::pool::routing::seed_of(&self.id),
                gate::Affinity::seed,
            ),
        };
        gate::candidates(&self.deps, route)
    }

    /// The affinity of the turn in flight: its `prompt_cache_key`, else the client's session id.
    fn read_affinity(&self) -> impl Future<Output = Option<gate::Affinity>> + 'static {
        let session = self
            .headers
            .iter()
            .find(|(k, _)| k == "session-id" || k == "session_id")
            .map(|(_, v)| v.as_str());
        let key = crate::pool::routing::affinity_key(
            self.turn
                .as_ref()
                .and_then(|t| t.frame.prompt_cache_key.as_deref()),
            session,
        );
        gate::read_affinity(&self.deps, self.principal.key_id, key)
    }

    /// The upstream answered the turn with an account-level error before anything was
    /// forwarded: the account cools down and the turn fails over (its connection is given back
    /// once the new lease comes). `false`, changing nothing, when no other account can take it.
    pub(super) fn fail_over_in_band(&mut self, code: &str, ctx: &mut Context<Self>) -> bool {
        let Some(account) = self.lease.as_ref().map(|l| l.account.to_string()) else {
            return false;
        };
        let others = self.account_candidates().iter().any(|(n, _)| *n != account);
        if !others {
            return false;
        }
        if let Some(a) = self.deps.accounts.iter().find(|a| a.name == account) {
            let (wait, first) = a.health.failed(
                &crate::pool::health::Failure {
                    error: &format!("the upstream answered {code}"),
                    retry_after: None,
                    credential_refused: code == "invalid_api_key",
                },
                Instant::now(),
            );
            if first {
                warn!(parent: &self.span, %account, code, cooling_ms = crate::num::millis(wait),
                    "upstream account refusing turns; they go to other accounts while it cools down");
            }
        }
        if let Some(turn) = self.turn.as_mut() {
            turn.phase = Phase::Leasing;
        }
        if self.failover(ctx) {
            return true;
        }
        if let Some(turn) = self.turn.as_mut() {
            turn.phase = Phase::Streaming;
        }
        false
    }

    /// The turn's account could not be reached: it moves to the next account that can take
    /// it, transparently (docs/DESIGN.md#accounts). `false` when none can (or the turn is bound
    /// to a stored response's account).
    pub(super) fn failover(&mut self, ctx: &mut Context<Self>) -> bool {
        let Some(turn) = self.turn.as_mut() else {
            return false;
        };
        if turn.bound_account.is_some() {
            return false;
        }
        let Some(failed) = turn.account_slot.as_ref().map(|s| s.account.clone()) else {
            return false;
        };
        turn.tried.push(failed.clone());
        let candidates = self.account_candidates();
        let slots = self.deps.slots.clone();
        let Some(slot) = slots.account_turn(&candidates) else {
            return false;
        };
        let Some(turn) = self.turn.as_mut() else {
            return false;
        };
        info!(parent: &turn.span, from = %failed, to = %slot.account, "failover: the turn moves to another account");
        turn.account_slot = Some(slot);
        self.lease_and_send(ctx);
        true
    }

    /// The binding of the stored response a turn continues (`store:true` with
    /// `previous_response_id`), read with the standing.
    pub(super) fn read_binding(&self) -> impl Future<Output = Option<(String, i64)>> + 'static {
        let prev = self
            .turn
            .as_ref()
            .filter(|t| t.frame.store)
            .and_then(|t| t.frame.previous_response_id.clone());
        gate::read_binding(&self.deps, prev)
    }

    /// Applies a stored response's binding: another key's response is refused; the account
    /// holding it serves the turn (when this relay has it).
    pub(super) fn apply_binding(
        &mut self,
        binding: Option<(String, i64)>,
    ) -> Option<(ErrorCode, String)> {
        match gate::bound_account(&self.deps, self.principal.key_id, binding, &self.span) {
            Err(refused) => Some(refused),
            Ok(account) => {
                if let (Some(turn), Some(account)) = (self.turn.as_mut(), account) {
                    turn.bound_account = Some(account);
                }
                None
            }
        }
    }

    pub(super) fn reject(&mut self, code: ErrorCode, message: &str, ctx: &mut Context<Self>) {
        let e = self.turn_error(code, message);
        self.finish(Ending::Rejected(code), Delivery::reusable(Some(e)), ctx);
    }
}
