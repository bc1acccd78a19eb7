//! Per-key caps for the whole fleet (docs/DESIGN.md#fleet-slots): with relays sharing one
//! PostgreSQL database, a key's open sessions and turns in flight are counted in
//! `fleet_slots`, so `max_sessions = 2` means two sessions whichever relays they reach. Each
//! relay keeps its rows alive with a heartbeat; a relay that dies stops counting after the
//! slot TTL. The in-memory slots (`admission`) stay the first, per-process check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::db::DbPool;
use crate::db::queries::fleet::{self, NewFleetSlot};

/// What a slot counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Session,
    Turn,
}

impl SlotKind {
    fn label(self) -> &'static str {
        match self {
            SlotKind::Session => "session",
            SlotKind::Turn => "turn",
        }
    }
}

pub struct Fleet {
    db: DbPool,
    relay_id: String,
    ttl: Duration,
    /// Slot writes are failing (logged when this changes, not per call).
    failing: AtomicBool,
}

/// A fleet slot held; dropping it gives it back (in the background; a row that cannot be
/// deleted expires with the TTL).
pub struct FleetSlot {
    fleet: Arc<Fleet>,
    id: String,
}

impl std::fmt::Debug for FleetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FleetSlot").field(&self.id).finish()
    }
}

/// What taking a slot gave.
#[derive(Debug)]
pub enum Taken {
    /// Room for it: the slot, or `None` when nothing needed counting (no limit, or the
    /// database does not answer — the per-process count then holds alone).
    Granted(Option<FleetSlot>),
    /// The key has its limit of this kind across the fleet.
    Full,
}

impl Fleet {
    /// The fleet of relays on `db` (PostgreSQL), this relay named at random.
    pub fn new(db: DbPool, ttl: Duration) -> Arc<Fleet> {
        Arc::new(Fleet {
            db,
            relay_id: format!("relay_{}", crate::ids::random_hex(8)),
            ttl,
            failing: AtomicBool::new(false),
        })
    }

    fn expiry(&self) -> chrono::NaiveDateTime {
        crate::db::now() + chrono::Duration::milliseconds(crate::num::millis_i64(self.ttl))
    }

    /// Takes a slot of `kind` for `key` within `limit` (none: nothing to count).
    pub async fn take(self: &Arc<Self>, key: i64, kind: SlotKind, limit: Option<i32>) -> Taken {
        let Some(limit) = limit else {
            return Taken::Granted(None);
        };
        let row = NewFleetSlot {
            slot_id: format!("{}_{}", self.relay_id, crate::ids::random_hex(12)),
            api_key_id: key,
            kind: kind.label(),
            relay_id: self.relay_id.clone(),
            created_at: crate::db::now(),
            expires_at: self.expiry(),
        };
        let db = self.db.clone();
        let id = row.slot_id.clone();
        let call = async move { fleet::take(&db, &row, i64::from(limit)).await };
        match crate::db::within(crate::db::READ_DEADLINE, call).await {
            Ok(true) => {
                self.working();
                Taken::Granted(Some(FleetSlot {
                    fleet: self.clone(),
                    id,
                }))
            }
            Ok(false) => {
                self.working();
                Taken::Full
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "fleet slots cannot be taken; per-key limits hold per relay until the database answers");
                }
                Taken::Granted(None)
            }
        }
    }

    fn working(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            info!("fleet slots work again");
        }
    }

    /// Keeps this relay's slots alive (every third of the TTL) and drops expired ones.
    pub fn start_heartbeat(self: &Arc<Self>) {
        let me = self.clone();
        actix::spawn(async move {
            let every = (me.ttl / 3).max(Duration::from_millis(100));
            loop {
                tokio::time::sleep(every).await;
                let _ = fleet::heartbeat(&me.db, &me.relay_id, me.expiry()).await;
                let _ = fleet::purge(&me.db, None, crate::db::now()).await;
            }
        });
    }

    /// Gives back every slot of this relay (it stops).
    pub async fn release_all(&self) {
        let _ = fleet::purge(&self.db, Some(&self.relay_id), crate::db::now()).await;
    }
}

impl FleetSlot {
    /// Gives the slot back now; resolves once the database has it (or could not be reached:
    /// the row then expires).
    pub fn release(mut self) -> impl Future<Output = ()> + 'static {
        let (db, id) = (self.fleet.db.clone(), std::mem::take(&mut self.id));
        async move {
            let _ = fleet::release(&db, &id).await;
        }
    }
}

impl Drop for FleetSlot {
    fn drop(&mut self) {
        if self.id.is_empty() {
            // Released already.
            return;
        }
        let (db, id) = (self.fleet.db.clone(), std::mem::take(&mut self.id));
        // Outside a runtime (a test, the very end of a process) the row simply expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = fleet::release(&db, &id).await;
            });
        }
    }
}
