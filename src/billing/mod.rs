//! Money: integer nano-USD amounts, pricing, and the Compensator that settles failed debits.

pub mod blocks;
pub mod bounds;
pub mod compensator;
pub mod money;
pub mod pricing;
pub mod reservation;
