//! The client-facing listener: the WebSocket ingress, the HTTP surface (`responses`: `POST
//! /v1/responses`, `/compact`), Codex's quota endpoint (`codex_usage`), health and readiness,
//! HTTP JSON errors.

pub mod codex_usage;
pub mod error;
pub mod health;
pub mod ingress;
pub mod refusals;
pub mod request_log;
pub mod responses;
