//! Spend that is durable in the spool but not yet in the database, per key and per user, so
//! that admission counts it: a key cannot overrun its quota while its debits wait in the spool.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::record::TurnRecord;

#[derive(Debug, Default)]
pub struct PendingSpend {
    inner: Mutex<(HashMap<i64, i64>, HashMap<i64, i64>)>,
}

impl PendingSpend {
    fn apply(&self, r: &TurnRecord, sign: i64) {
        if r.cost_nanousd == 0 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (by_key, by_user) = &mut *g;
        for (map, id) in [(by_key, r.api_key_id), (by_user, r.user_id)] {
            let v = map.entry(id).or_insert(0);
            *v = v.saturating_add(sign * r.cost_nanousd);
            if *v <= 0 {
                map.remove(&id);
            }
        }
    }

    pub fn add(&self, r: &TurnRecord) {
        self.apply(r, 1);
    }

    pub fn remove(&self, r: &TurnRecord) {
        self.apply(r, -1);
    }

    pub fn clear(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.clear();
        g.1.clear();
    }

    /// (pending spend of the key, pending spend of the user) in nano-USD.
    pub fn of(&self, key_id: i64, user_id: i64) -> (i64, i64) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (
            g.0.get(&key_id).copied().unwrap_or(0),
            g.1.get(&user_id).copied().unwrap_or(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_and_removes_per_key_and_user() {
        let p = PendingSpend::default();
        let mut r = crate::record::sample();
        p.add(&r);
        r.api_key_id = 2;
        p.add(&r);
        assert_eq!(p.of(1, 7), (40, 80));
        p.remove(&r);
        assert_eq!(p.of(2, 7), (0, 40));
    }
}
