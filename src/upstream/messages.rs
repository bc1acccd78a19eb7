//! Messages of the upstream connection actor. It never imports its users: it talks to them
//! through `Recipient`s of the types below.

use actix::prelude::*;
use bytestring::ByteString;

/// Why an upstream socket is no longer usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostReason {
    /// The peer sent a close frame (its code, if any).
    Closed(Option<u16>),
    /// The TCP stream ended without a close frame.
    Eof,
    /// A read or protocol error.
    Error(String),
    /// A frame arrived while nobody held the connection.
    StrayData,
    /// A frame that breaks the protocol: binary (the protocol is text only), or text that is
    /// not a JSON event.
    Protocol(&'static str),
}

/// Delivered to the lessee: a frame of its response, or the end of the connection.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum UpstreamEvent {
    Text { conn: u64, text: ByteString },
    Lost { conn: u64, reason: LostReason },
}

/// Delivered to the pool that owns the connection.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum ConnStatus {
    Ready {
        conn: u64,
    },
    /// `status`: the HTTP status the upstream refused the handshake with, if it answered.
    DialFailed {
        conn: u64,
        error: String,
        status: Option<u16>,
        /// The refusal's `Retry-After`, as the upstream wrote it.
        retry_after: Option<String>,
    },
    Broken {
        conn: u64,
        reason: LostReason,
    },
}

/// Write a text frame upstream (from the lessee).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SendText(pub ByteString);

/// Who receives the connection's frames from now on, and the lease they belong to (`None`:
/// idle in the pool). A lessee on the connection's thread may then read them itself
/// (`socket::attach`, docs/DESIGN.md#direct-reads).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SetLessee(pub Option<(Recipient<UpstreamEvent>, u64)>);

/// Close the socket cleanly (close frame, then stop).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CloseConn;
