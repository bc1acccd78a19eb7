//! The pool's dispatch as a plain function (docs/DESIGN.md#leases): given what the pool holds
//! and who waits, which waiter gets which idle connection, who is dialled for, what is closed to
//! make room, which waiters are sent elsewhere (the account is cooling) and which connections
//! parked between turns are asked back. The actor takes a view, asks, and carries the plan out.
//! One pass over the connections and one over the waiters: with a thousand sessions each of
//! its own identity a dispatch must not cost waiters × connections.

use std::collections::{HashMap, HashSet};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use super::policy::{self, IdleConn, Reach};

/// A waiter as the dispatch sees it.
#[derive(Debug, Clone, Copy)]
pub struct Waiting<'a> {
    pub identity: &'a str,
    pub preferred: Option<u64>,
    /// The thread its session runs on.
    pub thread: Option<ThreadId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Dialing,
    Idle {
        since: Instant,
    },
    Leased {
        /// Held between turns since then (`None`: a turn runs on it).
        parked_since: Option<Instant>,
        /// A reclaim is on its way.
        reclaiming: bool,
        /// Its session can be asked to give it back.
        reclaimable: bool,
        /// Its session is gone (its mailbox closed): nobody will give it back.
        orphan: bool,
    },
}

/// A connection as the dispatch sees it.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    pub id: u64,
    pub identity: &'a str,
    pub opened_at: Instant,
    pub held: Held,
    /// The thread its actor runs on.
    pub thread: ThreadId,
}

impl<'a> Conn<'a> {
    /// The connection as `policy` sees it, if it is idle.
    pub fn idle(&self) -> Option<IdleConn<'a>> {
        match self.held {
            Held::Idle { since } => Some(IdleConn {
                id: self.id,
                identity: self.identity,
                opened_at: self.opened_at,
                idle_since: since,
                thread: self.thread,
            }),
            _ => None,
        }
    }
}

/// What to do, by waiter index (into the waiters given) and connection id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Lend connection to waiter.
    pub lend: Vec<(usize, u64)>,
    /// Answer `Cooling`: the account dials nobody now; their turns go elsewhere.
    pub cooling: Vec<usize>,
    /// Close these idle connections (room for a dial of another identity).
    pub close: Vec<u64>,
    /// Dial one connection for each of these waiters (of its identity).
    pub dial: Vec<usize>,
    /// Dial a spare on the thread of each of these waiters (of its identity), which were lent
    /// a connection of another thread: the thread's next sessions get one of their own.
    pub spare: Vec<usize>,
    /// Ask the sessions holding these connections between turns to give them back.
    pub reclaim: Vec<u64>,
}

/// The limits a dispatch works within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_conns: usize,
    pub max_age: Duration,
    pub cooling: bool,
    pub now: Instant,
}

pub fn plan(waiters: &[Waiting<'_>], conns: &[Conn<'_>], limits: Limits) -> Plan {
    let mut plan = Plan::default();
    let idle: Vec<IdleConn<'_>> = conns.iter().filter_map(Conn::idle).collect();
    // A waiter looks only at the idle connections of its identity: with a thousand sessions
    // of a thousand identities, one list for all made a dispatch cost waiters × connections.
    // Only the waiters' identities are listed (one list each, allocated when it gets one).
    let mut by_identity: HashMap<&str, Vec<IdleConn<'_>>> =
        waiters.iter().map(|w| (w.identity, Vec::new())).collect();
    for c in &idle {
        if let Some(same) = by_identity.get_mut(c.identity) {
            same.push(c.clone());
        }
    }
    // Waiters in order take the fit idle connections: first each its preferred one or one on
    // its own thread, then the rest any fit one — a connection goes to a waiter of another
    // thread only when no waiter of its own thread takes it (docs/DESIGN.md#leases).
    let mut lent = vec![false; waiters.len()];
    // (waiter, the connection it was lent, that connection's thread)
    let mut lends: Vec<(usize, u64, ThreadId)> = Vec::new();
    let mut left = idle.len();
    for reach in [Reach::Home, Reach::Anywhere] {
        for (i, w) in waiters.iter().enumerate() {
            if left == 0 {
                break;
            }
            if lent[i] {
                continue;
            }
            let Some(same) = by_identity.get_mut(w.identity).filter(|s| !s.is_empty()) else {
                continue;
            };
            let picked = policy::pick(
                same,
                w.identity,
                w.preferred,
                w.thread,
                reach,
                limits.max_age,
                limits.now,
            );
            if let Some(at) = picked.and_then(|conn| same.iter().position(|c| c.id == conn)) {
                // `remove`, not `swap_remove`: among equals the order decides (`pick`).
                let conn = same.remove(at);
                lends.push((i, conn.id, conn.thread));
                lent[i] = true;
                left -= 1;
            }
        }
    }
    lends.sort_unstable_by_key(|&(i, _, _)| i);
    plan.lend = lends.iter().map(|&(i, conn, _)| (i, conn)).collect();
    let mut lent_ids: Vec<u64> = plan.lend.iter().map(|&(_, conn)| conn).collect();
    lent_ids.sort_unstable();
    let mut idle: Vec<IdleConn<'_>> = idle
        .into_iter()
        .filter(|c| lent_ids.binary_search(&c.id).is_err())
        .collect();
    // A dial serves only waiters of its own identity: one for each waiter that no dial of its
    // identity in progress covers.
    let mut covering = dialing_by_identity(conns);
    let uncovered: Vec<usize> = (0..waiters.len())
        .filter(|i| !lent[*i])
        .filter(|i| match covering.get_mut(waiters[*i].identity) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .collect();
    plan.spare = spares(waiters, conns, &lends, &idle, uncovered.len(), limits);
    if uncovered.is_empty() {
        return plan;
    }
    if limits.cooling {
        plan.cooling = uncovered;
        return plan;
    }
    // Within capacity; room is made by closing idle connections of another identity, the
    // longest idle first.
    idle.sort_by_key(|c| c.idle_since);
    let mut open = conns.len() + plan.spare.len();
    let mut left = uncovered.len();
    for k in uncovered {
        if open >= limits.max_conns {
            let wanted = waiters[k].identity;
            let Some(at) = idle.iter().position(|c| c.identity != wanted) else {
                break;
            };
            plan.close.push(idle.remove(at).id);
            open -= 1;
        }
        plan.dial.push(k);
        open += 1;
        left -= 1;
    }
    if left > 0 && open >= limits.max_conns {
        plan.reclaim = reclaim(conns, left);
    }
    plan
}

/// Dials in progress per identity.
pub fn dialing_by_identity<'a>(conns: &[Conn<'a>]) -> HashMap<&'a str, usize> {
    let mut dialing: HashMap<&str, usize> = HashMap::new();
    for c in conns.iter().filter(|c| c.held == Held::Dialing) {
        *dialing.entry(c.identity).or_default() += 1;
    }
    dialing
}

/// docs/DESIGN.md#leases (threads): a waiter lent a connection of another thread — each of
/// its events will wake that thread too — gets a spare dialled on its own thread when that
/// thread has no idle or dialling connection of its identity left; never while cooling, and
/// only in room that no waiter needs (`needed`: waiters a dial must serve).
fn spares(
    waiters: &[Waiting<'_>],
    conns: &[Conn<'_>],
    lends: &[(usize, u64, ThreadId)],
    idle_left: &[IdleConn<'_>],
    needed: usize,
    limits: Limits,
) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut room = limits.max_conns.saturating_sub(conns.len() + needed);
    if limits.cooling || room == 0 {
        return out;
    }
    // The (identity, thread) pairs that already have a connection to lend soon: one pass over
    // the connections, made only when a lease crossed threads (placement makes that rare).
    let mut covered: Option<HashSet<(&str, ThreadId)>> = None;
    for &(k, _, there) in lends {
        let Some(w) = waiters.get(k) else { continue };
        let Some(home) = w.thread else { continue };
        if home == there || room == 0 {
            continue;
        }
        let covered = covered.get_or_insert_with(|| {
            idle_left
                .iter()
                .map(|c| (c.identity, c.thread))
                .chain(
                    conns
                        .iter()
                        .filter(|c| c.held == Held::Dialing)
                        .map(|c| (c.identity, c.thread)),
                )
                .collect()
        });
        if covered.insert((w.identity, home)) {
            out.push(k);
            room -= 1;
        }
    }
    out
}

/// docs/DESIGN.md#leases: leases whose session is gone, whatever path it left by, are taken
/// back — (id, clean): held between turns, it is clean and goes idle; with a turn on it, its
/// state is unknown and it is closed.
pub fn orphans(conns: &[Conn<'_>]) -> Vec<(u64, bool)> {
    conns
        .iter()
        .filter_map(|c| match c.held {
            Held::Leased {
                orphan: true,
                parked_since,
                ..
            } => Some((c.id, parked_since.is_some())),
            _ => None,
        })
        .collect()
}

/// docs/DESIGN.md#idle-reclaim: `needed` turns wait at `max_conns` — the connections to ask
/// back, parked longest first, less those already being asked.
fn reclaim(conns: &[Conn<'_>], needed: usize) -> Vec<u64> {
    let asked = conns
        .iter()
        .filter(|c| {
            matches!(
                c.held,
                Held::Leased {
                    reclaiming: true,
                    ..
                }
            )
        })
        .count();
    let mut parked: Vec<(Instant, u64)> = conns
        .iter()
        .filter_map(|c| match c.held {
            Held::Leased {
                parked_since: Some(t),
                reclaiming: false,
                reclaimable: true,
                orphan: false,
            } => Some((t, c.id)),
            _ => None,
        })
        .collect();
    parked.sort_unstable();
    parked
        .into_iter()
        .take(needed.saturating_sub(asked))
        .map(|(_, id)| id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_conns: usize, cooling: bool, now: Instant) -> Limits {
        Limits {
            max_conns,
            max_age: Duration::from_secs(3600),
            cooling,
            now,
        }
    }

    fn conn(id: u64, identity: &str, held: Held, t0: Instant) -> Conn<'_> {
        Conn {
            id,
            identity,
            opened_at: t0,
            held,
            thread: std::thread::current().id(),
        }
    }

    fn waiter(identity: &str) -> Waiting<'_> {
        Waiting {
            identity,
            preferred: None,
            thread: None,
        }
    }

    #[test]
    fn idle_connections_go_to_waiters_of_their_identity_in_order() {
        let t0 = Instant::now();
        let idle = |s| Held::Idle {
            since: t0 + Duration::from_millis(s),
        };
        let conns = [conn(1, "a", idle(1), t0), conn(2, "b", idle(2), t0)];
        let waiters = [waiter("b"), waiter("a"), waiter("a")];
        let p = plan(&waiters, &conns, limits(4, false, t0));
        assert_eq!(p.lend, [(0, 2), (1, 1)]);
        assert_eq!(p.dial, [2], "the second `a` waiter gets a dial");
        assert!(p.close.is_empty() && p.reclaim.is_empty());
    }

    #[test]
    fn a_waiter_lent_a_connection_of_another_thread_gets_a_spare_dialled_on_its_own() {
        let t0 = Instant::now();
        let (a, b) = super::super::two_threads();
        let on = |id, held, t| Conn {
            thread: t,
            ..conn(id, "x", held, t0)
        };
        let from = |t| Waiting {
            thread: Some(t),
            ..waiter("x")
        };
        let idle = Held::Idle { since: t0 };
        // Thread b's session borrows a's only connection (now, no dial to wait for), and a
        // spare is dialled on b for b's next sessions.
        let p = plan(&[from(b)], &[on(1, idle, a)], limits(4, false, t0));
        assert_eq!(
            (p.lend.as_slice(), p.spare.as_slice()),
            (&[(0, 1)][..], &[0][..])
        );
        assert!(p.dial.is_empty());
        // Its own thread's connection comes first: no spare.
        let p = plan(
            &[from(b)],
            &[on(1, idle, a), on(2, idle, b)],
            limits(4, false, t0),
        );
        assert_eq!((p.lend.as_slice(), p.spare.len()), (&[(0, 2)][..], 0));
        // A spare already dialling on b, two b waiters in one dispatch, no room, cooling: none.
        let p = plan(
            &[from(b)],
            &[on(1, idle, a), on(2, Held::Dialing, b)],
            limits(4, false, t0),
        );
        assert!(p.spare.is_empty());
        let p = plan(
            &[from(b), from(b)],
            &[on(1, idle, a), on(2, idle, a)],
            limits(4, false, t0),
        );
        assert_eq!(p.spare, [0], "one spare per thread");
        let p = plan(&[from(b)], &[on(1, idle, a)], limits(1, false, t0));
        assert!(p.spare.is_empty(), "at capacity");
        let p = plan(&[from(b), from(b)], &[on(1, idle, a)], limits(2, false, t0));
        assert_eq!(
            (p.spare.len(), p.dial.as_slice()),
            (0, &[1][..]),
            "room goes to waiters"
        );
        // A connection of a goes to a's waiter behind b's, whom b's dial in progress covers:
        // nobody crosses threads, no spare, no dial.
        let p = plan(
            &[from(b), from(a)],
            &[on(1, idle, a), on(2, Held::Dialing, b)],
            limits(4, false, t0),
        );
        assert_eq!(
            (p.lend.as_slice(), p.spare.len(), p.dial.len()),
            (&[(1, 1)][..], 0, 0)
        );
        // Two threads' connections for two threads' waiters in the other order: each at home.
        let p = plan(
            &[from(b), from(a)],
            &[on(1, idle, a), on(2, idle, b)],
            limits(4, false, t0),
        );
        assert_eq!(p.lend, [(0, 2), (1, 1)]);
        // A thousand borrows from one thread in one dispatch: one spare.
        let many: Vec<Conn<'_>> = (0..1000).map(|i| on(i, idle, a)).collect();
        let p = plan(&vec![from(b); 1000], &many, limits(4000, false, t0));
        assert_eq!((p.lend.len(), p.spare.len()), (1000, 1));
    }

    #[test]
    fn a_dial_in_progress_covers_one_waiter_of_its_identity() {
        let t0 = Instant::now();
        let conns = [conn(1, "a", Held::Dialing, t0)];
        let waiters = [waiter("a"), waiter("a"), waiter("b")];
        let p = plan(&waiters, &conns, limits(4, false, t0));
        assert_eq!(p.dial, [1, 2]);
        // A thousand waiters of a thousand identities: one dial each, none twice.
        let ids: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        let many: Vec<Waiting<'_>> = ids.iter().map(|i| waiter(i)).collect();
        let p = plan(&many, &[], limits(2000, false, t0));
        assert_eq!(p.dial.len(), 1000);
    }

    #[test]
    fn at_capacity_room_is_made_then_parked_connections_are_asked_back() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let parked = |s, reclaiming| Held::Leased {
            parked_since: Some(t0 + ms(s)),
            reclaiming,
            reclaimable: true,
            orphan: false,
        };
        let conns = [
            conn(1, "old", Held::Idle { since: t0 }, t0),
            conn(2, "x", parked(5, false), t0),
            conn(3, "y", parked(1, false), t0),
            conn(
                4,
                "z",
                Held::Leased {
                    parked_since: None,
                    reclaiming: false,
                    reclaimable: true,
                    orphan: false,
                },
                t0,
            ),
        ];
        let waiters = [waiter("new1"), waiter("new2")];
        let p = plan(&waiters, &conns, limits(4, false, t0));
        assert_eq!(p.close, [1], "an idle connection of another identity");
        assert_eq!(p.dial, [0]);
        assert_eq!(
            p.reclaim,
            [3],
            "the one parked longest, for the waiter left"
        );
        // One already being asked back counts.
        let mut asked = conns;
        asked[2].held = parked(1, true);
        let p = plan(&waiters, &asked, limits(4, false, t0));
        assert!(p.reclaim.is_empty(), "{p:?}");
    }

    /// The churn leak's sequence (tests/churn.rs end to end): with `max_conns = 1` a client
    /// vanishes while its lease is being granted, and another while a turn runs on its
    /// connection. Those leases come back (clean to idle, a turn's closed), and the next
    /// session is served instead of waiting for a connection nobody will give back.
    #[test]
    fn leases_of_sessions_that_are_gone_come_back() {
        let t0 = Instant::now();
        let leased = |parked: bool, orphan| Held::Leased {
            parked_since: parked.then_some(t0),
            reclaiming: false,
            reclaimable: true,
            orphan,
        };
        let conns = [
            conn(1, "a", leased(true, true), t0),
            conn(2, "b", leased(false, true), t0),
            conn(3, "c", leased(true, false), t0),
        ];
        assert_eq!(orphans(&conns), [(1, true), (2, false)]);
        // Before they are taken back the account is full and nobody can be served…
        let waiters = [waiter("a")];
        let full = plan(&waiters, &conns, limits(3, false, t0));
        assert!(full.lend.is_empty() && full.dial.is_empty(), "{full:?}");
        assert_eq!(
            full.reclaim,
            [3],
            "a live session's parked connection is asked back; orphans are taken back, not asked"
        );
        // …after, the clean one is idle again and serves its identity at once.
        let back = [
            conn(1, "a", Held::Idle { since: t0 }, t0),
            conn(3, "c", leased(true, false), t0),
        ];
        assert_eq!(plan(&waiters, &back, limits(3, false, t0)).lend, [(0, 1)]);
    }

    #[test]
    fn a_cooling_account_dials_nobody_and_sends_its_waiters_elsewhere() {
        let t0 = Instant::now();
        let conns = [conn(1, "a", Held::Idle { since: t0 }, t0)];
        let waiters = [waiter("a"), waiter("b")];
        let p = plan(&waiters, &conns, limits(4, true, t0));
        assert_eq!(p.lend, [(0, 1)], "what is open still serves");
        assert_eq!(p.cooling, [1]);
        assert!(p.dial.is_empty());
    }

    #[test]
    fn a_burst_of_many_identities_gets_each_its_own_connection_the_preferred_or_latest_used() {
        let t0 = Instant::now();
        let idle = |ms| Held::Idle {
            since: t0 + Duration::from_millis(ms),
        };
        let names: Vec<String> = (0..500).map(|i| format!("session-{i}")).collect();
        // Two idle connections per identity, listed in reverse: 2i used before 2i + 1.
        let conns: Vec<Conn<'_>> = names
            .iter()
            .enumerate()
            .rev()
            .flat_map(|(i, n)| {
                let i = i as u64;
                [conn(2 * i, n, idle(1), t0), conn(2 * i + 1, n, idle(2), t0)]
            })
            .collect();
        let mut waiters: Vec<Waiting<'_>> = names.iter().map(|n| waiter(n)).collect();
        waiters[7].preferred = Some(14);
        waiters.push(waiter("session-9"));
        waiters.push(waiter("nobody"));
        let p = plan(&waiters, &conns, limits(2000, false, t0));
        let mut want: Vec<(usize, u64)> = (0..500).map(|i| (i, 2 * i as u64 + 1)).collect();
        want[7].1 = 14;
        want.push((500, 18));
        assert_eq!(p.lend, want);
        assert_eq!(
            p.dial,
            [501],
            "an identity with no connection is dialled for"
        );
        assert!(p.close.is_empty() && p.spare.is_empty() && p.reclaim.is_empty());
    }
}
