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
    /// Set at the end of a shutdown's grace: requests still running end `shutting_down`.
    abort: tokio::sync::watch::Sender<bool>,
}

impl Default for Requests {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
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
