//! Learnt facts shared (docs/DESIGN.md#learnt-facts): what one relay learns of an account's
//! transport — a 426 to the WebSocket handshake, a refused `stream_id`, a 1009 frame limit — is
//! written to `account_facts`, and every relay on the database adopts what the others learnt,
//! so a fleet pays for each discovery once, and a restart keeps it. Facts older than
//! `upstream.learnt_ttl_s` are forgotten everywhere: the next turn probes the upstream again.
//! `plan` decides (pure, unit-tested); `share` carries it out on a timer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDateTime;
use tracing::{info, warn};

use super::health::{Health, Learnt};
use crate::db::queries::facts::{self, Facts};
use crate::db::{DbError, DbPool};

/// What one account's facts need, this round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    /// This relay learnt something since it last wrote: store the union with what the database
    /// holds (not expired), as learnt now.
    Store(Learnt),
    /// Another relay learnt these: take them.
    Adopt(Learnt),
    /// They are too old (or another relay forgot them): forget them here, and delete the row
    /// learnt at that time (`Some`).
    Forget(Option<NaiveDateTime>),
}

/// The database's facts of an account, as `Learnt`, with when they were learnt.
pub fn learnt_of(f: &Facts) -> (Learnt, NaiveDateTime) {
    let l = Learnt {
        http_only: f.http_only,
        lanes_refused: f.lanes_refused,
        refused_len: usize::try_from(f.refused_frame_bytes).unwrap_or(0),
    };
    (l, f.learnt_at)
}

/// One account's round: `local` is what this relay knows, `written` what it last stored (or
/// adopted), `stored` the database's row.
pub fn plan(
    local: Learnt,
    written: Learnt,
    stored: Option<(Learnt, NaiveDateTime)>,
    now: NaiveDateTime,
    ttl: Duration,
) -> Plan {
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
    let expired = stored.is_some_and(|(_, at)| at + ttl <= now);
    let live = stored.filter(|_| !expired).map(|(l, _)| l);
    if local.union(written) != written {
        return Plan::Store(local.union(live.unwrap_or_default()));
    }
    if expired {
        return Plan::Forget(stored.map(|(_, at)| at));
    }
    match live {
        Some(l) if local.union(l) != local => Plan::Adopt(l),
        Some(_) => Plan::Nothing,
        // Known here, gone from the database: another relay forgot them.
        None if !local.is_empty() => Plan::Forget(None),
        None => Plan::Nothing,
    }
}

/// Shares the facts of `accounts` (name, health; accounts whose transport is declared are left
/// out) every `every`, forgetting them after `ttl`. One line when the database cannot be
/// reached, one when it can again.
pub async fn share(
    db: DbPool,
    accounts: Vec<(String, Arc<Health>)>,
    every: Duration,
    ttl: Duration,
) {
    let mut written: HashMap<String, Learnt> = HashMap::new();
    let mut failing = false;
    loop {
        match round(&db, &accounts, &mut written, ttl).await {
            Ok(()) if failing => {
                failing = false;
                info!("learnt account facts shared with the database again");
            }
            Err(e) if !failing => {
                failing = true;
                warn!(error = %e, "cannot share learnt account facts; this relay keeps its own meanwhile");
            }
            _ => {}
        }
        tokio::time::sleep(every).await;
    }
}

async fn round(
    db: &DbPool,
    accounts: &[(String, Arc<Health>)],
    written: &mut HashMap<String, Learnt>,
    ttl: Duration,
) -> Result<(), DbError> {
    let rows = facts::all(db).await?;
    let now = crate::db::now();
    for (name, health) in accounts {
        let stored = rows.iter().find(|f| f.account == *name).map(learnt_of);
        let local = health.learnt();
        let last = written.get(name).copied().unwrap_or_default();
        match plan(local, last, stored, now, ttl) {
            Plan::Nothing => {}
            Plan::Store(l) => {
                let row = Facts {
                    account: name.clone(),
                    http_only: l.http_only,
                    lanes_refused: l.lanes_refused,
                    refused_frame_bytes: i64::try_from(l.refused_len).unwrap_or(i64::MAX),
                    learnt_at: now,
                };
                facts::store(db, &row).await?;
                health.adopt(l);
                written.insert(name.clone(), l);
            }
            Plan::Adopt(l) => {
                if health.adopt(l) {
                    info!(account = %name, http_only = l.http_only, lanes_refused = l.lanes_refused,
                        refused_frame_bytes = l.refused_len, "adopted what another relay learnt of this account's transport");
                }
                written.insert(name.clone(), health.learnt());
            }
            Plan::Forget(at) => {
                if let Some(at) = at {
                    facts::forget(db, name, at).await?;
                }
                health.forget_learnt();
                written.remove(name);
                info!(account = %name, "learnt transport facts expired; the next turn probes the upstream again");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(3600);

    fn at(s: i64) -> NaiveDateTime {
        chrono::DateTime::from_timestamp(1_800_000_000 + s, 0)
            .unwrap()
            .naive_utc()
    }

    const HTTP: Learnt = Learnt {
        http_only: true,
        lanes_refused: false,
        refused_len: 0,
    };
    const LANES: Learnt = Learnt {
        http_only: false,
        lanes_refused: true,
        refused_len: 0,
    };
    const NONE: Learnt = Learnt {
        http_only: false,
        lanes_refused: false,
        refused_len: 0,
    };

    fn frame(n: usize) -> Learnt {
        Learnt {
            refused_len: n,
            ..NONE
        }
    }

    #[test]
    fn what_a_relay_learns_is_stored_with_what_others_learnt() {
        assert_eq!(plan(HTTP, NONE, None, at(0), TTL), Plan::Store(HTTP));
        assert_eq!(
            plan(HTTP, NONE, Some((LANES, at(0))), at(10), TTL),
            Plan::Store(HTTP.union(LANES))
        );
        // A smaller 1009 limit is news; a larger one is not.
        assert_eq!(
            plan(
                frame(500),
                frame(800),
                Some((frame(800), at(0))),
                at(1),
                TTL
            ),
            Plan::Store(frame(500))
        );
        assert_eq!(
            plan(
                frame(500),
                frame(500),
                Some((frame(800), at(0))),
                at(1),
                TTL
            ),
            Plan::Nothing
        );
        // Learnt again after the row expired: stored afresh, the old row not merged.
        assert_eq!(
            plan(HTTP, NONE, Some((LANES, at(0))), at(3600), TTL),
            Plan::Store(HTTP)
        );
    }

    #[test]
    fn what_others_learnt_is_adopted() {
        assert_eq!(
            plan(NONE, NONE, Some((LANES, at(0))), at(1), TTL),
            Plan::Adopt(LANES)
        );
        assert_eq!(
            plan(LANES, LANES, Some((LANES, at(0))), at(1), TTL),
            Plan::Nothing
        );
        assert_eq!(plan(NONE, NONE, None, at(1), TTL), Plan::Nothing);
    }

    #[test]
    fn old_facts_are_forgotten_everywhere() {
        assert_eq!(
            plan(HTTP, HTTP, Some((HTTP, at(0))), at(3600), TTL),
            Plan::Forget(Some(at(0)))
        );
        // Another relay deleted the row: forgotten here too.
        assert_eq!(plan(HTTP, HTTP, None, at(1), TTL), Plan::Forget(None));
    }
}
