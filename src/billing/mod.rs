//! Money: integer nano-USD amounts (pricing and the ledger come with the accounting work).

pub mod money;
