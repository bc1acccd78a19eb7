//! The spool and memory merged when the spool is (re)opened (docs/DESIGN.md#nothing-lost), as a
//! plain structure: the segments found on disk are offered in order; a record not already in
//! memory is loaded while memory has room (`accounting.max_in_memory`) and stays on disk
//! ("spilled", read back in order later) once it has not; what this build cannot bill is set
//! aside for quarantine; a segment with nothing billable is dead. The actor does the IO.

use std::collections::{HashSet, VecDeque};

use crate::record::{RecordError, TurnRecord, decode_record};

/// The idempotency key of a record.
pub type Key = (crate::ids::TurnId, i64);

pub fn key(r: &TurnRecord) -> Key {
    (r.request_id.clone(), r.api_key_id)
}

#[derive(Debug)]
pub struct Merge {
    in_memory: HashSet<Key>,
    on_disk: HashSet<Key>,
    cap: usize,
    held: usize,
    /// Records to load into memory, with their segment.
    pub loaded: Vec<(u64, TurnRecord)>,
    /// Segments left on disk, in order, with how many records of theirs wait there.
    pub spilled: VecDeque<(u64, usize)>,
    /// Records this build cannot bill: (segment, `unknown` | `invalid`, bytes).
    pub unreadable: Vec<(u64, &'static str, Vec<u8>)>,
    /// Every record found that memory did not hold (loaded or spilled): spend not yet billed.
    pub fresh: Vec<TurnRecord>,
    /// Segments holding nothing billable.
    pub dead: Vec<u64>,
}

impl Merge {
    /// `in_memory`: the keys of the records memory holds, `cap` how many it may hold.
    pub fn new(in_memory: HashSet<Key>, cap: usize) -> Self {
        Self {
            held: in_memory.len(),
            in_memory,
            on_disk: HashSet::new(),
            cap,
            loaded: Vec::new(),
            spilled: VecDeque::new(),
            unreadable: Vec::new(),
            fresh: Vec::new(),
            dead: Vec::new(),
        }
    }

    /// The records of segment `seg`, as read.
    pub fn segment(&mut self, seg: u64, records: Vec<Vec<u8>>) {
        let mut fresh = Vec::new();
        let mut billable = 0;
        for bytes in records {
            match decode_record(&bytes) {
                Ok(r) => {
                    billable += 1;
                    let k = key(&r);
                    if !self.in_memory.contains(&k) && self.on_disk.insert(k) {
                        fresh.push(r);
                    }
                }
                Err(RecordError::UnknownVersion(_)) => {
                    self.unreadable.push((seg, "unknown", bytes))
                }
                Err(RecordError::Invalid(_)) => self.unreadable.push((seg, "invalid", bytes)),
            }
        }
        if billable == 0 {
            self.dead.push(seg);
        }
        if fresh.is_empty() {
            return;
        }
        self.fresh.extend(fresh.iter().cloned());
        // Once one segment stays on disk, the later ones do too: they are read back in order.
        if self.spilled.is_empty() && self.held + fresh.len() <= self.cap {
            self.held += fresh.len();
            self.loaded.extend(fresh.into_iter().map(|r| (seg, r)));
        } else {
            self.spilled.push_back((seg, fresh.len()));
        }
    }
}

/// Records believed to be on disk only (`spilled`) whose segment was not found again: lost
/// with a removed directory.
pub fn lost(spilled: &VecDeque<(u64, usize)>, found: &HashSet<u64>) -> usize {
    spilled
        .iter()
        .filter(|(s, _)| !found.contains(s))
        .map(|(_, n)| n)
        .sum()
}

/// A record in memory must be written to the spool again when no segment holds it: it never
/// was acknowledged by one (`None`), or its segment is gone.
pub fn needs_rewrite(seg: Option<u64>, found: &HashSet<u64>) -> bool {
    seg.is_none_or(|s| !found.contains(&s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{encode_record, sample};

    fn rec(id: &str) -> TurnRecord {
        let mut r = sample();
        r.request_id = id.into();
        r
    }

    fn bytes(ids: &[&str]) -> Vec<Vec<u8>> {
        ids.iter().map(|id| encode_record(&rec(id))).collect()
    }

    fn ids(loaded: &[(u64, TurnRecord)]) -> Vec<(u64, String)> {
        loaded
            .iter()
            .map(|(s, r)| (*s, r.request_id.to_string()))
            .collect()
    }

    #[test]
    fn disk_records_load_while_memory_has_room_then_stay_on_disk_in_order() {
        let memory: HashSet<Key> = [key(&rec("m1"))].into();
        let mut m = Merge::new(memory, 3);
        m.segment(1, bytes(&["m1", "a", "b"]));
        m.segment(2, bytes(&["b", "c"]));
        m.segment(3, bytes(&["d"]));
        assert_eq!(
            ids(&m.loaded),
            [(1, "a".to_string()), (1, "b".to_string())],
            "what memory holds is not loaded again; a record in two segments once"
        );
        assert_eq!(
            m.spilled,
            [(2, 1), (3, 1)],
            "c does not fit; d would, but comes after c"
        );
        let fresh: Vec<&str> = m.fresh.iter().map(|r| r.request_id.as_str()).collect();
        assert_eq!(fresh, ["a", "b", "c", "d"]);
        assert!(m.dead.is_empty() && m.unreadable.is_empty());
    }

    #[test]
    fn what_cannot_be_billed_is_set_aside_and_its_segment_is_dead() {
        let mut m = Merge::new(HashSet::new(), 10);
        let future = br#"{"v":99,"request_id":"x"}"#.to_vec();
        m.segment(4, vec![b"not json".to_vec(), future]);
        m.segment(5, bytes(&["ok"]));
        let kinds: Vec<(u64, &str)> = m.unreadable.iter().map(|(s, k, _)| (*s, *k)).collect();
        assert_eq!(kinds, [(4, "invalid"), (4, "unknown")]);
        assert_eq!(m.dead, [4]);
        assert_eq!(ids(&m.loaded), [(5, "ok".to_string())]);
    }

    #[test]
    fn a_removed_directory_loses_the_spilled_and_rewrites_what_memory_holds() {
        let found: HashSet<u64> = [7].into();
        let spilled: VecDeque<(u64, usize)> = [(7, 2), (8, 3)].into();
        assert_eq!(lost(&spilled, &found), 3);
        assert!(!needs_rewrite(Some(7), &found));
        assert!(needs_rewrite(Some(8), &found), "its segment is gone");
        assert!(
            needs_rewrite(None, &found),
            "never acknowledged by a segment"
        );
    }
}
