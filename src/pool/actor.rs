//! The pool actor of one upstream account.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::dispatch;
use super::health::Failure;
use super::messages::{
    Acquire, Home, Lease, LeaseError, Parked, PoolSnapshot, PoolStats, Reclaim, Release,
    ShutdownPool,
};
use super::placement::{self, Placement};
use super::policy::{self, IdleConn};
use crate::actors::{ActorStatus, GetStatus, RestartActor};
use crate::config::{AccountSettings, PoolSettings, UpstreamSettings};
use crate::telemetry::metric;
use crate::upstream::UpstreamConn;
use crate::upstream::dial::{DialSpec, identity_of};
use crate::upstream::messages::{CloseConn, ConnStatus, SetLessee, UpstreamEvent};

enum State {
    Dialing,
    Idle {
        since: Instant,
    },
    Leased {
        /// The lease's number (`Lease::id`): messages about an older lease are ignored.
        lease: u64,
        /// Since when the session has held it between turns (`None`: a turn runs on it).
        parked_since: Option<Instant>,
        /// A `Reclaim` is on its way to the lessee.
        reclaiming: bool,
        lessee: Option<Recipient<Reclaim>>,
        /// The session's mailbox: once it is closed, the session is gone and the lease is
        /// taken back (docs/DESIGN.md#leases).
        holder: Recipient<UpstreamEvent>,
    },
}

struct Entry {
    addr: Addr<UpstreamConn>,
    identity: String,
    opened_at: Instant,
    state: State,
    /// The thread its actor runs on.
    thread: std::thread::ThreadId,
    /// Closed when given back (a pool restart retires what was leased at the time); the
    /// lessee sees it through its `Lease`.
    retire: Arc<std::sync::atomic::AtomicBool>,
}

struct Waiter {
    /// Answered `LeaseError::Timeout` if still waiting then.
    deadline: Instant,
    identity: String,
    headers: Vec<(String, String)>,
    preferred: Option<u64>,
    lessee: Recipient<UpstreamEvent>,
    home: Option<Home>,
    reclaim: Option<Recipient<Reclaim>>,
    reply: oneshot::Sender<Result<Lease, LeaseError>>,
    /// Waits when nothing can be had at once (`Acquire::queue`).
    queue: bool,
    /// A dial was started for it: it waits for that, whatever `queue` says.
    dialled: bool,
}

pub struct ContextPool {
    account: Arc<str>,
    url: String,
    /// The account's own handshake headers (organization, project).
    account_headers: Vec<(&'static str, String)>,
    api_key: String,
    max_conns: usize,
    pool: PoolSettings,
    upstream: UpstreamSettings,
    conns: HashMap<u64, Entry>,
    waiters: VecDeque<Waiter>,
    /// The one timer for the waiters' earliest deadline, armed while any waits.
    expiry: Option<SpawnHandle>,
    /// A `Dispatch` is on its way.
    dispatch_due: bool,
    /// Connection numbers (this pool's; lease numbers are `NEXT_LEASE`'s).
    next_conn: u64,
    dialled_total: u64,
    leases_total: u64,
    reclaimed_total: u64,
    recovered_total: u64,
    restarts: u32,
    started_at: chrono::NaiveDateTime,
    shutting_down: bool,
    /// Shared with the sessions, which prefer accounts that are not cooling.
    health: Arc<super::health::Health>,
    /// Where the ingress places new sessions: this pool's idle connections are published there
    /// (docs/DESIGN.md#placement); `published` is what it last said.
    placement: Arc<Placement>,
    published: placement::Idle,
}

impl ContextPool {
    pub fn new(
        account: &AccountSettings,
        api_key: String,
        pool: PoolSettings,
        upstream: UpstreamSettings,
        health: Arc<super::health::Health>,
        placement: Arc<Placement>,
    ) -> Self {
        Self {
            account: Arc::from(account.name.as_str()),
            url: account.ws_url(),
            account_headers: account.handshake_headers(),
            api_key,
            max_conns: account.max_conns,
            pool,
            upstream,
            conns: HashMap::new(),
            waiters: VecDeque::new(),
            expiry: None,
            dispatch_due: false,
            next_conn: 1,
            dialled_total: 0,
            leases_total: 0,
            reclaimed_total: 0,
            recovered_total: 0,
            restarts: 0,
            started_at: crate::db::now(),
            shutting_down: false,
            health,
            placement,
            published: placement::Idle::new(),
        }
    }

    fn max_age(&self) -> Duration {
        Duration::from_secs(self.pool.max_age_s)
    }

    fn idle_view(&self) -> Vec<IdleConn<'_>> {
        self.view()
            .iter()
            .filter_map(dispatch::Conn::idle)
            .collect()
    }

    /// Tells the ingress where this pool's idle connections are, when that changed
    /// (docs/DESIGN.md#placement). Runs after every dispatch: counted over borrowed identities,
    /// copied only when it differs from what was published.
    fn publish_idle(&mut self) {
        let mut idle: HashMap<&str, HashMap<std::thread::ThreadId, usize>> = HashMap::new();
        for e in self.conns.values() {
            if matches!(e.state, State::Idle { .. }) {
                *idle
                    .entry(e.identity.as_str())
                    .or_default()
                    .entry(e.thread)
                    .or_default() += 1;
            }
        }
        let unchanged = idle.len() == self.published.len()
            && idle
                .iter()
                .all(|(id, threads)| self.published.get(*id) == Some(threads));
        if unchanged {
            return;
        }
        let idle: placement::Idle = idle
            .into_iter()
            .map(|(id, threads)| (id.to_string(), threads))
            .collect();
        self.placement.publish(&self.account, idle.clone());
        self.published = idle;
    }

    fn dial(&mut self, k: usize, ctx: &mut Context<Self>) {
        let id = self.next_conn;
        self.next_conn += 1;
        self.dialled_total += 1;
        let w = &self.waiters[k];
        let identity = w.identity.clone();
        let spec = DialSpec {
            url: self.url.clone(),
            api_key: self.api_key.clone(),
            headers: w.headers.clone(),
            account_headers: self.account_headers.clone(),
            frame_max: self.upstream.frame_max_bytes,
            timeout: Duration::from_millis(self.upstream.connect_timeout_ms),
            probe_idle: Duration::from_millis(self.upstream.probe_idle_ms),
            probe_timeout: Duration::from_millis(self.upstream.probe_timeout_ms),
        };
        let pool = ctx.address().recipient();
        ::metrics::counter!(metric::DIALS, "account" => self.account.to_string()).increment(1);
        let (addr, thread) = match &w.home {
            Some(home) => (
                UpstreamConn::start_in_arbiter(&home.arbiter, move |_| {
                    UpstreamConn::new(id, spec, pool)
                }),
                home.thread,
            ),
            None => (
                UpstreamConn::new(id, spec, pool).start(),
                std::thread::current().id(),
            ),
        };
        debug!(account = %self.account, conn = id, "dialling upstream");
        self.conns.insert(
            id,
            Entry {
                addr,
                identity,
                opened_at: Instant::now(),
                state: State::Dialing,
                thread,
                retire: Arc::default(),
            },
        );
    }

    fn close(&mut self, id: u64) {
        if let Some(e) = self.conns.remove(&id) {
            e.addr.do_send(CloseConn);
        }
    }

    /// The pool's connections as `dispatch` sees them.
    fn view(&self) -> Vec<dispatch::Conn<'_>> {
        self.conns
            .iter()
            .map(|(id, e)| dispatch::Conn {
                id: *id,
                identity: &e.identity,
                opened_at: e.opened_at,
                held: match &e.state {
                    State::Dialing => dispatch::Held::Dialing,
                    State::Idle { since } => dispatch::Held::Idle { since: *since },
                    State::Leased {
                        parked_since,
                        reclaiming,
                        lessee,
                        holder,
                        ..
                    } => dispatch::Held::Leased {
                        parked_since: *parked_since,
                        reclaiming: *reclaiming,
                        reclaimable: lessee.is_some(),
                        orphan: !holder.connected(),
                    },
                },
                thread: e.thread,
            })
            .collect()
    }

    /// Asks for a dispatch once the messages waiting in the mailbox now are handled
    /// (docs/DESIGN.md#leases): a burst of a thousand acquires or dials done costs one dispatch,
    /// not one each — a dispatch reads every connection and waiter.
    fn dispatch(&mut self, ctx: &mut Context<Self>) {
        if !self.dispatch_due {
            self.dispatch_due = true;
            ctx.notify(Dispatch);
        }
    }

    /// Serves waiters in order from idle connections, then dials for those left, as
    /// `dispatch::plan` decides (docs/DESIGN.md#leases).
    fn dispatch_now(&mut self, ctx: &mut Context<Self>) {
        // A waiter whose session is gone is served nothing (and dialled for by nobody).
        self.waiters.retain(|w| w.lessee.connected());
        if self.waiters.is_empty() {
            return;
        }
        // Leases of sessions that are gone come back before anyone waits on them.
        self.recover_orphans();
        let limits = dispatch::Limits {
            max_conns: self.max_conns,
            max_age: self.max_age(),
            cooling: self.health.cooling(Instant::now()),
            now: Instant::now(),
        };
        let plan = {
            let waiters: Vec<dispatch::Waiting<'_>> = self
                .waiters
                .iter()
                .map(|w| dispatch::Waiting {
                    identity: &w.identity,
                    preferred: w.preferred,
                    thread: w.home.as_ref().map(|h| h.thread),
                })
                .collect();
            dispatch::plan(&waiters, &self.view(), limits)
        };
        // Dials first: they read their waiter, which stays queued until a connection is ready.
        for conn in &plan.close {
            self.close(*conn);
        }
        for k in plan.dial.iter().chain(&plan.spare) {
            self.dial(*k, ctx);
        }
        for k in &plan.dial {
            self.waiters[*k].dialled = true;
        }
        for conn in &plan.reclaim {
            self.ask_back(*conn, ctx);
        }
        // Then the answered waiters leave the queue, back to front so indices stay valid:
        // those lent a connection, those of a cooling account, and those that would rather not
        // wait for what nothing lends or dials for them now.
        let mut answered: Vec<(usize, Result<u64, LeaseError>)> = plan
            .lend
            .iter()
            .map(|(k, conn)| (*k, Ok(*conn)))
            .chain(plan.cooling.iter().map(|k| (*k, Err(LeaseError::Cooling))))
            .collect();
        let busy: Vec<usize> = (0..self.waiters.len())
            .filter(|k| {
                let w = &self.waiters[*k];
                !w.queue && !w.dialled && !answered.iter().any(|(a, _)| a == k)
            })
            .collect();
        answered.extend(busy.into_iter().map(|k| (k, Err(LeaseError::Busy))));
        answered.sort_unstable_by_key(|(k, _)| std::cmp::Reverse(*k));
        for (k, conn) in answered {
            let Some(w) = self.waiters.remove(k) else {
                continue;
            };
            match conn {
                Ok(conn) => self.grant(conn, w),
                Err(e) => {
                    let _ = w.reply.send(Err(e));
                }
            }
        }
    }

    /// docs/DESIGN.md#leases: one timer for the earliest waiter's deadline, not one per
    /// `Acquire` — actix polls every future an actor has spawned on each of its messages, and a
    /// timer per waiter outlived the waiter for `pool.lease_timeout_ms`, so a pool that had
    /// just lent a thousand connections paid a thousand timer polls per message.
    fn arm_expiry(&mut self, ctx: &mut Context<Self>) {
        if self.expiry.is_some() {
            return;
        }
        let Some(first) = self.waiters.iter().map(|w| w.deadline).min() else {
            return;
        };
        let wait = first.saturating_duration_since(Instant::now());
        self.expiry = Some(ctx.run_later(wait, |act, ctx| {
            act.expiry = None;
            let now = Instant::now();
            let (late, waiting): (VecDeque<Waiter>, VecDeque<Waiter>) =
                std::mem::take(&mut act.waiters)
                    .into_iter()
                    .partition(|w| w.deadline <= now);
            act.waiters = waiting;
            for w in late {
                let _ = w.reply.send(Err(LeaseError::Timeout));
            }
            act.arm_expiry(ctx);
        }));
    }

    /// docs/DESIGN.md#idle-reclaim: asks the session holding `conn` between turns for it back
    /// (`max_conns` bounds concurrent turns, not open sessions).
    fn ask_back(&mut self, conn: u64, ctx: &mut Context<Self>) {
        let Some(Entry {
            state:
                State::Leased {
                    reclaiming,
                    lessee: Some(lessee),
                    ..
                },
            ..
        }) = self.conns.get_mut(&conn)
        else {
            return;
        };
        *reclaiming = true;
        debug!(account = %self.account, conn, "reclaiming a connection held between turns");
        let ask = lessee.send(Reclaim { conn });
        ctx.spawn(ask.into_actor(self).map(move |given, act, ctx| {
            match given {
                Ok(true) => {
                    act.reclaimed_total += 1;
                    // The session's Release follows.
                    return;
                }
                // The session is gone: nobody will give it back.
                Err(_) => {
                    act.recover_orphans();
                    return act.dispatch(ctx);
                }
                Ok(false) => {}
            }
            // In use again (or gone): not a candidate until it parks again.
            if let Some(Entry {
                state:
                    State::Leased {
                        parked_since,
                        reclaiming,
                        ..
                    },
                ..
            }) = act.conns.get_mut(&conn)
            {
                *parked_since = None;
                *reclaiming = false;
            }
            act.dispatch(ctx);
        }));
    }

    fn grant(&mut self, conn: u64, w: Waiter) {
        // Unique in the process, not only in this pool: a session on the connection's thread
        // finds the socket by it (docs/DESIGN.md#direct-reads).
        let lease_id = NEXT_LEASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(entry) = self.conns.get_mut(&conn) else {
            return;
        };
        // The lessee is set before the session learns of the lease, so no frame is lost.
        entry
            .addr
            .do_send(SetLessee(Some((w.lessee.clone(), lease_id))));
        let lease = Lease {
            conn,
            id: lease_id,
            addr: entry.addr.clone(),
            account: self.account.clone(),
            opened_at: entry.opened_at,
            retired: entry.retire.clone(),
        };
        match w.reply.send(Ok(lease)) {
            Ok(()) => {
                entry.state = State::Leased {
                    lease: lease_id,
                    parked_since: None,
                    reclaiming: false,
                    lessee: w.reclaim,
                    holder: w.lessee,
                };
                self.leases_total += 1;
            }
            // The session is gone: the connection stays idle.
            Err(_) => {
                entry.addr.do_send(SetLessee(None));
            }
        }
    }
}

impl ContextPool {
    /// Takes back every lease whose session is gone (its mailbox closed) — whatever path it
    /// left by: a lease granted while it was vanishing, a reclaim it never answered
    /// (docs/DESIGN.md#leases). A connection held between turns is clean and goes idle; one
    /// with a turn on it is in an unknown state and is closed. Returns how many.
    fn recover_orphans(&mut self) -> usize {
        let orphans = dispatch::orphans(&self.view());
        for &(id, clean) in &orphans {
            self.give_back(id, clean);
        }
        if !orphans.is_empty() {
            self.recovered_total += crate::num::count(orphans.len());
            ::metrics::counter!(metric::LEASES_RECOVERED, "account" => self.account.to_string())
                .increment(crate::num::count(orphans.len()));
            warn!(account = %self.account, leases = orphans.len(), recovered_total = self.recovered_total,
                "took back upstream connections whose session is gone");
        }
        orphans.len()
    }

    /// A leased connection comes back: idle when `reusable` and still fit, else closed.
    fn give_back(&mut self, conn: u64, reusable: bool) {
        let max_age = self.max_age();
        let shutting_down = self.shutting_down;
        let Some(entry) = self.conns.get_mut(&conn) else {
            return;
        };
        entry.addr.do_send(SetLessee(None));
        if reusable
            && !entry.retire.load(std::sync::atomic::Ordering::Relaxed)
            && !shutting_down
            && entry.opened_at.elapsed() < max_age
        {
            entry.state = State::Idle {
                since: Instant::now(),
            };
        } else {
            self.close(conn);
        }
    }

    /// Whether `conn` is leased under the lease number `lease`.
    fn is_lease(&self, conn: u64, lease: u64) -> bool {
        matches!(
            self.conns.get(&conn),
            Some(Entry { state: State::Leased { lease: l, .. }, .. }) if *l == lease
        )
    }
}

impl Actor for ContextPool {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            if act.recover_orphans() > 0 {
                act.dispatch(ctx);
            }
            let cooling = act.health.cooling(Instant::now());
            ::metrics::gauge!(metric::ACCOUNT_COOLING, "account" => act.account.to_string())
                .set(if cooling { 1.0 } else { 0.0 });
            let wanted: std::collections::HashSet<&str> =
                act.waiters.iter().map(|w| w.identity.as_str()).collect();
            let retire = policy::retire(
                &act.idle_view(),
                &wanted,
                act.max_age(),
                Duration::from_secs(act.pool.idle_timeout_s),
                act.pool.max_idle,
                Instant::now(),
            );
            for id in retire {
                debug!(account = %act.account, conn = id, "retiring idle upstream connection");
                act.close(id);
            }
            act.publish_idle();
        });
    }
}

/// Lease numbers, one sequence for every pool.
static NEXT_LEASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// `timeout` from `now`; a timeout beyond what the clock can hold (an unbounded
/// `pool.lease_timeout_ms`) waits for decades instead of overflowing.
fn deadline_after(now: Instant, timeout: Duration) -> Instant {
    const DECADES: Duration = Duration::from_secs(30 * 365 * 86_400);
    now.checked_add(timeout.min(DECADES)).unwrap_or(now)
}

/// Runs the dispatch asked for while handling earlier messages.
#[derive(Message)]
#[rtype(result = "()")]
struct Dispatch;

impl Handler<Dispatch> for ContextPool {
    type Result = ();

    fn handle(&mut self, _: Dispatch, ctx: &mut Context<Self>) {
        self.dispatch_due = false;
        self.dispatch_now(ctx);
        self.publish_idle();
    }
}

impl Handler<Acquire> for ContextPool {
    type Result = ResponseFuture<Result<Lease, LeaseError>>;

    fn handle(&mut self, msg: Acquire, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.shutting_down {
            return Box::pin(async { Err(LeaseError::ShuttingDown) });
        }
        if self.health.http_only() {
            return Box::pin(async { Err(LeaseError::WebSocketRefused) });
        }
        self.waiters.push_back(Waiter {
            deadline: deadline_after(
                Instant::now(),
                Duration::from_millis(self.pool.lease_timeout_ms),
            ),
            identity: identity_of(&msg.headers),
            headers: msg.headers,
            preferred: msg.preferred,
            lessee: msg.lessee,
            home: msg.home,
            reclaim: msg.reclaim,
            reply: tx,
            queue: msg.queue,
            dialled: false,
        });
        self.arm_expiry(ctx);
        self.dispatch(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(LeaseError::ShuttingDown)) })
    }
}

impl Handler<Release> for ContextPool {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        // A release of a lease already taken back (the connection may serve another now).
        if !self.is_lease(msg.conn, msg.lease) {
            return;
        }
        self.give_back(msg.conn, msg.reusable);
        self.dispatch(ctx);
    }
}

impl Handler<ConnStatus> for ContextPool {
    type Result = ();

    fn handle(&mut self, msg: ConnStatus, ctx: &mut Context<Self>) {
        match msg {
            ConnStatus::Ready { conn } => {
                if self.health.recovered() {
                    info!(account = %self.account, "upstream account reachable again");
                }
                if let Some(e) = self.conns.get_mut(&conn) {
                    e.state = State::Idle {
                        since: Instant::now(),
                    };
                }
            }
            ConnStatus::DialFailed {
                conn,
                error,
                status: Some(426),
                ..
            } => {
                // Not a failure of the account: it speaks HTTP only. Every waiter goes there.
                if self.health.refuse_websocket() {
                    warn!(account = %self.account, error = %error,
                        "upstream refuses the WebSocket mode (426): this account's turns go over HTTP");
                }
                self.conns.remove(&conn);
                for w in self.waiters.drain(..) {
                    let _ = w.reply.send(Err(LeaseError::WebSocketRefused));
                }
            }
            ConnStatus::DialFailed {
                conn,
                error,
                status,
                retry_after,
            } => {
                crate::telemetry::dial_failed(&self.account);
                let failure = Failure {
                    error: &error,
                    retry_after: retry_after.as_deref().and_then(super::health::retry_after),
                    credential_refused: matches!(status, Some(401 | 403)),
                };
                let (wait, first) = self.health.failed(&failure, Instant::now());
                if first {
                    warn!(account = %self.account, error = %error, cooling_ms = crate::num::millis(wait),
                        "upstream account failing; turns go to other accounts while it cools down");
                }
                let identity = self.conns.remove(&conn).map(|e| e.identity);
                // Fail a waiter of its identity now rather than let it time out, unless another
                // dial of that identity covers it.
                let covering = identity
                    .as_deref()
                    .and_then(|i| dispatch::dialing_by_identity(&self.view()).get(i).copied())
                    .unwrap_or(0);
                let same = |w: &&Waiter| Some(&w.identity) == identity.as_ref();
                let waiting = self.waiters.iter().filter(same).count();
                let first = self.waiters.iter().position(|w| same(&w));
                if waiting > covering
                    && let Some(w) = first.and_then(|pos| self.waiters.remove(pos))
                {
                    let _ = w.reply.send(Err(LeaseError::DialFailed(error)));
                }
                // The account cools now: its other waiters are answered at once (failover).
            }
            ConnStatus::Broken { conn, reason } => {
                debug!(account = %self.account, conn, ?reason, "upstream connection evicted");
                self.conns.remove(&conn);
            }
        }
        self.dispatch(ctx);
    }
}

impl Handler<Parked> for ContextPool {
    type Result = ();

    fn handle(&mut self, msg: Parked, ctx: &mut Context<Self>) {
        if let Some(Entry {
            state:
                State::Leased {
                    parked_since,
                    lease,
                    ..
                },
            ..
        }) = self.conns.get_mut(&msg.conn)
            && *lease == msg.lease
        {
            *parked_since = msg.parked.then(Instant::now);
            if msg.parked && !self.waiters.is_empty() {
                self.dispatch(ctx);
            }
        }
    }
}

impl Handler<PoolStats> for ContextPool {
    type Result = MessageResult<PoolStats>;

    fn handle(&mut self, _: PoolStats, _: &mut Context<Self>) -> Self::Result {
        let view = self.health.view(Instant::now());
        let mut s = PoolSnapshot {
            account: self.account.to_string(),
            waiters: self.waiters.len(),
            dialled_total: self.dialled_total,
            leases_total: self.leases_total,
            reclaimed_total: self.reclaimed_total,
            recovered_total: self.recovered_total,
            health: view.state.to_string(),
            reason: view.reason.map(str::to_string),
            failures: view.failures,
            failures_total: view.failures_total,
            since: view.since,
            next_probe_ms: view.next_probe_ms,
            last_error: self.health.last_error(),
            http_only: view.http_only,
            lanes_refused: view.lanes_refused,
            ..PoolSnapshot::default()
        };
        for e in self.conns.values() {
            match e.state {
                State::Dialing => s.dialing += 1,
                State::Idle { .. } => s.idle += 1,
                State::Leased { parked_since, .. } => {
                    s.leased += 1;
                    s.parked += usize::from(parked_since.is_some());
                }
            }
        }
        MessageResult(s)
    }
}

impl Handler<ShutdownPool> for ContextPool {
    type Result = MessageResult<ShutdownPool>;

    fn handle(&mut self, _: ShutdownPool, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(Err(LeaseError::ShuttingDown));
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        info!(account = %self.account, connections = ids.len(), "closing upstream connections");
        let addrs = self.conns.values().map(|e| e.addr.clone()).collect();
        for id in ids {
            self.close(id);
        }
        self.publish_idle();
        MessageResult(addrs)
    }
}

impl ContextPool {
    fn status(&self) -> ActorStatus {
        ActorStatus {
            name: format!("pool:{}", self.account),
            kind: "pool",
            state: if self.shutting_down {
                "stopping".into()
            } else {
                "running".into()
            },
            started_at: self.started_at,
            restarts: self.restarts,
            last_error: self.health.last_error(),
        }
    }
}

impl Handler<GetStatus> for ContextPool {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}

impl Handler<RestartActor> for ContextPool {
    type Result = MessageResult<RestartActor>;

    /// Rebuilds the account's pool: idle connections are closed now; leased ones finish their
    /// turn and are retired when given back; sessions holding one between turns are asked for
    /// it back (they continue on new connections, their chains through continuation).
    fn handle(&mut self, _: RestartActor, ctx: &mut Context<Self>) -> Self::Result {
        self.restarts += 1;
        self.started_at = crate::db::now();
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Idle { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            self.close(*id);
        }
        let mut parked = 0;
        for (id, e) in self.conns.iter_mut() {
            e.retire.store(true, std::sync::atomic::Ordering::Relaxed);
            if let State::Leased {
                parked_since: Some(_),
                lessee: Some(lessee),
                ..
            } = &e.state
            {
                parked += 1;
                lessee.do_send(Reclaim { conn: *id });
            }
        }
        info!(account = %self.account, closed = idle.len(), parked, retiring = self.conns.len(), "pool restarted");
        self.dispatch(ctx);
        MessageResult(self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_timeout_too_large_for_the_clock_waits_for_decades() {
        let now = Instant::now();
        assert_eq!(
            deadline_after(now, Duration::from_millis(5_000)),
            now + Duration::from_secs(5)
        );
        let far = deadline_after(now, Duration::from_millis(u64::MAX));
        assert!(far > now + Duration::from_secs(20 * 365 * 86_400));
    }
}
