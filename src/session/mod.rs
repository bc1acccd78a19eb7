//! The client session: one actor per client WebSocket, owning the turn state machine.
//!
//! - `turn`: timing, usage merge and the outcome of one turn (pure).

pub mod turn;
