//! The client-facing listener: the WebSocket ingress, the HTTP surface (`responses`: `POST
//! /v1/responses`, `/compact`), health and readiness, HTTP JSON errors.

pub mod error;
pub mod health;
pub mod ingress;
pub mod refusals;
pub mod request_log;
pub mod responses;
