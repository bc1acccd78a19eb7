//! Wire facts of the client-facing protocol, all pure: the error table (more to come: client
//! frames, event classification, usage extraction).

pub mod errors;
