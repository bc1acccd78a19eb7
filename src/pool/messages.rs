//! Messages of the pool actor.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use serde::Serialize;

use crate::upstream::UpstreamConn;
use crate::upstream::messages::UpstreamEvent;

/// A connection lent to one session until it is released.
#[derive(Debug, Clone)]
pub struct Lease {
    pub conn: u64,
    /// This lease's own number: a `Release` or `Parked` that names an older lease of the same
    /// connection (one the pool took back from a holder that is gone) is ignored.
    pub id: u64,
    pub addr: Addr<UpstreamConn>,
    pub account: Arc<str>,
    pub opened_at: Instant,
    /// Set when the pool retires the connection (a pool restart): the lessee gives it back
    /// before its next turn instead of using it again.
    pub retired: Arc<std::sync::atomic::AtomicBool>,
}

impl Lease {
    pub fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("no upstream connection free within the lease timeout")]
    Timeout,
    #[error("upstream dial failed: {0}")]
    DialFailed(String),
    #[error("the pool is shutting down")]
    ShuttingDown,
    #[error("the account is cooling down after failed dials")]
    Cooling,
    /// No connection now, and the requester would rather not wait for one.
    #[error("no upstream connection free now")]
    Busy,
    /// The upstream answered the handshake 426: the account takes turns over HTTP only.
    #[error("the upstream refuses the WebSocket mode (426)")]
    WebSocketRefused,
}

/// Where a session runs. A connection dialled for it runs there too, and an idle one already
/// there is lent first: its events then reach the session without crossing threads (and
/// upstream sockets spread over the workers as the sessions do).
#[derive(Debug, Clone)]
pub struct Home {
    pub arbiter: actix::ArbiterHandle,
    pub thread: std::thread::ThreadId,
}

impl Home {
    /// The caller's arbiter and thread.
    pub fn current() -> Self {
        Self {
            arbiter: actix::Arbiter::current(),
            thread: std::thread::current().id(),
        }
    }
}

/// Lend a connection: the preferred one if it is idle and fit, else a fit idle one, else a new
/// one when under capacity, else wait up to the lease timeout.
#[derive(Debug, Message)]
#[rtype(result = "Result<Lease, LeaseError>")]
pub struct Acquire {
    /// Handshake headers of the session (passed through when a connection is dialled).
    pub headers: Vec<(String, String)>,
    pub preferred: Option<u64>,
    pub lessee: Recipient<UpstreamEvent>,
    /// Where the requester runs (`None`: anywhere).
    pub home: Option<Home>,
    /// Where the pool asks for the connection back while the session holds it between turns.
    pub reclaim: Option<Recipient<Reclaim>>,
    /// Wait for a connection when none is idle and none can be dialled (`false`: answer
    /// `Busy` at once — an HTTP client's turn then goes over HTTP rather than queue).
    pub queue: bool,
}

/// The pool needs the connection a session holds between turns (docs/DESIGN.md#idle-reclaim): give it back if
/// no turn is in flight (answer `true` and release it), else keep it (`false`).
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Reclaim {
    pub conn: u64,
}

/// The lessee holds `conn` between turns (`parked: true`) or uses it for a turn (`false`):
/// only a parked connection is reclaimed, the one parked longest first.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Parked {
    pub conn: u64,
    pub lease: u64,
    pub parked: bool,
}

/// Give a connection back. `reusable: false` when a response may still be in flight on it or
/// its state is unknown: it is closed.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Release {
    pub conn: u64,
    pub lease: u64,
    pub reusable: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PoolSnapshot {
    pub account: String,
    pub idle: usize,
    pub leased: usize,
    /// Leased connections whose session holds them between turns.
    pub parked: usize,
    pub reclaimed_total: u64,
    /// Leases taken back because their session was gone (docs/DESIGN.md#leases).
    pub recovered_total: u64,
    pub dialing: usize,
    pub waiters: usize,
    pub dialled_total: u64,
    pub leases_total: u64,
    /// `healthy`, `cooling` (after failures, no dial until its backoff or `Retry-After`
    /// passed), `probing` (the next dial decides) or `disabled`.
    pub health: String,
    /// Why it is disabled: `operator` or `credential_refused`.
    pub reason: Option<String>,
    /// Failures in a row, and since the start.
    pub failures: u32,
    pub failures_total: u64,
    /// When the current failing or disabled spell started.
    #[serde(serialize_with = "crate::utc::serialize_opt")]
    pub since: Option<chrono::NaiveDateTime>,
    /// Milliseconds until the next probe may dial.
    pub next_probe_ms: Option<u64>,
    /// The last dial error (the upstream's status and words, no secrets).
    pub last_error: Option<String>,
    /// The upstream answered a handshake 426: turns go over HTTP (docs/DESIGN.md#upstream-transports).
    pub http_only: bool,
    /// The upstream refused `stream_id`: named lanes' turns go over HTTP.
    pub lanes_refused: bool,
}

#[derive(Debug, Message)]
#[rtype(result = "PoolSnapshot")]
pub struct PoolStats;

/// Close every connection (close frames) and refuse new leases; answers with the connection
/// actors, so the caller can wait for their close frames to go out.
#[derive(Debug, Message)]
#[rtype(result = "Vec<Addr<UpstreamConn>>")]
pub struct ShutdownPool;
