//! Wire facts of the client-facing protocol, all pure: the error table, client frames, upstream
//! event classification, usage extraction.

pub mod errors;
pub mod events;
pub mod frames;
pub mod usage;
