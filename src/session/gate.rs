//! What every turn passes through, whatever carried it (a WebSocket session or an HTTP
//! request; docs/DESIGN.md#http-surface): the standing and accounting checks, the reservation,
//! the stored-response binding, the choice of accounts, and at the end the usage record made
//! durable. Plain functions over `SessionDeps`, so both transports run the same code.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use tracing::{Span, info, warn};

use super::SessionDeps;
use crate::accounting::messages::RecordTurn;
use crate::auth::{AuthError, Principal, check_standing};
use crate::billing::blocks::{Ask, Blocks, GiveBack, Holder, Released};
use crate::billing::reservation::{Refusal, Taken};
use crate::db::models::{ApiKey, User};
use crate::db::queries;
use crate::db::queries::reservations::NewReservation;
use crate::ids::BlockId;
use crate::pool::routing::Candidate;
use crate::protocol::errors::ErrorCode;
use crate::record::{Origin, Transport, TurnRecord};
use crate::session::turn::Outcome;
use crate::telemetry::metric;

/// The client's message when usage cannot be recorded.
pub const ACCOUNTING_UNAVAILABLE: &str =
    "usage cannot be recorded right now, so the relay does not serve turns; retry later";

/// The key and its user, re-read for a turn (bounded: a database that does not answer counts
/// as down) — or as read within `limits.standing_cache_ms` (docs/DESIGN.md#admission-cache).
pub fn read_standing(
    deps: &SessionDeps,
    key_id: i64,
) -> impl Future<Output = Result<Option<(ApiKey, User)>, crate::db::DbError>> + 'static {
    let cached = deps.standings.fresh(&key_id, Instant::now());
    let (db, standings) = (deps.db.clone(), deps.standings.clone());
    async move {
        if let Some(standing) = cached {
            return Ok(Some(standing));
        }
        let read = async move { queries::keys::by_id(&db, key_id).await };
        let read = crate::db::within(crate::db::READ_DEADLINE, read).await;
        if let Ok(Some(standing)) = &read {
            standings.store(key_id, standing.clone(), Instant::now());
        }
        read
    }
}

/// Why a turn must be refused for its key's and user's standing (`None`: the key is gone),
/// spend durable in the spool but not yet in the database counted.
pub fn standing_refusal(
    deps: &SessionDeps,
    standing: Option<&(ApiKey, User)>,
) -> Option<(ErrorCode, String)> {
    let refused = match standing {
        None => AuthError::Revoked,
        Some((key, user)) => {
            let pending = deps.pending_spend.of(key.id, user.id);
            check_standing(key, user, pending).err()?
        }
    };
    Some((
        crate::session::actor::auth_error_code(&refused),
        refused.to_string(),
    ))
}

/// Why no turn can be served now, whoever asks: accounting cannot make records durable, or
/// there is no upstream account.
pub fn service_refusal(deps: &SessionDeps) -> Option<(ErrorCode, String)> {
    if deps.accounting_health.refusal().is_some() {
        // The cause (paths, hosts) is for the operator's log and /readyz, not clients.
        return Some((
            ErrorCode::AccountingUnavailable,
            ACCOUNTING_UNAVAILABLE.into(),
        ));
    }
    if deps.accounts.is_empty() {
        return Some((
            ErrorCode::NoUpstreamAccounts,
            "the relay has no upstream account configured".into(),
        ));
    }
    None
}

/// Why a key may not ask for this turn (its model and service tier; docs/DESIGN.md#key-limits),
/// checked before the upstream is asked.
pub fn request_refusal(
    standing: Option<&(ApiKey, User)>,
    model: &str,
    service_tier: Option<&str>,
) -> Option<(ErrorCode, String)> {
    let (key, _) = standing?;
    let refused = crate::auth::check_request(key, model, service_tier).err()?;
    Some((
        crate::session::actor::auth_error_code(&refused),
        refused.to_string(),
    ))
}

/// What a turn reserves against: its id, model, tier and the request's size.
pub struct ReservationAsk<'a> {
    pub request_id: String,
    pub model: &'a str,
    /// The `service_tier` asked for (`auto` or none: standard).
    pub service_tier: Option<&'a str>,
    /// The response it continues: its context is billed again as input.
    pub previous_response_id: Option<&'a str>,
    pub warmup: bool,
    pub prompt_bytes: usize,
    pub max_output_tokens: Option<u64>,
}

/// The reservation of a turn, if its key or user is limited (docs/DESIGN.md#reservations).
pub fn reservation_for(
    deps: &SessionDeps,
    standing: Option<&(ApiKey, User)>,
    ask: ReservationAsk<'_>,
) -> Option<NewReservation> {
    let (key, user) = standing?;
    if key.quota_nanousd.is_none() && user.balance_nanousd.is_none() {
        return None;
    }
    let billing = &deps.settings.billing;
    let tier = crate::billing::pricing::billed_tier(None, ask.service_tier);
    let input = crate::billing::reservation::Input {
        prompt_bytes: ask.prompt_bytes,
        context_tokens: ask
            .previous_response_id
            .map_or(0, |id| deps.chains.context_of(id, key.id)),
    };
    let amount = crate::billing::reservation::expected_cost(
        &deps.prices.price_of(ask.model, &tier).0,
        ask.warmup,
        input,
        ask.max_output_tokens
            .unwrap_or(billing.reserve_output_tokens),
        billing.max_tokens_per_response,
    );
    Some(reservation_row(
        deps,
        ask.request_id,
        key.id,
        user.id,
        amount,
    ))
}

/// A reservation row of `amount` taken now, counting for `billing.reservation_ttl_s`.
fn reservation_row(
    deps: &SessionDeps,
    request_id: String,
    api_key_id: i64,
    user_id: i64,
    amount_nanousd: i64,
) -> NewReservation {
    let at = crate::db::now();
    let ttl = chrono::Duration::seconds(
        i64::try_from(deps.settings.billing.reservation_ttl_s).unwrap_or(i64::MAX / 1000),
    );
    NewReservation {
        request_id,
        api_key_id,
        user_id,
        amount_nanousd,
        created_at: at,
        expires_at: at + ttl,
    }
}

/// What taking a reservation answers: `Ok` when the turn may run, else the client's code and
/// words.
pub type Reserved = Result<(), (ErrorCode, &'static str)>;

/// Takes a reservation (docs/DESIGN.md#reservations): a draw on the key's open block in
/// memory, else a new block or the turn's own row in the database
/// (docs/DESIGN.md#reservation-blocks). A refusal comes with the client's code and words (a
/// database that does not answer refuses: money fails closed). The database work runs on its
/// own: a turn whose session stops meanwhile (its client vanished) has whatever it took
/// released when it is taken, not left held until the TTL.
pub fn take_reservation(
    deps: &SessionDeps,
    reservation: NewReservation,
    span: Span,
) -> impl Future<Output = Reserved> + 'static {
    let (db, blocks) = (deps.db.clone(), deps.blocks.clone());
    let request_id = reservation.request_id.clone();
    let ask = blocks.ask(
        reservation.api_key_id,
        &request_id,
        reservation.amount_nanousd,
        Instant::now(),
    );
    let coming = if ask == Ask::Drawn {
        ::metrics::counter!(metric::RESERVATIONS, "how" => "drawn").increment(1);
        Coming::Now(Ok(()))
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (release_db, release_blocks, id) = (db.clone(), blocks.clone(), request_id.clone());
        let (db, blocks) = (db.clone(), blocks.clone());
        actix::spawn(async move {
            let reserved = reserve_in_db(db, blocks, reservation, ask, span).await;
            if let Err(Ok(())) = tx.send(reserved) {
                // Nobody waits for it any more: what was taken goes back.
                release(&release_blocks, &release_db, vec![id]);
            }
        });
        Coming::Later(rx)
    };
    let mut answer = Answer {
        blocks,
        db,
        request_id,
        coming: Some(coming),
    };
    async move {
        let reserved = match answer.coming.as_mut() {
            Some(Coming::Now(now)) => std::mem::replace(now, Ok(())),
            Some(Coming::Later(later)) => later.await.unwrap_or(Err((
                ErrorCode::AccountingUnavailable,
                ACCOUNTING_UNAVAILABLE,
            ))),
            None => Err((ErrorCode::AccountingUnavailable, ACCOUNTING_UNAVAILABLE)),
        };
        answer.delivered();
        reserved
    }
}

/// Where a reservation's answer comes from: at once (a draw), or from the database task.
enum Coming {
    Now(Reserved),
    Later(tokio::sync::oneshot::Receiver<Reserved>),
}

/// A reservation's answer on its way to its turn: dropped undelivered (the session stopped),
/// it releases what was taken — or leaves that to the database task, which then finds nobody
/// to tell.
struct Answer {
    blocks: Arc<Blocks>,
    db: crate::db::DbPool,
    request_id: String,
    /// `None` once the turn has its answer: nothing left to release on its behalf.
    coming: Option<Coming>,
}

impl Answer {
    /// The turn has its answer: nothing left to release on its behalf.
    fn delivered(&mut self) {
        self.coming = None;
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        let taken = match self.coming.take() {
            None => false,
            Some(Coming::Now(now)) => now.is_ok(),
            Some(Coming::Later(mut later)) => {
                // From here the task's send fails (and it releases); an answer sent before
                // is released here.
                later.close();
                matches!(later.try_recv(), Ok(Ok(())))
            }
        };
        if taken {
            release(
                &self.blocks,
                &self.db,
                vec![std::mem::take(&mut self.request_id)],
            );
        }
    }
}

/// The database part of `take_reservation`: a new block or the turn's own row.
async fn reserve_in_db(
    db: crate::db::DbPool,
    blocks: Arc<Blocks>,
    reservation: NewReservation,
    ask: Ask,
    span: Span,
) -> Reserved {
    let (key, amount) = (reservation.api_key_id, reservation.amount_nanousd);
    let reservation_user = reservation.user_id;
    let block = match ask {
        Ask::Drawn => return Ok(()),
        Ask::Acquire {
            id,
            size,
            give_back,
        } => Some(Acquiring {
            blocks,
            key,
            give_back,
            id,
            size,
            asked: Instant::now(),
            done: false,
            answered: false,
        }),
        Ask::Exact => None,
    };
    let given_back = block
        .as_ref()
        .and_then(|b| b.give_back.as_ref())
        .map(NewReservation::given_back);
    let offer = block.as_ref().map(|b| (b.id.clone(), b.size));
    let (request_id, expires_at) = (reservation.request_id.clone(), reservation.expires_at);
    let call = async move {
        let offer = offer.as_ref().map(|(id, size)| (id.as_str(), *size));
        queries::reservations::reserve(&db, &reservation, offer, given_back.as_ref()).await
    };
    let taken = crate::db::within(crate::db::READ_DEADLINE, call).await;
    if let Some(mut b) = block {
        if taken.is_ok() {
            // The give-back is written (in the reservation's transaction), and the block
            // was either taken or surely not.
            b.give_back = None;
            b.answered = true;
        }
        if let Ok(Ok(Taken::Block(size))) = taken {
            b.done = true;
            let holder = Holder {
                key,
                user: reservation_user,
                expires_at,
            };
            b.blocks.acquired(
                b.id.clone(),
                holder,
                size,
                &request_id,
                amount,
                Instant::now(),
            );
        }
    }
    match taken {
        Ok(Ok(taken)) => {
            let how = match taken {
                Taken::Block(_) => "block",
                Taken::Own => "own",
            };
            ::metrics::counter!(metric::RESERVATIONS, "how" => how).increment(1);
            Ok(())
        }
        Ok(Err(Refusal::Quota)) => Err((
            ErrorCode::QuotaExhausted,
            "this key's remaining quota does not cover the turn's expected cost (turns in flight included)",
        )),
        Ok(Err(Refusal::Balance)) => Err((
            ErrorCode::BalanceExhausted,
            "the remaining balance does not cover the turn's expected cost (turns in flight included)",
        )),
        Err(e) => {
            warn!(parent: &span, error = %e, "turn reservation not taken; the turn is refused");
            Err((ErrorCode::AccountingUnavailable, ACCOUNTING_UNAVAILABLE))
        }
    }
}

/// A block being taken for a key: the key may ask for another once this ends, whichever way
/// (dropped with its turn too); a give-back not surely written is tried again, and a block
/// without a clear answer is deleted in case it was written.
struct Acquiring {
    blocks: Arc<Blocks>,
    key: i64,
    give_back: Option<GiveBack>,
    id: BlockId,
    size: i64,
    asked: Instant,
    /// Acquired: it serves turns.
    done: bool,
    /// The database answered (taken or not); else its row may exist unknown to the relay.
    answered: bool,
}

impl Drop for Acquiring {
    fn drop(&mut self) {
        if let Some(back) = self.give_back.take() {
            self.blocks.retry(back);
        }
        if !self.done {
            self.blocks.not_acquired(self.key);
        }
        if !self.answered {
            self.blocks.unclear(self.id.clone(), self.asked);
        }
    }
}

/// Drops reservations whose turns will not run (in the background; they expire anyway): a
/// draw goes back to its block, a row of the turn's own is deleted.
pub fn release_reservations(deps: &SessionDeps, ids: Vec<String>) {
    release(&deps.blocks, &deps.db, ids);
}

fn release(blocks: &Blocks, db: &crate::db::DbPool, ids: Vec<String>) {
    let work: Vec<(String, Released)> = ids
        .into_iter()
        .map(|id| {
            let released = blocks.release(&id);
            (id, released)
        })
        .filter(|(_, r)| *r != Released::Local)
        .collect();
    if work.is_empty() {
        return;
    }
    let db = db.clone();
    actix::spawn(async move {
        for (id, released) in work {
            let _ = match released {
                Released::GiveBack(back) => {
                    queries::reservations::hold(&db, &NewReservation::given_back(&back)).await
                }
                Released::Own | Released::Local => queries::reservations::release(&db, &id).await,
            };
        }
    });
}

/// The binding of the stored response a turn continues (`store:true` with
/// `previous_response_id`); `None` when there is none or the database does not answer (the turn
/// then goes to any account).
pub fn read_binding(
    deps: &SessionDeps,
    previous: Option<String>,
) -> impl Future<Output = Option<(String, i64)>> + 'static {
    let db = deps.db.clone();
    async move {
        let prev = previous?;
        let read = async move { queries::bindings::lookup(&db, &prev).await };
        crate::db::within(crate::db::READ_DEADLINE, read)
            .await
            .ok()
            .flatten()
    }
}

/// The account a stored response binds a turn to: `Err` when the response is another key's;
/// `Ok(None)` when there is no binding or this relay lacks its account (logged).
pub fn bound_account(
    deps: &SessionDeps,
    key_id: i64,
    binding: Option<(String, i64)>,
    span: &Span,
) -> Result<Option<String>, (ErrorCode, String)> {
    let Some((account, owner)) = binding else {
        return Ok(None);
    };
    if owner != key_id {
        return Err((
            ErrorCode::PreviousResponseForbidden,
            "previous_response_id names a response created with another key".into(),
        ));
    }
    if deps.accounts.iter().any(|a| a.name == account) {
        return Ok(Some(account));
    }
    warn!(parent: span, %account, "stored response bound to an account this relay does not have");
    Ok(None)
}

/// How a turn chooses among accounts (docs/DESIGN.md#routing).
#[derive(Debug, Default, Clone, Copy)]
pub struct Route<'a> {
    /// Accounts it could not reach (left out).
    pub tried: &'a [String],
    /// The account of the stored response it continues: that one only.
    pub bound: Option<&'a str>,
    /// The account of the lease a session holds (its connection carries the chain).
    pub held: Option<&'a str>,
    /// The account that served the last turn of its affinity.
    pub sticky: Option<&'a str>,
    /// The rendezvous seed (the affinity's, else the session's or request's).
    pub seed: u64,
}

/// Accounts in the order a turn tries them, with their turn limits (`pool::routing::order`);
/// a turn bound to a stored response's account gets that one only.
pub fn candidates(deps: &SessionDeps, route: Route<'_>) -> Vec<(String, usize)> {
    let all: Vec<&super::AccountHandle> = deps
        .accounts
        .iter()
        .filter(|a| !route.tried.contains(&a.name))
        .filter(|a| route.bound.is_none_or(|b| b == a.name))
        .collect();
    let now = Instant::now();
    let view: Vec<Candidate<'_>> = all
        .iter()
        .map(|a| Candidate {
            name: &a.name,
            priority: a.priority,
            weight: a.weight,
            cooling: a.health.cooling(now),
            held: route.held == Some(a.name.as_str()),
        })
        .collect();
    crate::pool::routing::order(&view, route.sticky, route.seed)
        .into_iter()
        .map(|i| (all[i].name.clone(), all[i].turn_limit))
        .collect()
}

/// What a client is told when no account could serve its turn: when every account is out
/// (cooling or disabled), that, and when the next one may be tried.
pub fn unavailable(deps: &SessionDeps) -> String {
    let now = Instant::now();
    let views: Vec<_> = deps.accounts.iter().map(|a| a.health.view(now)).collect();
    if views.is_empty() || views.iter().any(|v| v.state == "healthy") {
        return "the upstream could not be reached; retry".into();
    }
    match views.iter().filter_map(|v| v.next_probe_ms).min() {
        Some(ms) => format!(
            "every upstream account is cooling down or disabled; retry in {} s",
            ms.div_ceil(1000).max(1)
        ),
        None => "every upstream account is disabled; an operator must enable one".into(),
    }
}

/// A turn's affinity (docs/DESIGN.md#routing): its key, and the account that served the last
/// turn of it (with when that was written), if remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Affinity {
    pub key: String,
    pub known: Option<(String, NaiveDateTime)>,
}

impl Affinity {
    pub fn sticky(&self) -> Option<&str> {
        self.known.as_ref().map(|(a, _)| a.as_str())
    }

    pub fn seed(&self) -> u64 {
        crate::pool::routing::seed_of(&self.key)
    }
}

/// Reads the affinity of `key` (none without a key; not read with `pool.affinity_ttl_s = 0`,
/// or when the database does not answer: the rendezvous order alone then routes the turn).
pub fn read_affinity(
    deps: &SessionDeps,
    key_id: i64,
    key: Option<String>,
) -> impl Future<Output = Option<Affinity>> + 'static {
    let db = deps.db.clone();
    let keep = deps.settings.pool.affinity_ttl_s > 0;
    let affinities = deps.affinities.clone();
    async move {
        let key = key?;
        let recent = (key_id, key);
        let known = if !keep {
            None
        } else if let Some(known) = affinities.fresh(&recent, Instant::now()) {
            known
        } else {
            let k = recent.1.clone();
            let read = async move { queries::affinity::lookup(&db, key_id, &k).await };
            let read = crate::db::within(crate::db::READ_DEADLINE, read).await;
            // Only what the database said is kept (not an outage's silence).
            if let Ok(known) = &read {
                affinities.store(recent.clone(), known.clone(), Instant::now());
            }
            read.ok().flatten()
        };
        Some(Affinity {
            key: recent.1,
            known,
        })
    }
}

/// After a turn `account` served: the affinity now points there (written only when it changed
/// or a quarter of its TTL has passed; the future resolves once written, or at once). A move
/// away from the remembered account is logged and counted: it costs the prompt cache.
pub fn remember_affinity(
    deps: &SessionDeps,
    key_id: i64,
    affinity: &Affinity,
    account: &str,
    span: &Span,
) -> Option<impl Future<Output = ()> + 'static> {
    let ttl_s = deps.settings.pool.affinity_ttl_s;
    if ttl_s == 0 || account.is_empty() {
        return None;
    }
    let ttl = chrono::Duration::seconds(i64::try_from(ttl_s).unwrap_or(i64::MAX / 1000));
    let at = crate::db::now();
    if let Some((known, written)) = &affinity.known {
        if known == account && at - *written < ttl / 4 {
            return None;
        }
        if known != account {
            ::metrics::counter!(metric::AFFINITY_MOVES, "from" => known.clone()).increment(1);
            info!(parent: span, from = %known, to = account, affinity = %affinity.key,
                "affinity moved: its account could not take the turn");
        }
    }
    let db = deps.db.clone();
    let (key, account) = (affinity.key.clone(), account.to_string());
    // This relay's later turns of the affinity read what it just wrote.
    let recent = (key_id, key.clone());
    deps.affinities
        .store(recent, Some((account.clone(), at)), Instant::now());
    Some(async move {
        let write =
            async move { queries::affinity::remember(&db, key_id, &key, &account, at + ttl).await };
        // Best effort: a lost write costs one cache miss, never a turn.
        let _ = crate::db::within(crate::db::READ_DEADLINE, write).await;
    })
}

/// Who a turn was, for its record.
pub struct TurnIdentity<'a> {
    pub request_id: &'a crate::ids::TurnId,
    pub session_id: &'a crate::ids::SessionId,
    pub turn_index: i32,
    pub model: &'a str,
    pub warmup: bool,
    pub accepted_at: NaiveDateTime,
    pub origin: Origin,
    /// The `service_tier` the request asked for.
    pub service_tier: Option<&'a str>,
    pub transport: Transport,
    pub upstream_transport: Transport,
    pub span: &'a Span,
}

/// The usage record of a turn that ended with `outcome` on `account`: billed within the
/// plausibility bounds (docs/DESIGN.md#usage-bounds), an implausible report set aside.
pub fn record_of(
    deps: &SessionDeps,
    principal: &Principal,
    turn: TurnIdentity<'_>,
    outcome: Outcome,
    account: String,
) -> TurnRecord {
    let tier =
        crate::billing::pricing::billed_tier(outcome.service_tier.as_deref(), turn.service_tier);
    let (price, priced) = deps.prices.price_of(turn.model, &tier);
    if !priced {
        warn!(parent: turn.span, service_tier = %tier,
            "a service tier without a price of its own: billed at the model's dearest tier");
    }
    let billed = crate::billing::bounds::settle(
        &price,
        outcome.usage,
        outcome.usage_source,
        &outcome.estimate,
        deps.settings.billing.max_tokens_per_response,
    );
    let set_aside = billed.set_aside.map(|(reported, why)| {
        ::metrics::counter!(metric::USAGE_QUARANTINED, "reason" => why.label()).increment(1);
        warn!(parent: turn.span, reported = ?reported, reason = %why,
            "implausible usage from the upstream: billed from the relay's estimate, the report quarantined");
        crate::record::SetAside {
            reported,
            reason: why.to_string(),
        }
    });
    if let Some(id) = outcome.response_id.as_deref()
        && billed.usage_source != crate::record::UsageSource::None
    {
        let tokens = billed
            .usage
            .input_tokens
            .saturating_add(billed.usage.output_tokens);
        deps.chains.remember(id, principal.key_id, tokens);
    }
    TurnRecord {
        request_id: turn.request_id.clone(),
        response_id: outcome.response_id,
        api_key_id: principal.key_id,
        user_id: principal.user_id,
        session_id: turn.session_id.clone(),
        turn_index: turn.turn_index,
        account,
        model: turn.model.to_string(),
        status: outcome.status,
        usage_source: billed.usage_source,
        warmup: turn.warmup,
        usage: billed.usage,
        cost_nanousd: billed.cost_nanousd,
        timing: outcome.timing,
        error_code: outcome.error_code,
        accepted_at: turn.accepted_at,
        origin: turn.origin,
        transport: turn.transport,
        upstream_transport: turn.upstream_transport,
        service_tier: tier,
        set_aside,
        block: None,
    }
}

/// A turn's record is made: its affinity points at the account that served it (when the
/// upstream served it), the metrics count it, and one line says how it ended. The future
/// resolves once the affinity is written: the client hears the end after it, so its next turn
/// reads where this one went.
pub fn turn_ended(
    deps: &SessionDeps,
    affinity: Option<&Affinity>,
    record: &TurnRecord,
    usage_malformed: bool,
    span: &Span,
) -> impl Future<Output = ()> + 'static {
    let remembered = affinity
        .filter(|_| record.usage_source != crate::record::UsageSource::None)
        .and_then(|a| remember_affinity(deps, record.api_key_id, a, &record.account, span));
    crate::telemetry::turn_ended(record, usage_malformed);
    crate::telemetry::record_turn(span, record);
    info!(parent: span, status = %record.status, usage_source = %record.usage_source,
        response_id = record.response_id.as_deref(), input_tokens = record.usage.input_tokens,
        first_token_ms = ?record.timing.first_token_ms, duration_ms = record.timing.duration_ms, "turn ended");
    async move {
        if let Some(write) = remembered {
            write.await;
        }
    }
}

/// Whether a key's turns reserve (its key has a quota or its user a balance).
fn limited(standing: Option<&(ApiKey, User)>) -> bool {
    standing.is_some_and(|(k, u)| k.quota_nanousd.is_some() || u.balance_nanousd.is_some())
}

/// Ends the draw of `record`'s turn on its reservation block, if it drew from one
/// (docs/DESIGN.md#reservation-blocks): the record then takes the draw off the block's row;
/// returns the cost beyond the draw (the excess), which is not held yet.
pub fn end_draw(deps: &SessionDeps, record: &mut TurnRecord) -> i64 {
    let Some((draw, excess)) = deps.blocks.end(&record.request_id, record.cost_nanousd) else {
        return 0;
    };
    record.block = Some(draw);
    excess
}

/// Hands a record to accounting; resolves to whether it is durable within
/// `accounting.ack_timeout_ms` (at once `true` when `wait` is false: the caller holds nothing
/// back for it). A limited key's turn that cost something holds that cost meanwhile
/// (docs/DESIGN.md#reservations): every relay's admission counts it at once, not at its
/// estimate until the record lands (best effort: the record settles it anyway) — its own
/// row's amount set to the cost, or, for a draw on a block that does not cover the cost, a row
/// of its own for the excess, written before the record is handed over so the record deletes it.
pub fn make_durable(
    deps: &SessionDeps,
    mut record: TurnRecord,
    wait: bool,
    standing: Option<&(ApiKey, User)>,
) -> impl Future<Output = bool> + 'static {
    let accounting = deps.accounting.clone();
    let limit = Duration::from_millis(deps.settings.accounting.ack_timeout_ms);
    let excess = end_draw(deps, &mut record);
    let db = deps.db.clone();
    let (id, key, cost) = (
        record.request_id.to_string(),
        record.api_key_id,
        record.cost_nanousd,
    );
    let settle = (record.block.is_none() && limited(standing) && cost > 0).then(|| {
        let db = db.clone();
        let id = id.clone();
        async move {
            let update = async move { queries::reservations::settle(&db, &id, key, cost).await };
            let _ = crate::db::within(crate::db::READ_DEADLINE, update).await;
        }
    });
    let excess = (excess > 0).then(|| {
        let held = reservation_row(deps, id, key, record.user_id, excess);
        async move {
            let insert = async move { queries::reservations::hold(&db, &held).await };
            let _ = crate::db::within(crate::db::READ_DEADLINE, insert).await;
        }
    });
    async move {
        if let Some(excess) = excess {
            excess.await;
        }
        let settled = async move {
            if let Some(settle) = settle {
                settle.await;
            }
        };
        let acked = accounting.send(RecordTurn(record));
        if !wait {
            // Queued with the actor all the same; it writes the record when it can.
            tokio::spawn(acked);
            settled.await;
            return true;
        }
        let (acked, ()) =
            futures_util::future::join(tokio::time::timeout(limit, acked), settled).await;
        matches!(acked, Ok(Ok(Ok(()))))
    }
}

/// A completed `store:true` response is bound to its account and key (`response_bindings`)
/// before the client hears of it, so its chain continues there from any relay instance. A
/// failure is logged: the chain then goes to any account (the upstream decides).
pub fn bind_stored(
    deps: &SessionDeps,
    record: &TurnRecord,
    store: bool,
    span: Span,
) -> impl Future<Output = ()> + 'static {
    let binding = (store && record.status == crate::record::TurnStatus::Completed)
        .then(|| record.response_id.clone())
        .flatten()
        .map(|id| (id, record.account.clone(), record.api_key_id));
    let db = deps.db.clone();
    let ttl = chrono::Duration::seconds(
        i64::try_from(deps.settings.session.binding_ttl_s).unwrap_or(i64::MAX / 2),
    );
    async move {
        let Some((id, account, key)) = binding else {
            return;
        };
        let expires = crate::db::now() + ttl;
        let response = id.clone();
        let write =
            async move { queries::bindings::bind(&db, &response, &account, key, expires).await };
        if let Err(e) = crate::db::within(crate::db::READ_DEADLINE, write).await {
            warn!(parent: &span, error = %e, response_id = %id, "stored response not bound to its account");
        }
    }
}
