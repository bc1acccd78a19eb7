//! turnpike: a relay server for the OpenAI Responses API WebSocket mode.
//!
//! Module map, highest layer first. A module uses its own layer and those below it, never
//! one above; `scripts/layers.py` checks it in CI (docs/DESIGN.md#layers).
//! - [`cli`]: subcommands → functions.
//! - [`app`]: wiring and order of startup and shutdown.
//! - [`admin`]: the operators' HTTP API (actors, sessions, pools, compensations).
//! - [`http`]: the WebSocket ingress, health, readiness, HTTP JSON errors, refused-handshake
//!   summaries.
//! - [`session`]: the client session actor, its turns, lanes, steering; admission slots.
//! - [`pool`]: one actor per upstream account: leases of upstream connections.
//! - `billing::compensator`: the actor that retries failed debits.
//! - [`accounting`]: the actor that makes usage durable (spool) and writes it (batches).
//! - [`sim`]: the simulated upstream (a real WebSocket server with scriptable faults).
//! - [`upstream`]: one actor per upstream WebSocket connection.
//! - [`continuation`]: `previous_response_id` across lost connections (replay, fail-close), pure.
//! - [`auth`]: API keys: generation, SHA-256 storage, authentication, standing checks.
//! - [`actors`]: the status every long-lived actor reports, and the restart message.
//! - [`db`]: schema, migrations, the backend enum, query functions.
//! - [`telemetry`]: tracing setup and the metrics.
//! - [`config`]: settings, defaults, loading, validation errors.
//! - [`billing`]: money in integer nano-USD: pricing, usage bounds, reservations (pure).
//! - [`record`]: a turn's usage record (`TurnRecord`, `Timing`) and its spool format.
//! - [`protocol`]: wire facts, all pure: error table, client frames, event kinds, usage.
//! - [`ids`]: the monotonic clock and unique ids.
//! - [`buffers`]: spare byte buffers, per thread.
//! - [`num`]: saturating conversions between number types (no `as` elsewhere).

// No silent `as` casts in the relay's code: `num` converts, saturating (docs/DESIGN.md#layers).
#![cfg_attr(not(test), deny(clippy::as_conversions))]

pub mod accounting;
pub mod actors;
pub mod admin;
pub mod app;
pub mod auth;
pub mod billing;
pub mod buffers;
pub mod cli;
pub mod config;
pub mod continuation;
pub mod db;
pub mod export;
pub mod http;
pub mod ids;
pub mod manage;
pub mod num;
pub mod pool;
pub mod protocol;
pub mod record;
pub mod session;
pub mod sim;
pub mod telemetry;
pub mod upstream;
pub mod utc;
