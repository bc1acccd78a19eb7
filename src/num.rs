//! Conversions between the number types the relay meets, saturating where a value could not
//! fit instead of wrapping silently. The crate denies `as` casts elsewhere
//! (docs/DESIGN.md#layers); the few here are exact or documented.

use std::time::Duration;

/// Whole milliseconds of `d` (saturating).
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole milliseconds of `d` as a signed count (saturating).
pub fn millis_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Milliseconds of `d`, rounded up (saturating).
pub fn millis_ceil_i64(d: Duration) -> i64 {
    i64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i64::MAX)
}

/// A length or count as a `u64` (exact on every platform Rust supports; saturating in theory).
pub fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A `u64` as a length (saturating on 32-bit targets).
pub fn len(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A count as a metric value: exact below 2^53, rounded beyond (harmless for a gauge).
#[allow(clippy::as_conversions)]
pub fn f64_of(n: u64) -> f64 {
    n as f64
}

/// A signed amount as a metric value: exact below 2^53 in magnitude, rounded beyond.
#[allow(clippy::as_conversions)]
pub fn f64_of_i64(n: i64) -> f64 {
    n as f64
}

/// A uniform float in (0, 1) from 52 random bits (the rest of `bits` is masked off; with 52,
/// `x + 0.5` is exact, so neither end is ever reached).
pub fn unit_interval(bits: u64) -> f64 {
    const SCALE: u64 = 1 << 52;
    (f64_of(bits & (SCALE - 1)) + 0.5) / f64_of(SCALE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saturating_and_exact() {
        assert_eq!(millis(Duration::from_micros(1999)), 1);
        assert_eq!(millis_ceil_i64(Duration::from_micros(1001)), 2);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(f64_of(1 << 40), 1_099_511_627_776.0);
        let (lo, hi) = (unit_interval(0), unit_interval(u64::MAX));
        assert!(lo > 0.0 && hi < 1.0, "{lo} {hi}");
    }
}
