//! HTTP surface: the WebSocket ingress, health and readiness, HTTP JSON errors.

pub mod error;
pub mod health;
pub mod ingress;
pub mod refusals;
pub mod request_log;
