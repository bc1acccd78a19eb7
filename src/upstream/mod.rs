//! The upstream side. One upstream WebSocket per `UpstreamConn` actor: dialled with awc (HTTP/1.1, rustls), read by
//! a resident reader from the moment it is connected (pings answered, peer closes and stray
//! data noticed at once), frames delivered only to the current lessee.
//!
//! - `messages`: what the conn sends to its lessee and its pool, and what it accepts.
//! - `dial`: the handshake (URL, credential, passed-through headers).
//! - `socket`: the socket's reader and writer, holding buffers only while bytes are in flight.
//! - `actor`: the connection actor.
//! - `http`: the HTTP surface's upstream requests (keep-alive client per account).

pub mod actor;
pub mod dial;
pub mod http;
pub mod messages;
pub mod socket;

pub use actor::UpstreamConn;
