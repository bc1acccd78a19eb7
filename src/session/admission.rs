//! Slots: open sessions per key, turns in flight per key and per account. A slot is held by a
//! guard and released when the guard drops, so no exit path can leak one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct Counts {
    sessions: HashMap<i64, u32>,
    key_turns: HashMap<i64, u32>,
    account_turns: HashMap<String, u32>,
}

/// Shared by every worker; touched once per connect and once per turn, never per event.
#[derive(Debug, Default)]
pub struct Slots {
    counts: Mutex<Counts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Session,
    KeyTurn,
}

/// Holds one slot; dropping it releases the slot.
#[derive(Debug)]
pub struct SlotGuard {
    slots: Arc<Slots>,
    key: i64,
    kind: Kind,
}

/// A key's slot (an open session, or a turn in flight): the relay's own count, and the
/// fleet's when relays share PostgreSQL (docs/DESIGN.md#fleet-slots). Dropping it releases
/// both.
#[derive(Debug)]
pub struct KeySlot {
    _local: SlotGuard,
    _fleet: Option<super::fleet::FleetSlot>,
}

impl KeySlot {
    pub fn new(local: SlotGuard, fleet: Option<super::fleet::FleetSlot>) -> Self {
        Self {
            _local: local,
            _fleet: fleet,
        }
    }

    /// Gives `slot` back (if held); resolves once the fleet's count has it too, so a client
    /// told its turn ended is never refused its next one for the slot of the turn it just
    /// finished.
    pub fn release(slot: Option<Self>) -> impl Future<Output = ()> + 'static {
        let fleet = slot.and_then(|s| s._fleet);
        async move {
            if let Some(fleet) = fleet {
                fleet.release().await;
            }
        }
    }
}

/// Holds an account turn slot.
#[derive(Debug)]
pub struct AccountSlot {
    slots: Arc<Slots>,
    pub account: String,
}

fn take(map: &mut HashMap<i64, u32>, key: i64, limit: Option<i32>) -> bool {
    let n = map.entry(key).or_insert(0);
    if limit.is_some_and(|l| i64::from(*n) >= i64::from(l)) {
        return false;
    }
    *n += 1;
    true
}

fn give(map: &mut HashMap<i64, u32>, key: i64) {
    if let Some(n) = map.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Slots {
    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An open-session slot of a key (`max_sessions`).
    pub fn session(self: &Arc<Self>, key: i64, limit: Option<i32>) -> Option<SlotGuard> {
        take(&mut self.counts().sessions, key, limit).then(|| SlotGuard {
            slots: self.clone(),
            key,
            kind: Kind::Session,
        })
    }

    /// A turn slot of a key (`max_concurrent_turns`).
    pub fn key_turn(self: &Arc<Self>, key: i64, limit: Option<i32>) -> Option<SlotGuard> {
        take(&mut self.counts().key_turns, key, limit).then(|| SlotGuard {
            slots: self.clone(),
            key,
            kind: Kind::KeyTurn,
        })
    }

    /// A turn slot on the first account of `candidates` (name, limit) with room.
    pub fn account_turn(self: &Arc<Self>, candidates: &[(String, usize)]) -> Option<AccountSlot> {
        let mut c = self.counts();
        for (name, limit) in candidates {
            let n = c.account_turns.entry(name.clone()).or_insert(0);
            if crate::num::len(u64::from(*n)) < *limit {
                *n += 1;
                return Some(AccountSlot {
                    slots: self.clone(),
                    account: name.clone(),
                });
            }
        }
        None
    }

    /// (open sessions, turns in flight) of a key.
    pub fn of_key(&self, key: i64) -> (u32, u32) {
        let c = self.counts();
        (
            c.sessions.get(&key).copied().unwrap_or(0),
            c.key_turns.get(&key).copied().unwrap_or(0),
        )
    }

    pub fn of_account(&self, account: &str) -> u32 {
        self.counts()
            .account_turns
            .get(account)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        match self.kind {
            Kind::Session => give(&mut c.sessions, self.key),
            Kind::KeyTurn => give(&mut c.key_turns, self.key),
        }
    }
}

impl Drop for AccountSlot {
    fn drop(&mut self) {
        let mut c = self.slots.counts();
        if let Some(n) = c.account_turns.get_mut(&self.account) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Bytes of HTTP request bodies being received, per key (docs/DESIGN.md#http-surface): a key
/// that uploads slowly, or stalls, holds at most `limit` bytes of the relay's memory at once.
#[derive(Debug)]
pub struct BodyBytes {
    limit: usize,
    held: Mutex<HashMap<i64, usize>>,
}

/// Bytes a body being received holds; dropping it gives them back.
#[derive(Debug)]
pub struct BodyHold {
    bytes: Arc<BodyBytes>,
    key: i64,
    held: usize,
}

impl BodyBytes {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            held: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i64, usize>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A hold of `bytes` for `key`'s body, if its bodies in flight stay within the limit.
    pub fn take(self: &Arc<Self>, key: i64, bytes: usize) -> Option<BodyHold> {
        let mut hold = BodyHold {
            bytes: self.clone(),
            key,
            held: 0,
        };
        hold.grow(bytes).then_some(hold)
    }
}

impl BodyHold {
    /// Holds `more` bytes too; `false` (nothing more held) when the key's limit would pass.
    pub fn grow(&mut self, more: usize) -> bool {
        let mut held = self.bytes.lock();
        let now = held.entry(self.key).or_default();
        match now.checked_add(more) {
            Some(total) if total <= self.bytes.limit => {
                *now = total;
                self.held += more;
                true
            }
            _ => false,
        }
    }

    /// Holds at least `bytes` in all (a declared length not yet received).
    pub fn reserve(&mut self, bytes: usize) -> bool {
        bytes <= self.held || self.grow(bytes - self.held)
    }
}

impl Drop for BodyHold {
    fn drop(&mut self) {
        let mut held = self.bytes.lock();
        if let Some(now) = held.get_mut(&self.key) {
            *now = now.saturating_sub(self.held);
            if *now == 0 {
                held.remove(&self.key);
            }
        }
    }
}

/// What admission read recently, by key (docs/DESIGN.md#admission-cache): an entry read within
/// the last `ttl` serves turns instead of a database read. `ttl` zero: nothing is kept.
#[derive(Debug)]
pub struct Recent<K, V> {
    ttl: std::time::Duration,
    read: Mutex<HashMap<K, (std::time::Instant, V)>>,
}

/// A key and its user, as read.
pub type Standing = (crate::db::models::ApiKey, crate::db::models::User);

/// Standings read recently, by key id.
pub type Standings = Recent<i64, Standing>;

/// Affinities read (or written) recently, by key id and affinity key: the account and when it
/// was written, or none.
pub type Affinities = Recent<(i64, String), Option<(String, chrono::NaiveDateTime)>>;

/// Entries kept at most (beyond it, those older than the TTL go first).
const RECENT_KEPT: usize = 100_000;

impl<K: std::hash::Hash + Eq, V: Clone> Recent<K, V> {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            read: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (std::time::Instant, V)>> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `key`'s value if it was read within the TTL.
    pub fn fresh(&self, key: &K, now: std::time::Instant) -> Option<V> {
        if self.ttl.is_zero() {
            return None;
        }
        let read = self.lock();
        let (at, value) = read.get(key)?;
        (now.duration_since(*at) < self.ttl).then(|| value.clone())
    }

    /// `key`'s value was just read (or written).
    pub fn store(&self, key: K, value: V, now: std::time::Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut read = self.lock();
        if read.len() >= RECENT_KEPT {
            let ttl = self.ttl;
            read.retain(|_, (at, _)| now.duration_since(*at) < ttl);
        }
        read.insert(key, (now, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_and_released_on_drop() {
        let s = Arc::new(Slots::default());
        let a = s.key_turn(1, Some(2)).unwrap();
        let b = s.key_turn(1, Some(2)).unwrap();
        assert!(s.key_turn(1, Some(2)).is_none());
        assert!(
            s.key_turn(2, Some(2)).is_some(),
            "other keys are independent"
        );
        drop(a);
        assert_eq!(s.of_key(1).1, 1);
        let _c = s.key_turn(1, Some(2)).unwrap();
        drop(b);
        assert!(s.session(1, None).is_some(), "no limit");
        let x = s.account_turn(&[("a".into(), 1), ("b".into(), 1)]).unwrap();
        let y = s.account_turn(&[("a".into(), 1), ("b".into(), 1)]).unwrap();
        assert_eq!((x.account.as_str(), y.account.as_str()), ("a", "b"));
        assert!(
            s.account_turn(&[("a".into(), 1), ("b".into(), 1)])
                .is_none()
        );
        drop(x);
        assert_eq!(s.of_account("a"), 0);
    }

    #[test]
    fn body_bytes_are_bounded_per_key_and_given_back() {
        let b = Arc::new(BodyBytes::new(100));
        let mut one = b.take(1, 60).unwrap();
        assert!(b.take(1, 50).is_none(), "60 + 50 > 100");
        let other_key = b.take(2, 100).unwrap();
        assert!(one.grow(40));
        assert!(!one.grow(1));
        assert!(one.reserve(90), "already held");
        drop(one);
        assert!(b.take(1, 100).is_some(), "given back on drop");
        drop(other_key);
        assert!(b.lock().is_empty());
    }

    #[test]
    fn recent_reads_are_kept_for_their_ttl_only() {
        let t0 = std::time::Instant::now();
        let ms = std::time::Duration::from_millis;
        let standing = crate::db::models::sample_standing();
        let s = Standings::new(ms(100));
        assert!(s.fresh(&1, t0).is_none());
        s.store(1, standing.clone(), t0);
        assert!(s.fresh(&1, t0 + ms(99)).is_some());
        assert!(s.fresh(&1, t0 + ms(100)).is_none());
        let never = Standings::new(std::time::Duration::ZERO);
        never.store(1, standing, t0);
        assert!(never.fresh(&1, t0).is_none());
        // An affinity known to have no account is kept too (not read again within the TTL).
        let a = Affinities::new(ms(100));
        a.store((1, "k".into()), None, t0);
        assert_eq!(a.fresh(&(1, "k".into()), t0), Some(None));
        assert_eq!(a.fresh(&(1, "other".into()), t0), None);
    }
}
