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

/// What a turn's input is expected to be: its request's prompt, and the context of the
/// response it continues (its input and output, billed again as input).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Input {
    pub prompt_bytes: usize,
    pub context_tokens: u64,
}

/// The expected cost of a turn: its estimated input tokens (the prompt's, and the context of
/// the response it continues) and `output_tokens` (the
/// request's `max_output_tokens`, else `billing.reserve_output_tokens`; none for a warm-up,
/// which asks for no output), each at most `max_tokens`, at `price`. At least one nano-USD: a
/// turn that may reach the upstream is never reserved as free (a warm-up is billed as
/// reported, docs/DESIGN.md#pricing).
pub fn expected_cost(
    price: &Price,
    warmup: bool,
    input: Input,
    output_tokens: u64,
    max_tokens: u64,
) -> i64 {
    let output_tokens = if warmup { 0 } else { output_tokens };
    let input_tokens = estimate_tokens(input.prompt_bytes).saturating_add(input.context_tokens);
    let usage = Usage {
        input_tokens: input_tokens.min(max_tokens),
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

/// What a reservation took: a block of several turns of this size
/// (docs/DESIGN.md#reservation-blocks) or the turn's own row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    Block(i64),
    Own,
}

/// What the key's quota and its user's balance leave for more reservations (the smaller;
/// `i128::MAX` when neither is limited).
fn room(h: &Holdings) -> i128 {
    let wide = i128::from;
    let quota = h.quota.map_or(i128::MAX, |q| {
        wide(q) - wide(h.spent) - wide(h.key_reserved)
    });
    let balance = h
        .balance
        .map_or(i128::MAX, |b| wide(b) - wide(h.user_reserved));
    quota.min(balance)
}

/// A turn reserving `amount`, offered a block of up to `block`: a block of at most half of
/// what is left — so a block always leaves at least as much as it takes, for this relay's and
/// other relays' turns — and at least two turns' worth (smaller is not worth holding); else
/// the turn's own row if it fits. Near the end of a quota or balance turns reserve one by one,
/// so a block never refuses a turn its own row would have let through.
pub fn choose(h: &Holdings, amount: i64, block: Option<i64>) -> Result<Taken, Refusal> {
    if let Some(offered) = block {
        let half = i64::try_from((room(h) / 2).max(0)).unwrap_or(i64::MAX);
        let size = offered.min(half);
        if size >= amount.saturating_mul(2) && decide(h, size).is_ok() {
            return Ok(Taken::Block(size));
        }
    }
    decide(h, amount).map(|()| Taken::Own)
}

/// What the responses a turn may continue were billed for, remembered by this relay
/// (docs/DESIGN.md#reservations): a turn continuing one (`previous_response_id`) is billed for
/// that whole context again as input, which its request's own bytes do not show. Bounded: the
/// oldest are forgotten first (a forgotten or other relay's response reserves from the
/// request's bytes alone).
#[derive(Debug)]
pub struct Chains {
    capacity: usize,
    inner: std::sync::Mutex<ChainsInner>,
}

#[derive(Debug, Default)]
struct ChainsInner {
    /// response id → (key id, its input + output tokens).
    tokens: std::collections::HashMap<String, (i64, u64)>,
    order: std::collections::VecDeque<String>,
}

impl Chains {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: std::sync::Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChainsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `response_id` of key `key` was billed for `tokens` (input + output).
    pub fn remember(&self, response_id: &str, key: i64, tokens: u64) {
        let mut g = self.lock();
        if g.tokens
            .insert(response_id.to_string(), (key, tokens))
            .is_none()
        {
            g.order.push_back(response_id.to_string());
        }
        while g.order.len() > self.capacity {
            if let Some(old) = g.order.pop_front() {
                g.tokens.remove(&old);
            }
        }
    }

    /// The tokens a continuation of `response_id` by key `key` carries as context (0 when
    /// unknown, or another key's).
    pub fn context_of(&self, response_id: &str, key: i64) -> u64 {
        match self.lock().tokens.get(response_id) {
            Some((owner, tokens)) if *owner == key => *tokens,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = crate::billing::pricing::DEFAULT_PRICE;

    fn bytes(prompt_bytes: usize) -> Input {
        Input {
            prompt_bytes,
            context_tokens: 0,
        }
    }

    #[test]
    fn a_continuation_reserves_its_context() {
        let chains = Chains::new(2);
        chains.remember("resp_a", 7, 50_000);
        assert_eq!(chains.context_of("resp_a", 8), 0, "another key's response");
        let input = Input {
            prompt_bytes: 400,
            context_tokens: chains.context_of("resp_a", 7),
        };
        assert_eq!(
            expected_cost(&PRICE, false, input, 0, 20_000_000),
            (50_100 * 1_250_000_000i64) / 1_000_000
        );
        chains.remember("resp_b", 7, 1);
        chains.remember("resp_c", 7, 1);
        assert_eq!(chains.context_of("resp_a", 7), 0, "the oldest forgotten");
        assert_eq!(chains.context_of("resp_c", 7), 1);
    }

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
            expected_cost(&PRICE, false, bytes(400), 1_000, 20_000_000),
            125_000 + 10_000_000
        );
        // A warm-up reserves its input only.
        assert_eq!(
            expected_cost(&PRICE, true, bytes(400), 1_000, 20_000_000),
            125_000
        );
        // Never free, capped at the bound.
        assert_eq!(expected_cost(&PRICE, false, bytes(0), 0, 20_000_000), 1);
        assert_eq!(
            expected_cost(&PRICE, false, bytes(0), u64::MAX, 1_000),
            10_000_000
        );
    }

    #[test]
    fn blocks_are_taken_only_with_room_for_another() {
        let quota = Some(1_000);
        let take = |h: Holdings, block: Option<i64>| choose(&h, 100, block);
        assert_eq!(
            take(holdings(quota, 0, None, 0), Some(400)),
            Ok(Taken::Block(400))
        );
        assert_eq!(
            take(holdings(quota, 201, None, 0), Some(400)),
            Ok(Taken::Block(399)),
            "at most half of what is left"
        );
        assert_eq!(
            take(holdings(quota, 500, None, 101), Some(400)),
            Ok(Taken::Own),
            "less than two turns' worth: the turn reserves alone"
        );
        assert_eq!(
            take(holdings(quota, 0, None, 901), Some(400)),
            Err(Refusal::Quota)
        );
        assert_eq!(
            take(holdings(None, 0, Some(800), 0), Some(400)),
            Ok(Taken::Block(400)),
            "a balance as well"
        );
        assert_eq!(
            take(holdings(Some(10_000), 0, Some(799), 0), Some(400)),
            Ok(Taken::Block(399)),
            "the smaller of the two rooms"
        );
        assert_eq!(
            take(holdings(None, 0, Some(399), 0), Some(400)),
            Ok(Taken::Own)
        );
        assert_eq!(take(holdings(None, 0, None, 0), None), Ok(Taken::Own));
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
