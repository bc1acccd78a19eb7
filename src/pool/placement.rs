//! Which worker thread a new session runs on (docs/DESIGN.md#placement): the one holding an
//! idle upstream connection of the session's identity, when the thread that accepted the
//! client has none — so the session and the connection it will lease share a thread, and its
//! events never wake another (docs/DESIGN.md#leases).
//!
//! The pools publish their idle connections per identity and thread after each dispatch; the
//! ingress asks `Placement::place` at the handshake. A session placed for a connection
//! *claims* it until its first lease (or its end), so a burst of sessions of one identity is
//! not sent to a thread with one idle connection. The decision itself is `choose`, pure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

/// Idle connections of one pool: identity → thread → how many.
pub type Idle = HashMap<String, HashMap<ThreadId, usize>>;

/// The shared table: the worker threads sessions run on, the pools' idle connections, claims.
#[derive(Default)]
pub struct Placement {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every thread that accepted a session, and how to run something there.
    workers: HashMap<ThreadId, actix::ArbiterHandle>,
    /// Per pool (account), as it last published them.
    idle: HashMap<Arc<str>, Idle>,
    /// Sessions placed for an idle connection that have not leased one yet, per identity and
    /// thread.
    claims: HashMap<String, HashMap<ThreadId, usize>>,
}

/// Where a session goes: stay on the accepting thread (`to: None`), or run on another
/// worker's arbiter. `claim` is held until the session's first lease.
pub struct Placed {
    pub to: Option<actix::ArbiterHandle>,
    pub claim: Option<Claim>,
}

/// A session's claim on an idle connection of its identity on a thread; given up when
/// dropped (at the session's first lease, or its end).
pub struct Claim {
    placement: Arc<Placement>,
    identity: String,
    thread: ThreadId,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut s = self.placement.lock();
        if let Some(threads) = s.claims.get_mut(&self.identity) {
            if let Some(n) = threads.get_mut(&self.thread) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    threads.remove(&self.thread);
                }
            }
            if threads.is_empty() {
                s.claims.remove(&self.identity);
            }
        }
    }
}

/// The thread a session is placed on, given each worker thread's surplus of idle connections
/// of its identity (idle less claimed): the accepting thread (`here`) when it has one, else the
/// thread with the largest, else none (the session stays where it was accepted and claims
/// nothing). Ties go to the first listed.
pub fn choose(here: ThreadId, surplus: &[(ThreadId, usize)]) -> Option<ThreadId> {
    if surplus.iter().any(|&(t, n)| t == here && n > 0) {
        return Some(here);
    }
    let mut best: Option<(ThreadId, usize)> = None;
    for &(t, n) in surplus {
        if n > 0 && best.is_none_or(|(_, b)| n > b) {
            best = Some((t, n));
        }
    }
    best.map(|(t, _)| t)
}

impl Placement {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The table holds counts only: a panic elsewhere leaves them usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A pool's idle connections now (replacing what it published before).
    pub fn publish(&self, account: &Arc<str>, idle: Idle) {
        let mut s = self.lock();
        if idle.is_empty() {
            s.idle.remove(account);
        } else {
            s.idle.insert(account.clone(), idle);
        }
    }

    /// Places a session of `identity` accepted on the calling thread (a worker, which is
    /// recorded as one).
    pub fn place(self: &Arc<Self>, identity: &str) -> Placed {
        let here = std::thread::current().id();
        let mut s = self.lock();
        s.workers
            .entry(here)
            .or_insert_with(actix::Arbiter::current);
        let claimed = s.claims.get(identity);
        let mut surplus: Vec<(ThreadId, usize)> = Vec::new();
        for threads in s.idle.values().filter_map(|idle| idle.get(identity)) {
            for (&t, &n) in threads {
                match surplus.iter_mut().find(|(u, _)| *u == t) {
                    Some((_, m)) => *m += n,
                    None => surplus.push((t, n)),
                }
            }
        }
        // Only threads a session can be started on; less what earlier sessions claimed.
        surplus.retain(|(t, _)| s.workers.contains_key(t));
        for (t, n) in &mut surplus {
            *n = n.saturating_sub(claimed.and_then(|c| c.get(t)).copied().unwrap_or(0));
        }
        let Some(thread) = choose(here, &surplus) else {
            return Placed {
                to: None,
                claim: None,
            };
        };
        *s.claims
            .entry(identity.to_string())
            .or_default()
            .entry(thread)
            .or_default() += 1;
        let to = (thread != here)
            .then(|| s.workers.get(&thread).cloned())
            .flatten();
        Placed {
            to,
            claim: Some(Claim {
                placement: self.clone(),
                identity: identity.to_string(),
                thread,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_goes_where_its_identitys_idle_connection_is() {
        let (a, b) = super::super::two_threads();
        assert_eq!(choose(a, &[(a, 1), (b, 3)]), Some(a), "here first");
        assert_eq!(choose(a, &[(a, 0), (b, 3)]), Some(b));
        assert_eq!(choose(a, &[(b, 1)]), Some(b));
        assert_eq!(choose(a, &[(a, 0), (b, 0)]), None, "all claimed");
        assert_eq!(choose(a, &[]), None, "nothing idle: stay, dial here");
    }

    #[test]
    fn claims_count_against_idle_connections_until_dropped() {
        actix_web::rt::System::new().block_on(async { claims() });
    }

    fn claims() {
        let placement = Arc::new(Placement::default());
        let here = std::thread::current().id();
        let account: Arc<str> = Arc::from("acct");
        let idle = |n| Idle::from([("id".to_string(), HashMap::from([(here, n)]))]);
        placement.publish(&account, idle(1));
        let first = placement.place("id");
        assert!(first.to.is_none(), "already here");
        assert!(first.claim.is_some());
        let second = placement.place("id");
        assert!(second.claim.is_none(), "the one idle connection is claimed");
        assert!(placement.place("other").claim.is_none(), "not its identity");
        drop(first);
        assert!(
            placement.place("id").claim.is_some(),
            "given up at the lease"
        );
        placement.publish(&account, Idle::new());
        assert!(placement.place("id").claim.is_none(), "lent meanwhile");
    }
}
