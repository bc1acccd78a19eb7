//! Pool decisions as plain functions.

use std::collections::HashSet;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// What the pool knows of an idle connection.
#[derive(Debug, Clone)]
pub struct IdleConn<'a> {
    pub id: u64,
    pub identity: &'a str,
    pub opened_at: Instant,
    pub idle_since: Instant,
    /// The thread its actor runs on.
    pub thread: ThreadId,
}

/// Which idle connections a waiter may be lent in a pass of the dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Its preferred connection, or one on its own thread.
    Home,
    /// Any fit one.
    Anywhere,
}

/// The idle connection to lend: the preferred one if fit, else a fit one on the waiter's
/// `thread` (its events then reach the session without waking another thread,
/// docs/DESIGN.md#leases), else (`Reach::Anywhere`) any fit one; the most recently used among
/// equals. A connection is fit when its identity matches and it is younger than `max_age`.
pub fn pick(
    idle: &[IdleConn<'_>],
    identity: &str,
    preferred: Option<u64>,
    thread: Option<ThreadId>,
    reach: Reach,
    max_age: Duration,
    now: Instant,
) -> Option<u64> {
    let fit =
        |c: &&IdleConn<'_>| c.identity == identity && now.duration_since(c.opened_at) < max_age;
    if let Some(p) = preferred
        && let Some(c) = idle.iter().filter(fit).find(|c| c.id == p)
    {
        return Some(c.id);
    }
    let home = |c: &&IdleConn<'_>| Some(c.thread) == thread;
    idle.iter()
        .filter(fit)
        .filter(|c| reach == Reach::Anywhere || home(c))
        .max_by_key(|c| (home(c), c.idle_since))
        .map(|c| c.id)
}

/// Idle connections to close: too old, idle too long, or beyond `max_idle` (oldest use first).
/// One of an identity in `wanted` (a waiter of it is queued) is closed only when too old: the
/// dispatch on its way lends it — a dial finished during a burst is idle until then, and
/// retiring it meant dialling again (docs/DESIGN.md#leases).
pub fn retire(
    idle: &[IdleConn<'_>],
    wanted: &HashSet<&str>,
    max_age: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    now: Instant,
) -> Vec<u64> {
    let mut keep: Vec<&IdleConn<'_>> = Vec::new();
    let mut out = Vec::new();
    for c in idle {
        if now.duration_since(c.opened_at) >= max_age {
            out.push(c.id);
        } else if wanted.contains(c.identity) {
            continue;
        } else if now.duration_since(c.idle_since) >= idle_timeout {
            out.push(c.id);
        } else {
            keep.push(c);
        }
    }
    keep.sort_by_key(|c| std::cmp::Reverse(c.idle_since));
    out.extend(keep.iter().skip(max_idle).map(|c| c.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(
        id: u64,
        identity: &'static str,
        age_s: u64,
        idle_s: u64,
        now: Instant,
    ) -> IdleConn<'static> {
        IdleConn {
            id,
            identity,
            opened_at: now - Duration::from_secs(age_s),
            idle_since: now - Duration::from_secs(idle_s),
            thread: std::thread::current().id(),
        }
    }

    #[test]
    fn picks_preferred_then_most_recent_fit() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let max = Duration::from_secs(3300);
        let idle = [
            conn(1, "a", 10, 5, now),
            conn(2, "a", 10, 1, now),
            conn(3, "b", 10, 0, now),
            conn(4, "a", 4000, 0, now),
        ];
        assert_eq!(
            pick(&idle, "a", Some(1), None, Reach::Anywhere, max, now),
            Some(1)
        );
        assert_eq!(
            pick(&idle, "a", None, None, Reach::Anywhere, max, now),
            Some(2)
        );
        assert_eq!(
            pick(&idle, "a", Some(3), None, Reach::Anywhere, max, now),
            Some(2),
            "identity must match"
        );
        assert_eq!(
            pick(&idle, "a", Some(4), None, Reach::Anywhere, max, now),
            Some(2),
            "too old"
        );
        assert_eq!(
            pick(&idle, "c", None, None, Reach::Anywhere, max, now),
            None
        );
    }

    #[test]
    fn a_connection_on_the_waiters_thread_goes_first_unless_another_is_preferred() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let max = Duration::from_secs(3300);
        let (here, there) = super::super::two_threads();
        let on = |id, idle_s, t| IdleConn {
            thread: t,
            ..conn(id, "a", 10, idle_s, now)
        };
        let idle = [on(1, 5, here), on(2, 1, there), on(3, 9, here)];
        assert_eq!(
            pick(&idle, "a", None, Some(here), Reach::Anywhere, max, now),
            Some(1)
        );
        assert_eq!(
            pick(&idle, "a", None, Some(there), Reach::Anywhere, max, now),
            Some(2)
        );
        assert_eq!(
            pick(&idle, "a", Some(3), Some(there), Reach::Anywhere, max, now),
            Some(3)
        );
        // No thread asked (or none there): the most recently used.
        assert_eq!(
            pick(&idle, "a", None, None, Reach::Anywhere, max, now),
            Some(2)
        );
        assert_eq!(
            pick(
                &idle[..1],
                "a",
                None,
                Some(there),
                Reach::Anywhere,
                max,
                now
            ),
            Some(1)
        );
        // At home only: nothing of another thread, but the preferred one wherever it is.
        assert_eq!(
            pick(&idle[..1], "a", None, Some(there), Reach::Home, max, now),
            None
        );
        assert_eq!(
            pick(&idle[..1], "a", Some(1), Some(there), Reach::Home, max, now),
            Some(1)
        );
        assert_eq!(pick(&idle, "a", None, None, Reach::Home, max, now), None);
    }

    #[test]
    fn retires_old_stale_and_surplus() {
        let now = Instant::now() + Duration::from_secs(10_000);
        let idle = [
            conn(1, "a", 4000, 0, now),
            conn(2, "a", 10, 400, now),
            conn(3, "a", 10, 1, now),
            conn(4, "a", 10, 2, now),
        ];
        let run = |wanted: &HashSet<&str>| {
            retire(
                &idle,
                wanted,
                Duration::from_secs(3300),
                Duration::from_secs(300),
                1,
                now,
            )
        };
        assert_eq!(run(&HashSet::new()), vec![1, 2, 4]);
        // A waiter of `a` is queued: only the too old one goes; the others are about to be lent.
        let out = run(&HashSet::from(["a"]));
        assert_eq!(out, vec![1]);
    }
}
