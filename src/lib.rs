//! turnpike: a relay server for the OpenAI Responses API WebSocket mode.
//!
//! Module map (data flows top to bottom; a lower module never imports a higher one):
//! - [`cli`]: subcommands → functions.
//! - [`admin`]: the operators' HTTP API (actors, sessions, pools, compensations).
//! - [`actors`]: the status every long-lived actor reports, and the restart message.
//! - [`app`]: wiring and order of startup and shutdown.
//! - [`http`]: the WebSocket ingress, health, readiness, HTTP JSON errors, refused-handshake
//!   summaries.
//! - [`auth`]: API keys: generation, SHA-256 storage, authentication, standing checks.
//! - [`session`]: the client session actor and its turn state machine.
//! - [`continuation`]: `previous_response_id` across lost connections (replay, fail-close), pure.
//! - [`protocol`]: wire facts, all pure: error table, client frames, event kinds, usage.
//! - [`record`]: a turn's usage record (`TurnRecord`, `Timing`) and its spool format.
//! - [`billing`]: money in integer nano-USD: pricing, usage bounds, reservations (pure), the
//!   Compensator.
//! - [`db`]: schema, migrations, the backend enum, query functions.
//! - [`sim`]: the simulated upstream (a real WebSocket server with scriptable faults).
//! - [`config`]: settings, defaults, loading, validation errors.
//! - [`telemetry`]: tracing setup.

pub mod accounting;
pub mod actors;
pub mod admin;
pub mod app;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod config;
pub mod continuation;
pub mod db;
pub mod http;
pub mod pool;
pub mod protocol;
pub mod record;
pub mod session;
pub mod sim;
pub mod telemetry;
pub mod upstream;
