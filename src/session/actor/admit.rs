//! Admission of a turn (docs/DESIGN.md#turn, §4.3): standing, accounting, accounts, stored-response
//! bindings, slots; admission before preemption.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::db::queries::reservations::NewReservation;
use crate::session::admission::{KeySlot, SlotGuard};
use crate::session::fleet::{SlotKind, Taken};
use crate::session::gate;
use crate::session::lanes::Check;

/// Standing reads are failing (process-wide): the state is logged when it changes only.
static STANDING_READS_FAILING: AtomicBool = AtomicBool::new(false);

impl SessionActor {
    /// docs/DESIGN.md#preemption: the new frame is admitted first — a refused frame gets its error event and
    /// preempts nothing; an admitted one ends its lane's turn in flight (`response_preempted`) and
    /// starts. The latest frame of a lane wins while the check runs.
    pub(super) fn admit_then_preempt(&mut self, frame: CreateFrame, ctx: &mut Context<Self>) {
        let lane = frame.stream_id.clone();
        if let Check::Supersedes(older) = self.lanes.check(frame) {
            // The check running for its lane decides for the newer frame; this one is
            // answered, never started.
            let e = Self::frame_error(
                &older,
                ErrorCode::ResponsePreempted,
                "this response.create was superseded by a newer one before it started",
            );
            self.send(e, ctx);
            return;
        }
        ctx.spawn(
            self.read_standing()
                .into_actor(self)
                .map(move |res, act, ctx| {
                    let Some(frame) = act.lanes.checked(&lane) else {
                        return;
                    };
                    let model = frame.model.clone().or_else(|| act.model.clone());
                    let asked = act.refusal(res).or_else(|| {
                        act.request_refusal(model.as_deref(), frame.service_tier.as_deref())
                    });
                    if let Some((code, message)) = asked {
                        let e = Self::frame_error(&frame, code, &message);
                        return act.send(e, ctx);
                    }
                    act.supersede_waiting(&lane, ctx);
                    act.lanes.push(frame, Instant::now());
                    let Some(index) = act
                        .turns
                        .iter()
                        .find(|t| t.frame.stream_id == lane)
                        .map(|t| t.index)
                    else {
                        // The lane's turn ended meanwhile.
                        return act.pump(ctx);
                    };
                    let message = "this response was ended by a newer response.create";
                    act.drive(
                        index,
                        Input::Preempt(message.into()),
                        Instant::now(),
                        None,
                        ctx,
                    );
                }),
        );
    }

    /// Per-turn admission: standing re-read from the database, then the key and account slots.
    pub(super) fn admit(&mut self, index: i32, ctx: &mut Context<Self>) {
        let Some(generation) = self.at(index).map(|t| t.generation) else {
            return;
        };
        let standing = self.read_standing();
        let binding = self.read_binding(index);
        let affinity = self.read_affinity(index);
        let reads = futures_util::future::join3(standing, binding, affinity);
        ctx.spawn(
            reads
                .into_actor(self)
                .map(move |(res, binding, affinity), act, ctx| {
                    let Some(turn) = act.current(index, generation) else {
                        return;
                    };
                    turn.affinity = affinity;
                    let (model, tier) = (turn.model.clone(), turn.frame.service_tier.clone());
                    let asked = act
                        .refusal(res)
                        .or_else(|| act.request_refusal(Some(&model), tier.as_deref()));
                    if let Some((code, message)) = asked {
                        return act.reject(index, code, &message, ctx);
                    }
                    if let Some((code, message)) = act.apply_binding(index, binding) {
                        return act.reject(index, code, &message, ctx);
                    }
                    let slots = act.deps.slots.clone();
                    let Some(key_slot) =
                        slots.key_turn(act.principal.key_id, act.principal.max_concurrent_turns)
                    else {
                        return act.reject(
                            index,
                            ErrorCode::ConcurrencyLimitExceeded,
                            "this key has its maximum of turns in flight",
                            ctx,
                        );
                    };
                    let candidates = act.account_candidates(Some(index));
                    let Some(account_slot) = slots.account_turn(&candidates) else {
                        return act.reject(
                            index,
                            ErrorCode::AccountBusy,
                            "every upstream account is at its turn limit",
                            ctx,
                        );
                    };
                    if let Some(turn) = act.at_mut(index) {
                        turn.account_slot = Some(account_slot);
                    }
                    act.fleet_slot_then_reserve(index, key_slot, generation, ctx);
                }),
        );
    }

    /// Turn `index` if it is still in flight and `generation` is still its step.
    fn current(&mut self, index: i32, generation: u64) -> Option<&mut Turn> {
        self.at_mut(index)
            .filter(|t| t.generation == generation && t.m.phase() != Phase::Finishing)
    }

    /// docs/DESIGN.md#fleet-slots: a key with a turn limit counts its turn for the whole
    /// fleet too (relays sharing PostgreSQL) before its reservation.
    fn fleet_slot_then_reserve(
        &mut self,
        index: i32,
        local: SlotGuard,
        generation: u64,
        ctx: &mut Context<Self>,
    ) {
        let limit = self.principal.max_concurrent_turns;
        let Some(fleet) = self.deps.fleet.clone().filter(|_| limit.is_some()) else {
            if let Some(turn) = self.at_mut(index) {
                turn.key_slot = Some(KeySlot::new(local, None));
            }
            return self.reserve_then_lease(index, generation, ctx);
        };
        let key = self.principal.key_id;
        let take = async move { fleet.take(key, SlotKind::Turn, limit).await };
        ctx.spawn(take.into_actor(self).map(move |taken, act, ctx| {
            let Some(turn) = act.current(index, generation) else {
                return;
            };
            match taken {
                Taken::Full => act.reject(
                    index,
                    ErrorCode::ConcurrencyLimitExceeded,
                    "this key has its maximum of turns in flight (across relays)",
                    ctx,
                ),
                Taken::Granted(slot) => {
                    turn.key_slot = Some(KeySlot::new(local, slot));
                    act.reserve_then_lease(index, generation, ctx);
                }
            }
        }));
    }

    /// docs/DESIGN.md#reservations: a key with a quota, or a user with a balance, reserves the
    /// turn's expected cost in the database before anything goes upstream; a reservation that
    /// does not fit refuses the turn, and one that cannot be taken (the database is down)
    /// refuses it too — money fails closed. Others go straight to the lease.
    fn reserve_then_lease(&mut self, index: i32, generation: u64, ctx: &mut Context<Self>) {
        let Some(reservation) = self.reservation(index) else {
            return self.start_leasing(index, ctx);
        };
        let request_id = reservation.request_id.clone();
        let reserve = self.take_reservation(reservation);
        ctx.spawn(reserve.into_actor(self).map(move |res, act, ctx| {
            if act.current(index, generation).is_none() {
                // The turn ended meanwhile (its record may be written already): a reservation
                // taken late is dropped rather than left to expire.
                if res.is_ok() {
                    act.release_reservations(vec![request_id]);
                }
                return;
            }
            match res {
                Ok(()) => act.start_leasing(index, ctx),
                Err((code, message)) => act.reject(index, code, message, ctx),
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

    fn start_leasing(&mut self, index: i32, ctx: &mut Context<Self>) {
        self.drive(index, Input::Admitted, Instant::now(), None, ctx);
    }

    /// The reservation turn `index` takes, if its key or user is limited.
    fn reservation(&self, index: i32) -> Option<NewReservation> {
        let turn = self.at(index)?;
        self.reservation_for(gate::ReservationAsk {
            request_id: turn.turn_id.to_string(),
            model: &turn.model,
            service_tier: turn.frame.service_tier.as_deref(),
            previous_response_id: turn.frame.previous_response_id.as_deref(),
            warmup: turn.frame.warmup,
            prompt_bytes: turn.frame.prompt_bytes,
            max_output_tokens: turn.frame.max_output_tokens,
        })
    }

    /// The reservation of turn `request_id` (a create, or the successor of a steer), if the
    /// key or its user is limited.
    pub(super) fn reservation_for(&self, ask: gate::ReservationAsk<'_>) -> Option<NewReservation> {
        gate::reservation_for(&self.deps, self.standing.as_ref(), ask)
    }

    /// The key and its user, re-read for a turn.
    pub(super) fn read_standing(
        &self,
    ) -> impl Future<Output = Result<Option<(ApiKey, User)>, crate::db::DbError>> + 'static {
        gate::read_standing(&self.deps, self.principal.key_id)
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

    /// Why the key may not ask for a turn of `model` at `tier` (docs/DESIGN.md#key-limits), on
    /// the standing last read; a turn without a model yet is refused later (`model_required`).
    fn request_refusal(
        &self,
        model: Option<&str>,
        tier: Option<&str>,
    ) -> Option<(ErrorCode, String)> {
        gate::request_refusal(self.standing.as_ref(), model?, tier)
    }

    /// Accounts in the order this session prefers them (docs/DESIGN.md#accounts): the one it
    /// holds a lease on first among those not cooling; accounts the turn already failed to
    /// reach are left out; a turn continuing a stored response goes to its account only.
    pub(super) fn account_candidates(&self, index: Option<i32>) -> Vec<(String, usize)> {
        let turn = index.and_then(|i| self.at(i));
        let affinity = turn.and_then(|t| t.affinity.as_ref());
        let held = self.up.lease.as_ref().map(|l| l.account.to_string());
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

    /// The affinity of turn `index`: its `prompt_cache_key`, else the client's session id.
    fn read_affinity(&self, index: i32) -> impl Future<Output = Option<gate::Affinity>> + 'static {
        let session = self
            .headers
            .iter()
            .find(|(k, _)| k == "session-id" || k == "session_id")
            .map(|(_, v)| v.as_str());
        let key = crate::pool::routing::affinity_key(
            self.at(index)
                .and_then(|t| t.frame.prompt_cache_key.as_deref()),
            session,
        );
        gate::read_affinity(&self.deps, self.principal.key_id, key)
    }

    /// The upstream answered the turn with an account-level error before anything was
    /// forwarded: the account cools down and the turn fails over (its connection is given back
    /// once the new lease comes). `false`, changing nothing, when no other account can take it.
    pub(super) fn fail_over_in_band(
        &mut self,
        index: i32,
        code: &str,
        ctx: &mut Context<Self>,
    ) -> bool {
        let account = match self.at(index) {
            Some(t) if t.over_http() => t.account_slot.as_ref().map(|s| s.account.clone()),
            _ => self.up.lease.as_ref().map(|l| l.account.to_string()),
        };
        let Some(account) = account else {
            return false;
        };
        let others = self
            .account_candidates(Some(index))
            .iter()
            .any(|(n, _)| *n != account);
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
        self.failover(index, ctx)
    }

    /// The turn's account could not be reached: it moves to the next account that can take
    /// it, transparently (docs/DESIGN.md#accounts). `false` when none can (or the turn is bound
    /// to a stored response's account).
    pub(super) fn failover(&mut self, index: i32, ctx: &mut Context<Self>) -> bool {
        let Some(turn) = self.at_mut(index) else {
            return false;
        };
        if turn.bound_account.is_some() {
            return false;
        }
        let Some(failed) = turn.account_slot.as_ref().map(|s| s.account.clone()) else {
            return false;
        };
        turn.tried.push(failed.clone());
        let candidates = self.account_candidates(Some(index));
        let slots = self.deps.slots.clone();
        let Some(slot) = slots.account_turn(&candidates) else {
            return false;
        };
        let Some(turn) = self.at_mut(index) else {
            return false;
        };
        info!(parent: &turn.span, from = %failed, to = %slot.account, "failover: the turn moves to another account");
        turn.account_slot = Some(slot);
        self.lease_and_send(index, ctx);
        true
    }

    /// The binding of the stored response a turn continues (`store:true` with
    /// `previous_response_id`), read with the standing.
    pub(super) fn read_binding(
        &self,
        index: i32,
    ) -> impl Future<Output = Option<(String, i64)>> + 'static {
        let prev = self
            .at(index)
            .filter(|t| t.frame.store)
            .and_then(|t| t.frame.previous_response_id.clone());
        gate::read_binding(&self.deps, prev)
    }

    /// Applies a stored response's binding: another key's response is refused; the account
    /// holding it serves the turn (when this relay has it).
    pub(super) fn apply_binding(
        &mut self,
        index: i32,
        binding: Option<(String, i64)>,
    ) -> Option<(ErrorCode, String)> {
        match gate::bound_account(&self.deps, self.principal.key_id, binding, &self.span) {
            Err(refused) => Some(refused),
            Ok(account) => {
                if let (Some(turn), Some(account)) = (self.at_mut(index), account) {
                    turn.bound_account = Some(account);
                }
                None
            }
        }
    }

    pub(super) fn reject(
        &mut self,
        index: i32,
        code: ErrorCode,
        message: &str,
        ctx: &mut Context<Self>,
    ) {
        let refused = Input::Refused(code, message.into());
        self.drive(index, refused, Instant::now(), None, ctx);
    }
}
