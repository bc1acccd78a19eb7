//! HTTP requests in flight (`POST /v1/responses`, `/compact`), as `/admin/requests` lists
//! them: the HTTP surface's counterpart of the session registry. A guard holds each entry, so
//! no exit path leaves one behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::telemetry::metric;

/// One request in flight.
#[derive(Debug, Clone, Serialize)]
pub struct RequestInfo {
    pub request_id: String,
    pub key_prefix: String,
    pub user: String,
    pub path: String,
    pub model: String,
    pub stream: bool,
    /// The account serving it, once chosen.
    pub account: Option<String>,
    #[serde(serialize_with = "crate::utc::serialize")]
    pub started_at: chrono::NaiveDateTime,
}

#[derive(Debug)]
pub struct Requests {
    inner: Mutex<HashMap<String, RequestInfo>>,
    /// Turn numbers of HTTP clients' sessions.
    turns: Mutex<SessionTurns>,
    /// Set at the end of a shutdown's grace: requests still running end `shutting_down`.
    abort: tokio::sync::watch::Sender<bool>,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            turns: Mutex::default(),
            abort: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Removes its request from the registry when dropped.
#[derive(Debug)]
pub struct InFlight {
    requests: Arc<Requests>,
    id: String,
}

impl Requests {
    fn map(&self) -> MutexGuard<'_, HashMap<String, RequestInfo>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn enter(self: &Arc<Self>, info: RequestInfo) -> InFlight {
        let id = info.request_id.clone();
        self.map().insert(id.clone(), info);
        ::metrics::gauge!(metric::HTTP_REQUESTS_IN_FLIGHT).increment(1.0);
        InFlight {
            requests: self.clone(),
            id,
        }
    }

    /// The turn number of the next request of the HTTP client's session `session` (its
    /// `session-id` header): 1, 2, … as a WebSocket session numbers its turns.
    pub fn turn_of(&self, session: &str) -> i32 {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        turns.next(session, std::time::Instant::now())
    }

    pub fn count(&self) -> usize {
        self.map().len()
    }

    /// Ends every request still running (shutdown after its grace).
    pub fn abort_all(&self) {
        self.abort.send_replace(true);
    }

    /// Resolves once `abort_all` was called.
    pub fn aborted(&self) -> impl Future<Output = ()> + 'static {
        let mut rx = self.abort.subscribe();
        async move {
            let _ = rx.wait_for(|a| *a).await;
        }
    }

    /// Every request in flight, oldest first.
    pub fn list(&self) -> Vec<RequestInfo> {
        let mut all: Vec<RequestInfo> = self.map().values().cloned().collect();
        all.sort_by_key(|r| r.started_at);
        all
    }
}

/// Turn numbers of HTTP clients' sessions (docs/DESIGN.md#http-surface), per relay. Bounded:
/// with `MAX` sessions known, the idlest half is forgotten (a forgotten session that comes back
/// counts from 1 again).
#[derive(Debug, Default)]
struct SessionTurns {
    last: HashMap<String, (i32, std::time::Instant)>,
}

impl SessionTurns {
    const MAX: usize = 50_000;

    fn next(&mut self, session: &str, now: std::time::Instant) -> i32 {
        if let Some((n, at)) = self.last.get_mut(session) {
            *n = n.saturating_add(1);
            *at = now;
            return *n;
        }
        if self.last.len() >= Self::MAX {
            self.forget_idlest();
        }
        self.last.insert(session.to_string(), (1, now));
        1
    }

    fn forget_idlest(&mut self) {
        let mut seen: Vec<std::time::Instant> = self.last.values().map(|(_, at)| *at).collect();
        let middle = seen.len() / 2;
        let (_, cut, _) = seen.select_nth_unstable(middle);
        let cut = *cut;
        self.last.retain(|_, (_, at)| *at > cut);
    }
}

impl InFlight {
    pub fn serving(&self, account: &str) {
        if let Some(r) = self.requests.map().get_mut(&self.id) {
            r.account = Some(account.to_string());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.requests.map().remove(&self.id);
        ::metrics::gauge!(metric::HTTP_REQUESTS_IN_FLIGHT).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_sessions_requests_are_numbered_and_the_idlest_forgotten() {
        let t0 = Instant::now();
        let mut t = SessionTurns::default();
        assert_eq!(t.next("a", t0), 1);
        assert_eq!(t.next("b", t0), 1);
        assert_eq!(t.next("a", t0), 2);
        assert_eq!(t.next("a", t0), 3);
        // Full: the idlest half goes, the busy ones keep counting.
        let mut t = SessionTurns::default();
        for i in 0..SessionTurns::MAX {
            let at = t0 + Duration::from_micros(u64::try_from(i).unwrap());
            t.next(&i.to_string(), at);
        }
        let late = t0 + Duration::from_secs(60);
        let busy = (SessionTurns::MAX - 1).to_string();
        assert_eq!(t.next("new", late), 1);
        assert!(
            t.last.len() <= SessionTurns::MAX / 2 + 1,
            "{}",
            t.last.len()
        );
        assert_eq!(t.next(&busy, late), 2, "the busiest kept its count");
        assert_eq!(t.next("0", late), 1, "the idlest forgotten");
    }
}
