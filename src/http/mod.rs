//! HTTP surface: health and readiness now; the WebSocket ingress comes with the relay core.

pub mod error;
pub mod health;
