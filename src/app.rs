//! Wiring and order: database → (actors, later) → listeners; shutdown in reverse.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_http::HttpService;
use actix_service::map_config;
use actix_web::dev::AppConfig;
use actix_web::rt::net::TcpStream;
use actix_web::{App, web};
use tracing::{info, warn};

use actix::Actor;

use crate::accounting::Accounting;
use crate::accounting::actor::AccountingConfig;
use crate::accounting::health::AccountingHealth;
use crate::accounting::messages::Flush;
use crate::accounting::pending::PendingSpend;
use crate::accounting::spool::{DirFs, SpoolFs};
use crate::billing::compensator::{Compensator, CompensatorConfig};
use crate::billing::pricing::PriceTable;

/// Responses whose billed tokens the relay remembers for their continuations' reservations
/// (about 100 bytes each).
const CHAINS_REMEMBERED: usize = 65_536;
use crate::config::{ConfigError, Settings};
use crate::db::{DbError, DbPool, migrate};
use crate::http::health::{self, Readiness};
use crate::http::ingress;
use crate::pool::ContextPool;
use crate::pool::messages::ShutdownPool;
use crate::protocol::errors::ErrorCode;
use crate::session::admission::Slots;
use crate::session::registry::{Count, EndAll, EndAllWhenIdle, Registry};
use crate::session::{AccountHandle, SessionDeps};
use actix::Addr;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{key} {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(#[from] std::io::Error),
    #[error("accounting.spool_dir {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
}

/// Opens the pool and applies pending migrations when configured to.
pub async fn open_database(settings: &Settings, migrate_now: bool) -> Result<DbPool, AppError> {
    let db = DbPool::connect(&settings.database)?;
    if migrate_now {
        let applied = migrate::run_pending(&db).await?;
        log_migrations(&db, &applied);
    }
    Ok(db)
}

/// `serve`'s database (docs/DESIGN.md#database-at-start): migrated now when it answers; a
/// PostgreSQL server that does not answer yet is waited for in the background — the relay
/// starts, `/readyz` says 503 naming the database (its handshakes cannot authenticate), and the
/// migrations run once it answers. A SQLite file that cannot be opened stops `serve`.
async fn open_at_start(settings: &Settings) -> Result<DbPool, AppError> {
    let db = DbPool::connect(&settings.database)?;
    if !settings.database.migrate_on_start {
        return Ok(db);
    }
    let first = migrate::run_pending(&db).await;
    match first {
        Ok(applied) => {
            log_migrations(&db, &applied);
            Ok(db)
        }
        Err(e) if e.is_outage() && matches!(db, DbPool::Postgres(_)) => {
            let label = settings.database.label();
            let cause = settings
                .database
                .tcp_endpoint()
                .map(|endpoint| crate::db::tcp_probe(&endpoint))
                .unwrap_or_default();
            warn!(database = %label, error = %e, cause,
                "database unreachable at start; serving /healthz, not ready, retrying");
            let cap = Duration::from_millis(settings.database.start_retry_max_ms.max(1_000));
            actix::spawn(migrate_when_reachable(db.clone(), label, cap));
            Ok(db)
        }
        Err(e) => Err(e.into()),
    }
}

fn log_migrations(db: &DbPool, applied: &[String]) {
    if applied.is_empty() {
        info!(backend = db.backend(), "migrations up to date");
    } else {
        info!(backend = db.backend(), applied = ?applied, "migrations applied");
    }
}

/// Retries the start-up migrations (1 s, doubling up to `cap`) until they run: one line when
/// it works, none per attempt (the first failure was logged).
async fn migrate_when_reachable(db: DbPool, label: String, cap: Duration) {
    let mut wait = Duration::from_secs(1);
    loop {
        tokio::time::sleep(wait).await;
        match migrate::run_pending(&db).await {
            Ok(applied) => {
                info!(database = %label, "database reachable");
                return log_migrations(&db, &applied);
            }
            Err(e) if e.is_outage() => wait = (wait * 2).min(cap),
            Err(e) => {
                // Reachable but the migrations fail: nothing a retry fixes; /readyz says it.
                return tracing::error!(database = %label, error = %e,
                    "migrations failed; the relay stays not ready (run `turnpike migrate`)");
            }
        }
    }
}

/// Opens (and locks) the configured spool directory.
pub fn open_spool_dir(settings: &Settings) -> Result<Box<dyn SpoolFs>, AppError> {
    let dir = settings.spool_dir();
    DirFs::new(&dir)
        .map(|fs| -> Box<dyn SpoolFs> { Box::new(fs) })
        .map_err(|source| AppError::Spool {
            dir: dir.display().to_string(),
            source,
        })
}

/// Starts the actors every session shares: accounting, the session registry, one pool per
/// upstream account.
pub fn start_relay(settings: Settings, db: DbPool) -> Result<Arc<SessionDeps>, AppError> {
    let fs = open_spool_dir(&settings)?;
    start_relay_with(settings, db, fs)
}

/// `start_relay` over a given spool filesystem (fault tests hand in one that fails on demand).
pub fn start_relay_with(
    settings: Settings,
    db: DbPool,
    spool_fs: Box<dyn SpoolFs>,
) -> Result<Arc<SessionDeps>, AppError> {
    let mut accounts = Vec::new();
    let placement = Arc::new(crate::pool::placement::Placement::default());
    for a in &settings.accounts {
        let key = a.resolve_key()?;
        let health = Arc::new(crate::pool::health::Health::new(
            settings.pool.refused_credential,
        ));
        if a.transport == crate::config::AccountTransport::Http {
            // Declared: as if its upstream had answered a handshake 426 (never dialled).
            health.refuse_websocket();
        }
        let http = Arc::new(crate::upstream::http::Endpoint {
            account: a.name.clone(),
            base_url: a.base_url.trim_end_matches('/').to_string(),
            api_key: key.clone(),
            account_headers: a.handshake_headers(),
            // One request per HTTP connection: the sockets' bound is the account's, as before
            // lanes multiplied what one WebSocket carries.
            max_conns: a.max_concurrent_turns.unwrap_or(a.max_conns),
        });
        let pool = ContextPool::new(
            a,
            key,
            settings.pool.clone(),
            settings.upstream.clone(),
            health.clone(),
            placement.clone(),
        )
        .start();
        accounts.push(AccountHandle {
            name: a.name.clone(),
            turn_limit: a.turn_limit(),
            priority: a.priority,
            weight: a.weight,
            pool,
            health,
            http,
            frame_max: a.frame_max_bytes,
            lanes: a.lanes,
        });
    }
    if accounts.is_empty() {
        warn!("no [[accounts]] configured: every turn will be refused (account_busy)");
    }
    share_learnt_facts(&settings, &accounts, &db);
    let prices = PriceTable::from_settings(&settings.pricing)
        .map_err(|(key, e)| ConfigError::new(key, e.to_string()))?;
    purge_expired(db.clone());
    let blocks = give_back_blocks(&settings, &db);
    let pending_spend = Arc::new(PendingSpend::default());
    let health = Arc::new(AccountingHealth::default());
    Ok(Arc::new(SessionDeps {
        prices,
        chains: crate::billing::reservation::Chains::new(CHAINS_REMEMBERED),
        blocks,
        accounting: start_accounting(
            &settings,
            db.clone(),
            pending_spend.clone(),
            health.clone(),
            spool_fs,
        ),
        accounting_health: health,
        pending_spend,
        auth_cache: crate::auth::AuthCache::new(Duration::from_secs(600)),
        registry: Registry::default().start(),
        requests: Arc::default(),
        slots: Arc::new(Slots::default()),
        standings: Arc::new(crate::session::admission::Standings::new(
            Duration::from_millis(settings.limits.standing_cache_ms),
        )),
        affinities: Arc::new(crate::session::admission::Affinities::new(
            Duration::from_millis(settings.limits.standing_cache_ms),
        )),
        bodies: Arc::new(crate::session::admission::BodyBytes::new(
            settings.limits.http_body_bytes_per_key,
        )),
        fleet: fleet_of(&settings, &db),
        draining: Arc::new(AtomicBool::new(false)),
        accounts,
        placement,
        db,
        settings,
    }))
}

/// The fleet of relays sharing a PostgreSQL database (docs/DESIGN.md#fleet-slots), with its
/// heartbeat running; none on SQLite or with `limits.fleet_slot_ttl_ms = 0`.
fn fleet_of(settings: &Settings, db: &DbPool) -> Option<Arc<crate::session::fleet::Fleet>> {
    let ttl = settings.limits.fleet_slot_ttl_ms;
    if ttl == 0 || !matches!(db, DbPool::Postgres(_)) {
        return None;
    }
    let fleet = crate::session::fleet::Fleet::new(db.clone(), Duration::from_millis(ttl));
    fleet.start_heartbeat();
    Some(fleet)
}

/// What relays learn of accounts' transports, shared through the database
/// (docs/DESIGN.md#learnt-facts); an account declared HTTP-only has nothing to learn.
fn share_learnt_facts(settings: &Settings, accounts: &[AccountHandle], db: &DbPool) {
    let every = settings.upstream.learnt_refresh_ms;
    let learning: Vec<_> = accounts
        .iter()
        .zip(&settings.accounts)
        .filter(|(_, a)| a.transport != crate::config::AccountTransport::Http)
        .map(|(h, _)| (h.name.clone(), h.health.clone()))
        .collect();
    if every == 0 || learning.is_empty() {
        return;
    }
    actix::spawn(crate::pool::facts::share(
        db.clone(),
        learning,
        Duration::from_millis(every),
        Duration::from_secs(settings.upstream.learnt_ttl_s),
    ));
}

/// This relay's reservation blocks (docs/DESIGN.md#reservation-blocks), with the task that
/// closes each when its time is up and gives its unused part back — one log line when giving
/// back starts failing and one when it works again; what failed is tried again.
fn give_back_blocks(settings: &Settings, db: &DbPool) -> Arc<crate::billing::blocks::Blocks> {
    let b = &settings.billing;
    let every = Duration::from_millis(b.reservation_block_ms.max(1));
    let blocks = Arc::new(crate::billing::blocks::Blocks::new(
        b.reservation_block_turns,
        b.reservation_block_max_turns,
        every,
        Duration::from_secs(b.reservation_ttl_s),
    ));
    if b.reservation_block_turns <= 1 {
        return blocks;
    }
    let (db, shared) = (db.clone(), blocks.clone());
    actix::spawn(async move {
        let mut failing = false;
        loop {
            tokio::time::sleep(every / 4).await;
            let mut failed = None;
            let now = std::time::Instant::now();
            for back in shared.close_due(now) {
                let row = crate::db::queries::reservations::NewReservation::given_back(&back);
                if let Err(e) = crate::db::queries::reservations::hold(&db, &row).await {
                    failed.get_or_insert(e);
                    shared.retry(back);
                }
            }
            for id in shared.unclear_due(now) {
                if let Err(e) = crate::db::queries::reservations::release(&db, id.as_str()).await {
                    failed.get_or_insert(e);
                    shared.unclear(id, now.checked_sub(every).unwrap_or(now));
                }
            }
            match (failed, failing) {
                (Some(e), false) => {
                    warn!(error = %e, "reservation blocks' unused parts not given back, or unclear blocks not deleted (held until done or expired); retrying");
                    failing = true;
                }
                (None, true) => {
                    info!("reservation blocks given back again");
                    failing = false;
                }
                _ => {}
            }
        }
    });
    blocks
}

/// Deletes expired `response_bindings` and `turn_reservations` every ten minutes (any
/// instance may; it is idempotent; an expired reservation already counts for nothing).
fn purge_expired(db: DbPool) {
    actix::spawn(async move {
        loop {
            match crate::db::queries::bindings::purge_expired(&db).await {
                Ok(0) => {}
                Ok(n) => info!(bindings = n, "expired response bindings deleted"),
                Err(e) => tracing::debug!(error = %e, "expired response bindings not deleted now"),
            }
            let now = crate::db::now();
            match crate::db::queries::reservations::purge_expired(&db, now).await {
                Ok(0) => {}
                Ok(n) => info!(
                    reservations = n,
                    "expired turn reservations deleted (turns of a relay that stopped)"
                ),
                Err(e) => tracing::debug!(error = %e, "expired reservations not deleted now"),
            }
            match crate::db::queries::affinity::purge_expired(&db).await {
                Ok(0) => {}
                Ok(n) => info!(affinities = n, "expired account affinities deleted"),
                Err(e) => tracing::debug!(error = %e, "expired affinities not deleted now"),
            }
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
    });
}

/// The accounting actor, supervised, on a thread of its own (it blocks on fsync).
pub fn start_accounting(
    settings: &Settings,
    db: DbPool,
    spend: Arc<PendingSpend>,
    health: Arc<AccountingHealth>,
    fs: Box<dyn SpoolFs>,
) -> Addr<Accounting> {
    let cfg = AccountingConfig {
        batch_max_rows: settings.accounting.batch_max_rows,
        flush_interval: Duration::from_millis(settings.accounting.flush_interval_ms.max(1)),
        max_in_memory: settings.accounting.max_in_memory.max(1),
        db_timeout: Duration::from_millis(settings.database.statement_timeout_ms.max(1)),
    };
    let arbiter = actix::Arbiter::new();
    actix::Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
        Accounting::new(db, cfg, spend, health, fs)
    })
}

/// The Compensator, supervised.
pub fn start_compensator(settings: &Settings, db: DbPool) -> Addr<Compensator> {
    let c = &settings.compensation;
    let cfg = CompensatorConfig {
        poll_interval: Duration::from_millis(c.poll_interval_ms.max(1)),
        base_backoff: Duration::from_millis(c.base_backoff_ms),
        max_backoff: Duration::from_millis(c.max_backoff_ms),
        max_attempts: c.max_attempts.max(1),
    };
    actix::Supervisor::start(move |_| Compensator::new(db, cfg))
}

/// `turnpike serve`: runs until SIGTERM/SIGINT, then drains (see `shutdown`).
pub async fn serve(settings: Settings) -> Result<(), AppError> {
    // The port first: a port in use is one clear error before anything else starts.
    let listener = bind_listener("server.bind", settings.server.bind)?;
    let admin_listener = if settings.admin.token.is_empty() {
        info!("admin API off (set admin.token to turn it on)");
        None
    } else {
        Some(bind_listener("admin.bind", settings.admin.bind)?)
    };
    raise_fd_limit();
    let db = open_at_start(&settings).await?;
    let deps = start_relay(settings, db)?;
    let compensator = start_compensator(&deps.settings, deps.db.clone());
    if let Some(l) = admin_listener {
        let metrics = crate::telemetry::install_metrics();
        let accounts: Vec<String> = deps.accounts.iter().map(|a| a.name.clone()).collect();
        crate::telemetry::register_metrics(&accounts);
        let state = crate::admin::AdminState {
            token: deps.settings.admin.token.clone(),
            metrics_require_token: deps.settings.admin.metrics_require_token,
            metrics,
            deps: deps.clone(),
            compensator,
            readiness: crate::http::health::Readiness::of(&deps),
        };
        crate::admin::start(l, state)?;
    }
    run_server(deps, listener).await
}

/// Binds a listener, or the one-line error naming the setting and the address.
pub fn bind_listener(key: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).map_err(|source| AppError::Bind { key, addr, source })
}

/// Raises the soft limit of open files to the hard limit: every client session and every
/// upstream connection is a file descriptor (10,000 sessions need more than the usual 1,024).
/// Logged, never fatal; the README's production guide says how to raise the hard limit.
pub fn raise_fd_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let wanted = Rlimit {
        current: lim.maximum,
        maximum: lim.maximum,
    };
    match setrlimit(Resource::Nofile, wanted) {
        Ok(()) => info!(
            open_files = ?lim.maximum,
            "open-file limit raised to the hard limit"
        ),
        Err(e) => warn!(error = %e, current = ?lim.current, "cannot raise the open-file limit"),
    }
}

/// Serves the ingress and probes for `deps` on `listener` until a signal, then shuts down in
/// order.
pub async fn run_server(deps: Arc<SessionDeps>, listener: TcpListener) -> Result<(), AppError> {
    let settings = &deps.settings;
    let readiness = Readiness::of(&deps);
    let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
    crate::http::refusals::start_summaries(Duration::from_secs(settings.log.refusal_summary_s));
    let data = web::Data::from(deps.clone());
    let stall_ms = u32::try_from(settings.limits.client_stall_timeout_ms).unwrap_or(u32::MAX);
    let addr = listener.local_addr()?;
    let mut builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(grace.as_secs().max(1));
    if settings.server.workers > 0 {
        builder = builder.workers(settings.server.workers);
    }
    let stopping = builder.graceful_shutdown_signal();
    let ingress_deps = deps.clone();
    // What actix-web's `HttpServer` builds, plus the upgrade service: WebSocket handshakes get
    // their socket (docs/DESIGN.md#client-socket); every other request goes to the app.
    let server = builder
        .listen("turnpike", listener, move || {
            let app = App::new()
                .wrap(crate::http::request_log::RequestLog)
                .app_data(web::Data::new(readiness.clone()))
                .app_data(data.clone())
                .configure(health::routes)
                .configure(ingress::routes)
                .configure(crate::http::responses::routes)
                .configure(crate::http::codex_usage::routes)
                .default_service(web::to(crate::http::responses::not_found));
            let stopping = stopping.clone();
            HttpService::build()
                // Idle keep-alive connections close as soon as the server stops (the setter
                // is public but hidden; actix-web's `HttpServer` sets it the same way).
                .graceful_shutdown_signal(move || {
                    let stopping = stopping.clone();
                    async move { stopping.notified().await }
                })
                // No linger after a response whose request body is unread
                // (docs/DESIGN.md#close-handshake).
                .client_disconnect_timeout(Duration::ZERO)
                // Without it Nagle and delayed ACKs add tens of ms per event burst.
                .tcp_nodelay(true)
                .local_addr(addr)
                .on_connect_ext(move |io: &TcpStream, _: &mut _| bound_stalled_socket(io, stall_ms))
                .upgrade(ingress::upgrade_service(ingress_deps.clone()))
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })
        .map_err(|source| AppError::Bind {
            key: "server.bind",
            addr,
            source,
        })?;
    info!(addr = %addr, backend = deps.db.backend(), accounts = deps.accounts.len(), "turnpike listening on http://{addr}");
    let server = server.run();
    let handle = server.handle();
    let on_signal = deps.clone();
    actix_web::rt::spawn(async move {
        let signal = wait_for_signal().await;
        info!(signal, "shutting down");
        shutdown(&on_signal, grace).await;
        // Upstream connections live on the workers' threads: closed before the workers stop.
        close_upstreams(&on_signal).await;
        handle.stop(true).await;
    });
    server.await?;
    crate::http::refusals::log_summary();
    let left = flush_accounting(&deps, grace).await;
    info!(unwritten_records = left, "stopped");
    Ok(())
}

/// A client that stops reading leaves its socket's send queue full and the peer's window at
/// zero; the kernel then aborts the connection after `limits.client_stall_timeout_ms`
/// (`TCP_USER_TIMEOUT` also bounds zero-window probing), freeing whatever the relay still had
/// queued for it. Without it a cut-off client's queue would live until TCP keepalive noticed.
fn bound_stalled_socket(sock: &TcpStream, stall_ms: u32) {
    if stall_ms == 0 {
        return;
    }
    if let Err(e) = rustix::net::sockopt::set_tcp_user_timeout(sock, stall_ms) {
        warn!(error = %e, "cannot set TCP_USER_TIMEOUT on a client socket");
    }
}

/// Every upstream socket gets a close frame; waits (at most a second) until they are out.
async fn close_upstreams(deps: &SessionDeps) {
    let mut conns = Vec::new();
    for a in &deps.accounts {
        conns.extend(a.pool.send(ShutdownPool).await.unwrap_or_default());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while conns.iter().any(|c| c.connected()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Accounting's last flush, awaited: returns the records still not in the database after at
/// most `limit` (they stay in the spool for the next start).
async fn flush_accounting(deps: &SessionDeps, limit: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deps.accounting.send(Flush).await.unwrap_or(0);
        if left == 0 || tokio::time::Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stop accepting (readiness 503, ingress refuses); sessions between turns close with 1001 at
/// once, turns in flight get up to `grace` to finish normally (terminal delivered and billed),
/// then close; turns still running after `grace` end with `shutting_down` and close 1001.
pub async fn shutdown(deps: &SessionDeps, grace: Duration) {
    deps.draining.store(true, Ordering::Relaxed);
    let asked = deps.registry.send(EndAllWhenIdle).await.unwrap_or(0);
    info!(
        sessions = asked,
        grace_ms = crate::num::millis(grace),
        "ending sessions after their turns"
    );
    if !wait_for_sessions(deps, grace).await {
        let left = deps
            .registry
            .send(EndAll(ErrorCode::ShuttingDown))
            .await
            .unwrap_or(0);
        deps.requests.abort_all();
        info!(
            sessions = left,
            requests = deps.requests.count(),
            "grace over: ending the turns still in flight"
        );
        // Their records are handed to accounting before they close.
        wait_for_sessions(deps, Duration::from_secs(2)).await;
    }
    if let Some(fleet) = &deps.fleet {
        fleet.release_all().await;
    }
}

/// Waits until no session and no HTTP request is left, at most `limit`; returns whether none is.
async fn wait_for_sessions(deps: &SessionDeps, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if deps.registry.send(Count).await.unwrap_or(0) == 0 && deps.requests.count() == 0 {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
