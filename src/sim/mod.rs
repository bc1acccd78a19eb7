//! The simulated upstream: a real Responses API WebSocket server (`turnpike sim`) with
//! scriptable faults, for tests, the demo and benchmarks. Also embeddable in-process.
//!
//! - `script`: the directive grammar (pure).
//! - `events`: event builders, request checks and the plan of a turn (pure).
//! - `conn`: the connection actor that executes plans.
//! - `http`: the same turns over HTTP (JSON, SSE, compact).
//! - `server`: routes, handshake auth, shared state and the inspection endpoints.

pub mod conn;
pub mod events;
pub mod http;
pub mod script;
pub mod server;

pub use server::{SimConfig, SimHandle, start, start_on};

pub use crate::ids::monotonic_ns;
