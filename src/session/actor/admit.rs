//! Admission of a turn (SPEC §4.1, §4.3): standing, accounting, accounts, stored-response
//! bindings, slots; admission before preemption.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;

/// Standing reads are failing (process-wide): the state is logged when it changes only.
static STANDING_READS_FAILING: AtomicBool = AtomicBool::new(false);

impl SessionActor {
    /// SPEC §4.3: the new frame is admitted first — a refused frame gets its error event and
    /// preempts nothing; an admitted one ends the turn in flight (`response_preempted`) and
    /// starts. The latest frame wins while the check runs.
    pub(super) fn admit_then_preempt(&mut self, frame: CreateFrame, ctx: &mut Context<Self>) {
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

    /// Per-turn admission: standing re-read from the database, then the key and account slots.
    pub(super) fn admit(&mut self, ctx: &mut Context<Self>) {
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
    pub(super) fn read_standing(
        &self,
    ) -> impl Future<Output = Result<Option<(ApiKey, User)>, crate::db::DbError>> + 'static {
        let db = self.deps.db.clone();
        let key_id = self.principal.key_id;
        async move {
            let read = async move { queries::keys::by_id(&db, key_id).await };
            crate::db::within(crate::db::READ_DEADLINE, read).await
        }
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
    pub(super) fn account_candidates(&self) -> Vec<(String, usize)> {
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
    pub(super) fn read_binding(&self) -> impl Future<Output = Option<(String, i64)>> + 'static {
        let db = self.deps.db.clone();
        let prev = self
            .turn
            .as_ref()
            .filter(|t| t.frame.store)
            .and_then(|t| t.frame.previous_response_id.clone());
        async move {
            let prev = prev?;
            let read = async move { queries::bindings::lookup(&db, &prev).await };
            crate::db::within(crate::db::READ_DEADLINE, read)
                .await
                .ok()
                .flatten()
        }
    }

    /// Applies a stored response's binding: another key's response is refused; the account
    /// holding it serves the turn (when this relay has it).
    pub(super) fn apply_binding(
        &mut self,
        binding: Option<(String, i64)>,
    ) -> Option<(ErrorCode, String)> {
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

    pub(super) fn reject(&mut self, code: ErrorCode, message: &str, ctx: &mut Context<Self>) {
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
}
