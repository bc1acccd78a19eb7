//! Query functions, each working on both backends. Grouped by table.

pub mod affinity;
pub mod audit;
pub mod billing;
pub mod bindings;
pub mod facts;
pub mod fleet;
pub mod health;
pub mod keys;
pub mod reservations;
pub mod usage;
pub mod users;
