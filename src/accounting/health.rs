//! What sessions and `/readyz` need to know about accounting: whether a finished turn can be
//! made durable now. The spool and the database are each up or down; accounting is
//! *unavailable* when both are down — then new turns are refused (`accounting_unavailable`)
//! and readiness is 503 naming both causes. Each change of that state is logged once.

use std::sync::Mutex;
use std::time::Instant;

use tracing::{error, info};

#[derive(Debug, Default)]
struct State {
    /// Why the spool cannot acknowledge records, since when.
    spool: Option<(String, Instant)>,
    /// Why the last database write failed, since when.
    db: Option<(String, Instant)>,
    unavailable_since: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct AccountingHealth {
    inner: Mutex<State>,
}

/// A snapshot for readiness.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthReport {
    pub spool_error: Option<String>,
    pub db_error: Option<String>,
    pub db_failing_for_ms: Option<u64>,
    /// Neither the spool nor the database can acknowledge a record.
    pub unavailable: bool,
}

impl AccountingHealth {
    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g);
        let down = g.spool.is_some() && g.db.is_some();
        match (down, g.unavailable_since) {
            (true, None) => {
                g.unavailable_since = Some(Instant::now());
                error!(
                    spool = g.spool.as_ref().map(|s| s.0.as_str()),
                    database = g.db.as_ref().map(|s| s.0.as_str()),
                    "accounting unavailable: neither the spool nor the database can make a record durable; turns are refused"
                );
            }
            (false, Some(since)) => {
                g.unavailable_since = None;
                info!(
                    after_ms = crate::num::millis(since.elapsed()),
                    "accounting available again"
                );
            }
            _ => {}
        }
    }

    pub fn spool_down(&self, cause: String) {
        self.update(|g| {
            g.spool.get_or_insert((cause, Instant::now()));
        });
    }

    pub fn spool_up(&self) {
        self.update(|g| g.spool = None);
    }

    pub fn db_failed(&self, cause: String) {
        self.update(|g| match &mut g.db {
            Some((c, _)) => *c = cause,
            None => g.db = Some((cause, Instant::now())),
        });
    }

    pub fn db_ok(&self) {
        self.update(|g| g.db = None);
    }

    /// Why a turn must be refused now, if it must.
    pub fn refusal(&self) -> Option<String> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match (&g.spool, &g.db) {
            (Some((s, _)), Some((d, _))) => Some(format!(
                "usage cannot be recorded: spool: {s}; database: {d}"
            )),
            _ => None,
        }
    }

    pub fn report(&self) -> HealthReport {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        HealthReport {
            spool_error: g.spool.as_ref().map(|s| s.0.clone()),
            db_error: g.db.as_ref().map(|s| s.0.clone()),
            db_failing_for_ms: g.db.as_ref().map(|s| crate::num::millis(s.1.elapsed())),
            unavailable: g.spool.is_some() && g.db.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_only_when_both_are_down() {
        let h = AccountingHealth::default();
        h.spool_down("EIO".into());
        assert_eq!(h.refusal(), None);
        h.db_failed("refused".into());
        let why = h.refusal().unwrap();
        assert!(why.contains("EIO") && why.contains("refused"), "{why}");
        assert!(h.report().unavailable);
        h.spool_up();
        assert_eq!(h.refusal(), None);
        assert_eq!(h.report().db_error.as_deref(), Some("refused"));
        h.db_ok();
        assert_eq!(h.report(), HealthReport::default());
    }
}
