//! Plausibility bounds on the usage a turn is billed for (docs/DESIGN.md#usage-bounds). Pure.
//!
//! An upstream that reports nonsense (`input_tokens: 10^19`) must not be billed at face value:
//! a usage above `billing.max_tokens_per_response`, or one whose cost does not fit the money
//! arithmetic, is set aside for a DBA and the turn is billed from the relay's own estimate.

use super::pricing::{Price, cost};
use crate::protocol::usage::Usage;
use crate::record::UsageSource;

/// Why a reported usage was not believed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Implausible {
    /// A count (or input + output) above the bound.
    AboveBound {
        field: &'static str,
        value: u64,
        max: u64,
    },
    /// Its cost does not fit a 64-bit nano-USD amount.
    CostOverflow,
}

impl Implausible {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Implausible::AboveBound { .. } => "above_bound",
            Implausible::CostOverflow => "cost_overflow",
        }
    }
}

impl std::fmt::Display for Implausible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Implausible::AboveBound { field, value, max } => write!(
                f,
                "{field} = {value} is above billing.max_tokens_per_response = {max}"
            ),
            Implausible::CostOverflow => write!(f, "its cost overflows a 64-bit nano-USD amount"),
        }
    }
}

/// What a turn is billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billed {
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub cost_nanousd: i64,
    /// The usage that was reported and not believed, and why.
    pub set_aside: Option<(Usage, Implausible)>,
}

/// Checks a usage against the bound: every count, and input + output, at most `max_tokens`.
pub fn check(u: &Usage, max_tokens: u64) -> Result<(), Implausible> {
    let fields = [
        ("input_tokens", Some(u.input_tokens)),
        ("cached_input_tokens", Some(u.cached_input_tokens)),
        ("cache_write_tokens", Some(u.cache_write_tokens)),
        ("cache_write_30m_tokens", Some(u.cache_write_30m_tokens)),
        ("cache_write_12h_tokens", Some(u.cache_write_12h_tokens)),
        ("output_tokens", Some(u.output_tokens)),
        ("reasoning_tokens", Some(u.reasoning_tokens)),
        ("total_tokens", Some(u.total_tokens)),
        (
            "input_tokens + output_tokens",
            u.input_tokens.checked_add(u.output_tokens),
        ),
    ];
    for (field, value) in fields {
        match value {
            Some(v) if v <= max_tokens => {}
            v => {
                return Err(Implausible::AboveBound {
                    field,
                    value: v.unwrap_or(u64::MAX),
                    max: max_tokens,
                });
            }
        }
    }
    Ok(())
}

/// The relay's own estimate, each count capped at the bound (it comes from bytes the relay
/// saw, which a frame limit already bounds; the cap keeps its cost within range whatever the
/// configuration — `max_cost_fits` is checked at start).
fn capped(estimate: &Usage, max_tokens: u64) -> Usage {
    let c = |v: u64| v.min(max_tokens);
    Usage {
        input_tokens: c(estimate.input_tokens),
        cached_input_tokens: c(estimate.cached_input_tokens),
        cache_write_tokens: c(estimate.cache_write_tokens),
        cache_write_30m_tokens: c(estimate.cache_write_30m_tokens),
        cache_write_12h_tokens: c(estimate.cache_write_12h_tokens),
        output_tokens: c(estimate.output_tokens),
        reasoning_tokens: c(estimate.reasoning_tokens),
        total_tokens: 0,
    }
}

/// What to bill: the usage as measured (`usage`, from `source`) when it is plausible and its
/// cost fits, else the relay's `estimate` (`estimated`), with the rejected usage set aside.
/// Warm-ups (`generate: false`) are no exception: billed as the upstream reports them, zero
/// only when it reports zero (docs/DESIGN.md#pricing).
pub fn settle(
    price: &Price,
    usage: Usage,
    source: UsageSource,
    estimate: &Usage,
    max_tokens: u64,
) -> Billed {
    let priced = |u: &Usage| cost(price, u);
    let rejected = match check(&usage, max_tokens) {
        Ok(()) => match priced(&usage) {
            Some(cost_nanousd) => {
                return Billed {
                    usage,
                    usage_source: source,
                    cost_nanousd,
                    set_aside: None,
                };
            }
            None => Implausible::CostOverflow,
        },
        Err(why) => why,
    };
    let mut fallback = capped(estimate, max_tokens);
    fallback.total_tokens = fallback.input_tokens + fallback.output_tokens;
    Billed {
        // `max_cost_fits` held at start, so the capped estimate's cost fits.
        cost_nanousd: priced(&fallback).unwrap_or(i64::MAX),
        usage: fallback,
        usage_source: UsageSource::Estimated,
        set_aside: Some((usage, rejected)),
    }
}

/// The most one response may cost: one million USD. With it a batch of records, and a key's
/// spend over millions of turns, stay far inside 64 bits — no database range error can make a
/// record fail.
pub const MAX_COST_PER_RESPONSE_NANOUSD: i64 = 1_000_000 * crate::billing::money::NANOS_PER_USD;

/// Whether a response of `max_tokens` input and as many output tokens, at `price`, costs at
/// most `MAX_COST_PER_RESPONSE_NANOUSD` (checked at start for every configured price).
pub fn max_cost_fits(price: &Price, max_tokens: u64) -> bool {
    let most = Usage {
        input_tokens: max_tokens,
        output_tokens: max_tokens,
        ..Usage::default()
    };
    // Input is priced at its dearest split.
    let dearest = Price {
        input: price.dearest_input(),
        ..*price
    };
    cost(&dearest, &most).is_some_and(|c| c <= MAX_COST_PER_RESPONSE_NANOUSD)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRICE: Price = crate::billing::pricing::DEFAULT_PRICE;
    const MAX: u64 = 20_000_000;

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            total_tokens: input.saturating_add(output),
            ..Usage::default()
        }
    }

    #[test]
    fn plausible_usage_is_billed_as_reported() {
        let b = settle(
            &PRICE,
            usage(1000, 100),
            UsageSource::Reported,
            &usage(9, 9),
            MAX,
        );
        assert_eq!(b.usage, usage(1000, 100));
        assert_eq!(b.usage_source, UsageSource::Reported);
        assert_eq!(b.cost_nanousd, 1_250_000 + 1_000_000);
        assert!(b.set_aside.is_none());
    }

    #[test]
    fn absurd_counts_are_billed_from_the_estimate() {
        let estimate = usage(40, 5);
        for reported in [
            usage(10_000_000_000_000_000_000, 1),
            usage(1, u64::MAX),
            usage(1, 1_000_000_000_000_000_000),
            usage(MAX, 1),
        ] {
            let b = settle(&PRICE, reported, UsageSource::Reported, &estimate, MAX);
            assert_eq!(b.usage_source, UsageSource::Estimated);
            assert_eq!(b.usage, usage(40, 5));
            assert_eq!(b.cost_nanousd, 50_000 + 50_000);
            let (kept, why) = b.set_aside.unwrap();
            assert_eq!(kept, reported);
            assert_eq!(why.label(), "above_bound");
        }
    }

    #[test]
    fn a_cost_that_does_not_fit_is_never_saturated() {
        let dear = Price {
            output: i64::MAX,
            ..PRICE
        };
        let b = settle(
            &dear,
            usage(1, 10_000_000),
            UsageSource::Reported,
            &usage(4, 1),
            MAX,
        );
        assert_eq!(b.set_aside.unwrap().1, Implausible::CostOverflow);
        assert_eq!(b.usage_source, UsageSource::Estimated);
        assert!(b.cost_nanousd < i64::MAX);
        assert!(!max_cost_fits(&dear, MAX));
        assert!(max_cost_fits(&PRICE, MAX));
    }

    #[test]
    fn the_estimate_is_capped_at_the_bound() {
        let b = settle(
            &PRICE,
            usage(u64::MAX, 0),
            UsageSource::Reported,
            &usage(u64::MAX, 7),
            MAX,
        );
        assert_eq!(b.usage.input_tokens, MAX);
        assert_eq!(b.usage.output_tokens, 7);
    }

    #[test]
    fn zero_is_billed_only_when_reported() {
        let b = settle(
            &PRICE,
            usage(0, 0),
            UsageSource::Reported,
            &usage(3, 0),
            MAX,
        );
        assert_eq!((b.cost_nanousd, b.usage_source), (0, UsageSource::Reported));
        let b = settle(
            &PRICE,
            usage(u64::MAX, 0),
            UsageSource::Reported,
            &usage(3, 0),
            MAX,
        );
        assert_eq!(b.cost_nanousd, 3_750, "the estimate, not zero");
    }
}
