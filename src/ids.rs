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

/// An id type: a string with its own name, so a session id is never passed where a turn id
/// belongs. Serialized as the bare string (the spool and the tables keep their format).
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal, $bytes:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// A new random id (`{prefix}_` and hex).
            pub fn random() -> Self {
                Self(format!(concat!($prefix, "_{}"), random_hex($bytes)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}

id_type!(
    /// A turn's id: its record's `request_id` (idempotency key with the API key).
    TurnId,
    "turn",
    12
);
id_type!(
    /// A reservation block's id: its `turn_reservations` row's `request_id`
    /// (docs/DESIGN.md#reservation-blocks).
    BlockId,
    "blk",
    12
);
id_type!(
    /// A client session's id (one WebSocket, or one HTTP request).
    SessionId,
    "sess",
    8
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_their_length_and_differ() {
        let (a, b) = (random_hex(12), random_hex(12));
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(monotonic_ns() <= monotonic_ns());
        let t = TurnId::random();
        assert!(t.starts_with("turn_") && t.len() == 5 + 24, "{t}");
        assert_eq!(serde_json::to_string(&t).ok(), Some(format!("\"{t}\"")));
        assert_ne!(SessionId::random(), SessionId::random());
    }
}
