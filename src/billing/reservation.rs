//! Reservations (docs/DESIGN.md#reservations): what a turn holds against its key's quota and
//! its user's balance from admission until its record is written. Pure.

use super::pricing::{Price, cost};
use crate::protocol::usage::{Usage, estimate_tokens};

/// Why a reservation does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Quota,
    Balance,
}

/// The expected cost of a turn: the prompt's estimated input tokens and `output_tokens` (the
/// request's `max_output_tokens`, else `billing.reserve_output_tokens`; none for a warm-up,
/// which asks for no output), each at most `max_tokens`, at `price`. At least one nano-USD: a
/// turn that may reach the upstream is never reserved as free (a warm-up is billed as
/// reported, docs/DESIGN.md#pricing).
pub fn expected_cost(
    price: &Price,
    warmup: bool,
    prompt_bytes: usize,
    output_tokens: u64,
    max_tokens: u64,
) -> i64 {
    let output_tokens = if warmup { 0 } else { output_tokens };
    let usage = Usage {
        input_tokens: estimate_tokens(prompt_bytes).min(max_tokens),
        output_tokens: output_tokens.min(max_tokens),
        ..Usage::default()
    };
    // `max_cost_fits` held at start: the cost of a bounded usage fits.
    cost(price, &usage).unwrap_or(i64::MAX).max(1)
}

/// The state a reservation is decided on, read under the key's and the user's row locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    pub quota: Option<i64>,
    pub spent: i64,
    /// Live reservations of the key (other turns in flight, on any relay).
    pub key_reserved: i64,
    pub balance: Option<i64>,
    pub user_reserved: i64,
}

/// Whether `amount` fits: `spent + reserved + amount <= quota` and
/// `balance - reserved - amount >= 0` (exact, in 128 bits).
pub fn decide(h: &Holdings, amount: i64) -> Result<(), Refusal> {
    let wide = i128::from;
    if let Some(quota) = h.quota
        && wide(h.spent) + wide(h.key_reserved) + wide(amount) > wide(quota)
    {
        return Err(Refusal::Quota);
    }
    if let Some(balance) = h.balance
        && wide(balance) - wide(h.user_reserved) - wide(amount) < 0
    {
        return Err(Refusal::Balance);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = crate::billing::pricing::DEFAULT_PRICE;

    fn holdings(quota: Option<i64>, spent: i64, balance: Option<i64>, reserved: i64) -> Holdings {
        Holdings {
            quota,
            spent,
            key_reserved: reserved,
            balance,
            user_reserved: reserved,
        }
    }

    #[test]
    fn expected_cost_from_prompt_and_output_bound() {
        // 400 bytes ≈ 100 input tokens at $1.25/M, 1,000 output at $10/M.
        assert_eq!(
            expected_cost(&PRICE, false, 400, 1_000, 20_000_000),
            125_000 + 10_000_000
        );
        // A warm-up reserves its input only.
        assert_eq!(expected_cost(&PRICE, true, 400, 1_000, 20_000_000), 125_000);
        // Never free, capped at the bound.
        assert_eq!(expected_cost(&PRICE, false, 0, 0, 20_000_000), 1);
        assert_eq!(expected_cost(&PRICE, false, 0, u64::MAX, 1_000), 10_000_000);
    }

    #[test]
    fn quota_and_balance_hold_reservations_of_others() {
        let quota = Some(50_000_000);
        assert_eq!(decide(&holdings(quota, 0, None, 0), 50_000_000), Ok(()));
        assert_eq!(
            decide(&holdings(quota, 0, None, 40_000_001), 10_000_000),
            Err(Refusal::Quota)
        );
        assert_eq!(
            decide(&holdings(quota, 45_000_000, None, 0), 5_000_001),
            Err(Refusal::Quota)
        );
        assert_eq!(
            decide(&holdings(None, 0, Some(10), 5), 5),
            Ok(()),
            "a balance may reach zero"
        );
        assert_eq!(
            decide(&holdings(None, 0, Some(10), 6), 5),
            Err(Refusal::Balance)
        );
        assert_eq!(
            decide(&holdings(None, i64::MAX, None, i64::MAX), i64::MAX),
            Ok(())
        );
        assert_eq!(
            decide(&holdings(Some(i64::MAX), i64::MAX, None, i64::MAX), 1),
            Err(Refusal::Quota),
            "no overflow"
        );
    }
}
