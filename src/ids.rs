//! Clocks and unique ids, for every layer (it imports nothing of the crate).

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, so a test can
/// subtract the `sim_ts_ns` stamped into an event from its own receive time.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    // Both are non-negative for CLOCK_MONOTONIC.
    let (s, ns) = (u64::try_from(t.tv_sec), u64::try_from(t.tv_nsec));
    s.unwrap_or(0) * 1_000_000_000 + ns.unwrap_or(0)
}

/// `bytes` random bytes as hex: ids that must not repeat (sessions, turns, slots). Falls back
/// to the monotonic clock if the system has no randomness to give — uniqueness, not secrecy,
/// is what an id needs (keys use `auth`'s own, which fails instead).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if getrandom::fill(&mut b).is_err() {
        let n = monotonic_ns().to_le_bytes();
        b.iter_mut()
            .zip(n.iter().cycle())
            .for_each(|(x, y)| *x = *y);
    }
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_length_and_differ() {
        let (a, b) = (random_hex(12), random_hex(12));
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(monotonic_ns() <= monotonic_ns());
    }
}
