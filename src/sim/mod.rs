//! The simulated upstream: a real Responses API WebSocket server (`turnpike sim`) with
//! scriptable faults, for tests, the demo and benchmarks. Also embeddable in-process.
//!
//! - `script`: the directive grammar (pure).
//! - `events`: event builders, request checks and the plan of a turn (pure).
//! - `conn`: the connection actor that executes plans.
//! - `server`: routes, handshake auth, shared state and the inspection endpoints.

pub mod conn;
pub mod events;
pub mod script;
pub mod server;

pub use server::{SimConfig, SimHandle, start, start_on};

/// CLOCK_MONOTONIC in nanoseconds: comparable across processes on one machine, so a test can
/// subtract the `sim_ts_ns` stamped into an event from its own receive time.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64
}
