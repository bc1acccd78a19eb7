//! The client session: one actor per client WebSocket, owning the turn state machine.
//!
//! - `actor`: `SessionActor` — frames in, turn phases, upstream events, faults, shutdown.
//! - `turn`: timing, usage merge and the outcome of one turn (pure).
//! - `admission`: slots per key and per account, released by guards.
//! - `fleet`: per-key slots counted across relays sharing PostgreSQL.
//! - `lanes`: which create starts, waits or is refused, per lane (pure).
//! - `lifecycle`: a turn's decisions on the shared connection: retry, stall, fit (pure).
//! - `machine`: one turn's life — phase, tracker, deadlines — as `step(input) -> effects`
//!   (pure); the session actor and the HTTP exchange carry the effects out.
//! - `gate`: what every turn passes, WebSocket or HTTP: standing, reservation, accounts, record.
//! - `registry`: every live session (shutdown, admin).
//! - `requests`: HTTP requests in flight (admin).
//! - `messages`: `EndSession`.

pub mod actor;
pub mod admission;
pub mod fleet;
pub mod gate;
pub mod lanes;
pub mod lifecycle;
pub mod machine;
pub mod messages;
pub mod registry;
pub mod requests;
pub mod socket;
pub mod turn;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use actix::Addr;

use crate::accounting::Accounting;
use crate::config::Settings;
use crate::db::DbPool;
use crate::pool::ContextPool;

/// One upstream account as sessions see it.
#[derive(Clone)]
pub struct AccountHandle {
    pub name: String,
    pub turn_limit: usize,
    /// Lower first (docs/DESIGN.md#routing).
    pub priority: i32,
    /// Share of turns among accounts of one priority.
    pub weight: u32,
    pub pool: Addr<ContextPool>,
    /// Whether it is cooling down after failed dials (docs/DESIGN.md#accounts).
    pub health: Arc<crate::pool::health::Health>,
    /// How the HTTP surface reaches it (docs/DESIGN.md#http-surface).
    pub http: Arc<crate::upstream::http::Endpoint>,
    /// Largest request frame its WebSocket takes (docs/DESIGN.md#upstream-transports).
    pub frame_max: usize,
    /// Whether its WebSocket carries named lanes (`[[accounts]] lanes`).
    pub lanes: crate::config::LanesMode,
}

impl AccountHandle {
    /// The largest request frame its WebSocket takes: its `frame_max_bytes`, lowered by what the
    /// upstream closed with 1009, 0 when it answered a handshake 426
    /// (docs/DESIGN.md#upstream-transports).
    pub fn ws_frame_max(&self) -> usize {
        self.health.ws_frame_max(self.frame_max)
    }

    /// Whether named lanes' turns go over HTTP: configured so, or learnt (`lanes = "auto"`).
    pub fn lanes_over_http(&self) -> bool {
        use crate::config::LanesMode;
        match self.lanes {
            LanesMode::Http => true,
            LanesMode::Auto => self.health.lanes_refused(),
            LanesMode::Native => false,
        }
    }
}

/// What every session shares.
pub struct SessionDeps {
    pub settings: Settings,
    pub prices: crate::billing::pricing::PriceTable,
    /// What recent responses were billed for, to reserve their continuations' context.
    pub chains: crate::billing::reservation::Chains,
    /// This relay's reservation blocks and the draws on them (docs/DESIGN.md#reservation-blocks).
    pub blocks: Arc<crate::billing::blocks::Blocks>,
    pub db: DbPool,
    pub accounting: Addr<Accounting>,
    /// Whether a finished turn can be made durable now (admission refuses turns when not).
    pub accounting_health: Arc<crate::accounting::health::AccountingHealth>,
    /// Spend durable in the spool but not yet in the database (counted by admission).
    pub pending_spend: Arc<crate::accounting::pending::PendingSpend>,
    /// Recently authenticated keys, used at connect while the database is unreachable.
    pub auth_cache: crate::auth::AuthCache,
    pub accounts: Vec<AccountHandle>,
    pub slots: Arc<admission::Slots>,
    /// Standings read recently, by key (docs/DESIGN.md#admission-cache).
    pub standings: Arc<admission::Standings>,
    /// Affinities read or written recently (docs/DESIGN.md#admission-cache).
    pub affinities: Arc<admission::Affinities>,
    /// Bytes of HTTP request bodies being received, per key.
    pub bodies: Arc<admission::BodyBytes>,
    /// Per-key caps across relays (PostgreSQL with `limits.fleet_slot_ttl_ms` > 0).
    pub fleet: Option<Arc<fleet::Fleet>>,
    pub registry: Addr<registry::Registry>,
    /// HTTP requests in flight (docs/DESIGN.md#http-surface).
    pub requests: Arc<requests::Requests>,
    pub draining: Arc<AtomicBool>,
    /// Which worker thread a new session runs on (docs/DESIGN.md#placement).
    pub placement: Arc<crate::pool::placement::Placement>,
}

impl SessionDeps {
    /// The pool of the account named `account`.
    pub fn pool_of(&self, account: &str) -> Option<&Addr<ContextPool>> {
        self.accounts
            .iter()
            .find(|a| a.name == account)
            .map(|a| &a.pool)
    }
}
