//! Wire facts of the client-facing protocol, all pure: the error table, client frames, upstream
//! event classification, usage extraction, server-sent events, the header policy.

pub mod errors;
pub mod events;
pub mod frames;
pub mod headers;
pub mod sse;
pub mod usage;
