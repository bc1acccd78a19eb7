//! An upstream account's health (docs/DESIGN.md#accounts): after a failed dial the account
//! cools down — no dial until its backoff has passed, then one probe — and sessions prefer the
//! accounts that are not cooling. Shared by the pool (which records dials) and the sessions
//! (which choose accounts); the backoff rule is pure.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First backoff after a failed dial; doubled per failure in a row, capped.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long an account cools after `failures` failed dials in a row.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    cooling_until: Option<Instant>,
    last_error: Option<String>,
    /// Taken out by an operator: never dialled until enabled again.
    disabled: bool,
}

/// One account's health.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A dial failed: cool down (longer each time in a row). Returns the cooling time and
    /// whether this starts a failing spell (the one moment worth a log line).
    pub fn failed(&self, error: &str, now: Instant) -> (Duration, bool) {
        let mut s = self.state();
        s.failures += 1;
        let wait = backoff(s.failures);
        s.cooling_until = Some(now + wait);
        // The operator's view: the upstream's words, bounded.
        s.last_error = Some(error.chars().take(300).collect());
        (wait, s.failures == 1)
    }

    /// A dial worked: healthy again. Returns whether it had been failing.
    pub fn recovered(&self) -> bool {
        let mut s = self.state();
        let was = s.failures > 0;
        s.failures = 0;
        s.cooling_until = None;
        was
    }

    /// Whether no dial should be tried now (cooling, or disabled by an operator).
    pub fn cooling(&self, now: Instant) -> bool {
        let s = self.state();
        s.disabled || s.cooling_until.is_some_and(|t| now < t)
    }

    /// An operator takes the account out (`true`) or puts it back (`false`, healthy again).
    pub fn set_disabled(&self, disabled: bool) {
        let mut s = self.state();
        s.disabled = disabled;
        if !disabled {
            s.failures = 0;
            s.cooling_until = None;
        }
    }

    /// Whether it is out: its last dial failed (until a dial succeeds), or it is disabled.
    pub fn failing(&self) -> bool {
        let s = self.state();
        s.disabled || s.failures > 0
    }

    pub fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    /// (state, failures in a row) for operators.
    pub fn describe(&self, now: Instant) -> (&'static str, u32) {
        let s = self.state();
        let state = match s.cooling_until {
            _ if s.disabled => "disabled",
            Some(t) if now < t => "cooling",
            _ if s.failures > 0 => "probing",
            _ => "healthy",
        };
        (state, s.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
    }

    #[test]
    fn cooling_then_probe_then_healthy() {
        let h = Health::default();
        let t0 = Instant::now();
        assert!(!h.cooling(t0));
        assert_eq!(h.failed("401", t0), (Duration::from_secs(1), true));
        assert!(h.cooling(t0 + Duration::from_millis(500)));
        assert_eq!(h.describe(t0).0, "cooling");
        // Past the backoff: one probe may dial.
        assert!(!h.cooling(t0 + Duration::from_secs(1)));
        assert_eq!(h.describe(t0 + Duration::from_secs(1)).0, "probing");
        assert!(!h.failed("401", t0).1, "the spell goes on: no new log line");
        assert!(h.cooling(t0 + Duration::from_millis(1500)));
        assert!(h.recovered());
        assert!(!h.cooling(t0));
        assert_eq!(h.describe(t0), ("healthy", 0));
        assert_eq!(h.last_error().as_deref(), Some("401"));
        h.set_disabled(true);
        assert!(h.cooling(t0 + Duration::from_secs(3600)) && h.failing());
        assert_eq!(h.describe(t0).0, "disabled");
        h.set_disabled(false);
        assert!(!h.cooling(t0) && !h.failing());
    }
}
