//! An upstream account's health (docs/DESIGN.md#accounts): after a failed dial or request the
//! account cools down — no dial until its `Retry-After` or its backoff (with jitter) has passed,
//! then one probe — and turns prefer the accounts that are not cooling. A refused credential
//! (401/403) disables the account: it is probed once a minute (`pool.refused_credential =
//! "probe"`) or waits for an operator (`"operator"`). Shared by the pool (dials), the sessions
//! and HTTP requests (which choose accounts and see in-band refusals); the rules are pure.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use serde::Serialize;

pub use crate::config::OnRefusedCredential;

/// First backoff after a failure; doubled per failure in a row, capped.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// The longest `Retry-After` believed (an upstream's "come back tomorrow" is probed sooner).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(600);

/// How long an account cools after `failures` failures in a row, before jitter.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    BACKOFF_FIRST.saturating_mul(1u32 << exp).min(BACKOFF_MAX)
}

/// `backoff` spread over ±20 % by `unit` (uniform in [0, 1)), so relays that saw one outage
/// do not probe in step.
pub fn jittered(failures: u32, unit: f64) -> Duration {
    backoff(failures).mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// A `Retry-After` header's delay (whole seconds; an HTTP date is not trusted), capped.
pub fn retry_after(value: &str) -> Option<Duration> {
    let s: u64 = value.trim().parse().ok()?;
    Some(Duration::from_secs(s).min(RETRY_AFTER_MAX))
}

fn unit_random() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    crate::num::unit_interval(u64::from_le_bytes(b))
}

/// One failure of an account.
#[derive(Debug, Clone, Default)]
pub struct Failure<'a> {
    /// What operators see (the upstream's status and words, no secrets).
    pub error: &'a str,
    pub retry_after: Option<Duration>,
    /// 401/403, or an in-band `invalid_api_key`.
    pub credential_refused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disabled {
    Operator,
    Credential,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    failures_total: u64,
    cooling_until: Option<Instant>,
    last_error: Option<String>,
    disabled: Option<Disabled>,
    /// When the current spell (failing or disabled) started.
    since: Option<NaiveDateTime>,
}

/// One account's health, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct View {
    /// `healthy`, `cooling` (no dial until `next_probe_ms`), `probing` (the next dial decides)
    /// or `disabled`.
    pub state: &'static str,
    /// Why it is disabled: `operator` or `credential_refused`.
    pub reason: Option<&'static str>,
    /// Failures in a row, and since the start.
    pub failures: u32,
    pub failures_total: u64,
    #[serde(serialize_with = "crate::utc::serialize_opt")]
    pub since: Option<NaiveDateTime>,
    /// Milliseconds until the next probe may dial (cooling, or disabled and probed).
    pub next_probe_ms: Option<u64>,
    /// The upstream answered a WebSocket handshake 426: its turns go over HTTP
    /// (docs/DESIGN.md#upstream-transports).
    pub http_only: bool,
    /// The upstream refused `stream_id`: named lanes' turns go over HTTP.
    pub lanes_refused: bool,
}

/// What a relay learnt of an account's transport (docs/DESIGN.md#learnt-facts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learnt {
    /// Its upstream answered a WebSocket handshake 426.
    pub http_only: bool,
    /// Its upstream refused `stream_id`.
    pub lanes_refused: bool,
    /// The smallest request its upstream closed with 1009; 0: none.
    pub refused_len: usize,
}

impl Learnt {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// What either learnt.
    #[must_use]
    pub fn union(self, other: Learnt) -> Learnt {
        let refused_len = match (self.refused_len, other.refused_len) {
            (0, n) | (n, 0) => n,
            (a, b) => a.min(b),
        };
        Learnt {
            http_only: self.http_only || other.http_only,
            lanes_refused: self.lanes_refused || other.lanes_refused,
            refused_len,
        }
    }
}

/// One account's health.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
    on_refused: OnRefusedCredential,
    /// Set once by a 426 to a handshake: no more dials (docs/DESIGN.md#upstream-transports).
    http_only: AtomicBool,
    /// Set once when the upstream refused a `stream_id` (a backend without lanes): named lanes
    /// go over HTTP.
    lanes_refused: AtomicBool,
    /// The smallest request the upstream's WebSocket closed with 1009 (message too big); 0 until
    /// one did.
    refused_len: AtomicUsize,
}

impl Health {
    pub fn new(on_refused: OnRefusedCredential) -> Self {
        Self {
            state: Mutex::default(),
            on_refused,
            http_only: AtomicBool::new(false),
            refused_len: AtomicUsize::new(0),
            lanes_refused: AtomicBool::new(false),
        }
    }

    /// The upstream answered a `stream_id` with "Unsupported parameter": its WebSocket has no
    /// lanes, and named lanes' turns go over HTTP from now on. Returns whether this is news.
    pub fn refuse_lanes(&self) -> bool {
        !self.lanes_refused.swap(true, Ordering::Relaxed)
    }

    /// Whether named lanes' turns go over HTTP on this account.
    pub fn lanes_refused(&self) -> bool {
        self.lanes_refused.load(Ordering::Relaxed)
    }

    /// The upstream closed a socket with 1009 right after a request of `len` bytes: requests
    /// of that size go over HTTP from now on. Returns whether the limit fell (worth a log line).
    pub fn refused_frame(&self, len: usize) -> bool {
        let smaller = |cur: usize| (len > 0 && (cur == 0 || len < cur)).then_some(len);
        self.refused_len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, smaller)
            .is_ok()
    }

    /// The largest request frame the account's WebSocket is known to take, at most `configured`
    /// (0: it has no WebSocket mode).
    pub fn ws_frame_max(&self, configured: usize) -> usize {
        if self.http_only() {
            return 0;
        }
        match self.refused_len.load(Ordering::Relaxed) {
            0 => configured,
            refused => configured.min(refused - 1),
        }
    }

    /// The upstream refused the WebSocket mode (426): from now on the account is reached over
    /// HTTP only. Returns whether this is news (the one moment worth a log line).
    pub fn refuse_websocket(&self) -> bool {
        !self.http_only.swap(true, Ordering::Relaxed)
    }

    /// Whether the account's turns go over HTTP (its upstream answered a handshake 426).
    pub fn http_only(&self) -> bool {
        self.http_only.load(Ordering::Relaxed)
    }

    /// What was learnt of the account's transport so far.
    pub fn learnt(&self) -> Learnt {
        Learnt {
            http_only: self.http_only(),
            lanes_refused: self.lanes_refused(),
            refused_len: self.refused_len.load(Ordering::Relaxed),
        }
    }

    /// Takes what another relay learnt; whether any of it is news here.
    pub fn adopt(&self, l: Learnt) -> bool {
        let mut news = false;
        if l.http_only {
            news |= self.refuse_websocket();
        }
        if l.lanes_refused {
            news |= self.refuse_lanes();
        }
        if l.refused_len > 0 {
            news |= self.refused_frame(l.refused_len);
        }
        news
    }

    /// Forgets what was learnt of the transport: the next turn finds out again (the upstream
    /// may have changed).
    pub fn forget_learnt(&self) {
        self.http_only.store(false, Ordering::Relaxed);
        self.lanes_refused.store(false, Ordering::Relaxed);
        self.refused_len.store(0, Ordering::Relaxed);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A dial or request failed: cool down (its `Retry-After`, else longer each time in a
    /// row), or be disabled for a refused credential. Returns the wait and whether this starts
    /// a failing spell (the one moment worth a log line).
    pub fn failed(&self, f: &Failure<'_>, now: Instant) -> (Duration, bool) {
        let mut s = self.state();
        s.failures += 1;
        s.failures_total += 1;
        let first = s.failures == 1 && s.disabled.is_none();
        if first {
            s.since = Some(crate::db::now());
        }
        let wait = if f.credential_refused {
            if s.disabled.is_none() {
                s.disabled = Some(Disabled::Credential);
            }
            BACKOFF_MAX
        } else {
            f.retry_after
                .unwrap_or_else(|| jittered(s.failures, unit_random()))
        };
        s.cooling_until = Some(now + wait);
        // The operator's view: the upstream's words, bounded.
        s.last_error = Some(f.error.chars().take(300).collect());
        (wait, first)
    }

    /// A dial or request worked: healthy again (a credential-disabled account too: its probe
    /// passed). Returns whether it had been failing.
    pub fn recovered(&self) -> bool {
        let mut s = self.state();
        let was = s.failures > 0 || s.disabled == Some(Disabled::Credential);
        if !was {
            return false;
        }
        s.failures = 0;
        s.cooling_until = None;
        s.since = None;
        if s.disabled == Some(Disabled::Credential) {
            s.disabled = None;
        }
        true
    }

    /// Whether no dial should be tried now (cooling, or disabled).
    pub fn cooling(&self, now: Instant) -> bool {
        let s = self.state();
        match s.disabled {
            Some(Disabled::Operator) => true,
            Some(Disabled::Credential) if self.on_refused == OnRefusedCredential::Operator => true,
            _ => s.cooling_until.is_some_and(|t| now < t),
        }
    }

    /// An operator takes the account out (`true`) or puts it back (`false`, healthy again).
    pub fn set_disabled(&self, disabled: bool) {
        let mut s = self.state();
        if disabled {
            s.disabled = Some(Disabled::Operator);
            s.since = Some(crate::db::now());
        } else {
            s.disabled = None;
            s.failures = 0;
            s.cooling_until = None;
            s.since = None;
        }
    }

    /// Whether it is out: its last dial failed (until a dial succeeds), or it is disabled.
    pub fn failing(&self) -> bool {
        let s = self.state();
        s.disabled.is_some() || s.failures > 0
    }

    pub fn last_error(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    /// The state for operators and metrics.
    pub fn view(&self, now: Instant) -> View {
        let s = self.state();
        let next_probe_ms = |s: &State| {
            s.cooling_until
                .filter(|t| now < *t)
                .map(|t| crate::num::millis(t - now))
        };
        let (state, reason, next) = match s.disabled {
            Some(Disabled::Operator) => ("disabled", Some("operator"), None),
            Some(Disabled::Credential) => (
                "disabled",
                Some("credential_refused"),
                (self.on_refused == OnRefusedCredential::Probe)
                    .then(|| next_probe_ms(&s).unwrap_or(0)),
            ),
            None => match next_probe_ms(&s) {
                Some(ms) => ("cooling", None, Some(ms)),
                None if s.failures > 0 => ("probing", None, Some(0)),
                None => ("healthy", None, None),
            },
        };
        View {
            state,
            reason,
            failures: s.failures,
            failures_total: s.failures_total,
            since: s.since,
            next_probe_ms: next,
            http_only: self.http_only(),
            lanes_refused: self.lanes_refused(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(error: &str) -> Failure<'_> {
        Failure {
            error,
            ..Failure::default()
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(7), Duration::from_secs(60));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(60));
        assert_eq!(jittered(2, 0.0), Duration::from_millis(1600));
        assert_eq!(jittered(2, 0.5), Duration::from_secs(2));
        assert!(jittered(2, 0.999) < Duration::from_millis(2400));
    }

    #[test]
    fn retry_after_is_seconds_and_capped() {
        assert_eq!(retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(retry_after("86400"), Some(Duration::from_secs(600)));
        assert_eq!(retry_after("Wed, 21 Oct 2026 07:28:00 GMT"), None);
    }

    #[test]
    fn cooling_then_probe_then_healthy() {
        let h = Health::default();
        let t0 = Instant::now();
        assert!(!h.cooling(t0));
        let (wait, first) = h.failed(&fail("429"), t0);
        assert!(first && (Duration::from_millis(800)..Duration::from_millis(1200)).contains(&wait));
        assert!(h.cooling(t0 + Duration::from_millis(700)));
        assert_eq!(h.view(t0).state, "cooling");
        assert!(h.view(t0).since.is_some());
        // Past the backoff: one probe may dial.
        assert!(!h.cooling(t0 + Duration::from_secs(2)));
        assert_eq!(h.view(t0 + Duration::from_secs(2)).state, "probing");
        assert!(
            !h.failed(&fail("429"), t0).1,
            "the spell goes on: no new log line"
        );
        assert!(h.recovered());
        assert!(!h.cooling(t0));
        let v = h.view(t0);
        assert_eq!((v.state, v.failures, v.failures_total), ("healthy", 0, 2));
        assert_eq!(h.last_error().as_deref(), Some("429"));
        h.set_disabled(true);
        assert!(h.cooling(t0 + Duration::from_secs(3600)) && h.failing());
        assert_eq!(h.view(t0).reason, Some("operator"));
        h.set_disabled(false);
        assert!(!h.cooling(t0) && !h.failing());
    }

    #[test]
    fn retry_after_sets_the_wait() {
        let h = Health::default();
        let t0 = Instant::now();
        let f = Failure {
            error: "429",
            retry_after: Some(Duration::from_secs(2)),
            ..Failure::default()
        };
        assert_eq!(h.failed(&f, t0).0, Duration::from_secs(2));
        assert!(h.cooling(t0 + Duration::from_millis(1900)));
        assert!(!h.cooling(t0 + Duration::from_secs(2)));
        assert_eq!(h.view(t0).next_probe_ms, Some(2000));
    }

    #[test]
    fn a_refused_credential_disables() {
        let refused = Failure {
            error: "401",
            credential_refused: true,
            ..Failure::default()
        };
        let t0 = Instant::now();
        // Probe: disabled, one dial a minute; a probe that works enables it again.
        let h = Health::new(OnRefusedCredential::Probe);
        assert_eq!(h.failed(&refused, t0).0, BACKOFF_MAX);
        let v = h.view(t0);
        assert_eq!(
            (v.state, v.reason),
            ("disabled", Some("credential_refused"))
        );
        assert!(h.cooling(t0 + Duration::from_secs(59)));
        assert!(!h.cooling(t0 + Duration::from_secs(60)));
        assert!(h.recovered());
        assert_eq!(h.view(t0).state, "healthy");
        // Operator: never dialled until enabled.
        let h = Health::new(OnRefusedCredential::Operator);
        h.failed(&refused, t0);
        assert!(h.cooling(t0 + Duration::from_secs(3600)));
        assert_eq!(h.view(t0).next_probe_ms, None);
        h.set_disabled(false);
        assert!(!h.cooling(t0));
        // An operator's disable is not lifted by a probe.
        let h = Health::default();
        h.set_disabled(true);
        assert!(!h.recovered());
        assert!(h.cooling(t0));
    }

    #[test]
    fn a_1009_teaches_the_frame_limit_and_a_426_closes_the_websocket() {
        let h = Health::default();
        assert_eq!(h.ws_frame_max(1000), 1000);
        assert!(h.refused_frame(600));
        assert_eq!(h.ws_frame_max(1000), 599);
        assert!(!h.refused_frame(800), "a larger refusal teaches nothing");
        assert!(h.refused_frame(500));
        assert_eq!(h.ws_frame_max(1000), 499);
        assert_eq!(h.ws_frame_max(100), 100);
        assert!(h.refuse_websocket());
        assert!(!h.refuse_websocket());
        assert_eq!(h.ws_frame_max(1000), 0);
    }
}
