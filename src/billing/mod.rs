//! Money: integer nano-USD amounts and pricing.

pub mod money;
pub mod pricing;
