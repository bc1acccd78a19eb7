//! What a turn costs, in integer nano-USD. Pure.
//!
//! Rounding rule: each price is nano-USD per million tokens; a turn's cost is
//! `Σ tokens × price / 1,000,000` summed exactly (128-bit) and rounded half up once, at the end.
//! Input tokens are split into cached (cached price), cache writes (cache-write price) and the
//! rest (input price); output tokens include reasoning tokens. Warm-ups cost zero
//! (`bounds::settle`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::money::{MoneyError, parse_usd};
use crate::protocol::usage::Usage;

/// Prices in USD per million tokens, as decimal strings (no floating point anywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSettings {
    pub input_usd_per_mtok: String,
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<String>,
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<String>,
    pub output_usd_per_mtok: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PricingSettings {
    /// Prices of models without an entry of their own.
    pub default: PriceSettings,
    /// Per-model prices, by exact model name.
    pub models: BTreeMap<String, PriceSettings>,
}

impl Default for PricingSettings {
    fn default() -> Self {
        Self {
            default: PriceSettings {
                input_usd_per_mtok: "1.25".into(),
                cached_input_usd_per_mtok: Some("0.125".into()),
                cache_write_usd_per_mtok: None,
                output_usd_per_mtok: "10".into(),
            },
            models: BTreeMap::new(),
        }
    }
}

/// Nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub output: i64,
}

/// The default prices, parsed (for unit tests).
#[cfg(test)]
pub const DEFAULT_PRICE: Price = Price {
    input: 1_250_000_000,
    cached_input: 125_000_000,
    cache_write: 1_250_000_000,
    output: 10_000_000_000,
};

impl PriceSettings {
    pub fn parse(&self) -> Result<Price, MoneyError> {
        let input = parse_usd(&self.input_usd_per_mtok)?;
        let opt = |v: &Option<String>| v.as_deref().map(parse_usd).transpose();
        Ok(Price {
            input,
            cached_input: opt(&self.cached_input_usd_per_mtok)?.unwrap_or(input),
            cache_write: opt(&self.cache_write_usd_per_mtok)?.unwrap_or(input),
            output: parse_usd(&self.output_usd_per_mtok)?,
        })
    }
}

/// Parsed price table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    default: Price,
    models: BTreeMap<String, Price>,
}

impl PriceTable {
    pub fn from_settings(s: &PricingSettings) -> Result<Self, (String, MoneyError)> {
        let default = s
            .default
            .parse()
            .map_err(|e| ("pricing.default".to_string(), e))?;
        let mut models = BTreeMap::new();
        for (name, p) in &s.models {
            models.insert(
                name.clone(),
                p.parse()
                    .map_err(|e| (format!("pricing.models.{name}"), e))?,
            );
        }
        Ok(Self { default, models })
    }

    pub fn price_of(&self, model: &str) -> Price {
        self.models.get(model).copied().unwrap_or(self.default)
    }

    /// The cost of `usage` at `model`'s prices (`None`: it does not fit).
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<i64> {
        cost(&self.price_of(model), usage)
    }

    /// The prices of every configured model, the default's first.
    pub fn prices(&self) -> impl Iterator<Item = &Price> {
        std::iter::once(&self.default).chain(self.models.values())
    }
}

/// `Σ tokens × price / 10^6`, rounded half up once; `None` when it does not fit a 64-bit
/// nano-USD amount (never saturated: docs/DESIGN.md#usage-bounds).
pub fn cost(p: &Price, u: &Usage) -> Option<i64> {
    let cached = u.cached_input_tokens.min(u.input_tokens);
    let writes = u.cache_write_tokens.min(u.input_tokens - cached);
    let plain = u.input_tokens - cached - writes;
    let term = |tokens: u64, price: i64| i128::from(tokens).checked_mul(i128::from(price));
    let micro = term(plain, p.input)?
        .checked_add(term(cached, p.cached_input)?)?
        .checked_add(term(writes, p.cache_write)?)?
        .checked_add(term(u.output_tokens, p.output)?)?;
    i64::try_from((micro + 500_000) / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, cached: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn default_prices() {
        let t = PriceTable::from_settings(&PricingSettings::default()).unwrap();
        assert_eq!(t.price_of("x"), DEFAULT_PRICE);
        // 1M input at $1.25 + 1M output at $10.
        assert_eq!(
            t.cost("x", &usage(1_000_000, 0, 1_000_000)),
            Some(11_250_000_000)
        );
        // 1000 input of which 400 cached, 500 output:
        // 600 × 1250 + 400 × 125 + 500 × 10000 nano-USD per token... per million: exact sum.
        assert_eq!(
            t.cost("x", &usage(1000, 400, 500)),
            Some((600 * 1_250_000_000 + 400 * 125_000_000 + 500 * 10_000_000_000i64) / 1_000_000)
        );
        // Beyond 64 bits: no amount rather than a saturated one.
        assert_eq!(t.cost("x", &usage(u64::MAX, 0, u64::MAX)), None);
    }

    #[test]
    fn rounding_is_half_up_once() {
        let p = Price {
            input: 1,
            cached_input: 1,
            cache_write: 1,
            output: 1,
        };
        assert_eq!(cost(&p, &usage(499_999, 0, 0)), Some(0));
        assert_eq!(cost(&p, &usage(500_000, 0, 0)), Some(1));
        // Summed before rounding: two halves make one.
        assert_eq!(cost(&p, &usage(250_000, 0, 250_000)), Some(1));
    }

    #[test]
    fn per_model_and_cache_writes() {
        let mut s = PricingSettings::default();
        s.models.insert(
            "big".into(),
            PriceSettings {
                input_usd_per_mtok: "2".into(),
                cached_input_usd_per_mtok: None,
                cache_write_usd_per_mtok: Some("3".into()),
                output_usd_per_mtok: "8".into(),
            },
        );
        let t = PriceTable::from_settings(&s).unwrap();
        let u = Usage {
            input_tokens: 1_000_000,
            cache_write_tokens: 500_000,
            output_tokens: 0,
            ..Usage::default()
        };
        assert_eq!(t.cost("big", &u), Some(500_000 * 2_000 + 500_000 * 3_000));
        assert_eq!(
            t.price_of("big").cached_input,
            2_000_000_000,
            "cached defaults to input"
        );
        // Inconsistent counts never go negative.
        let odd = Usage {
            input_tokens: 10,
            cached_input_tokens: 50,
            output_tokens: 0,
            ..Usage::default()
        };
        assert!(t.cost("big", &odd).is_some_and(|c| c >= 0));
        let mut bad = PricingSettings::default();
        bad.default.output_usd_per_mtok = "ten".into();
        assert_eq!(
            PriceTable::from_settings(&bad).unwrap_err().0,
            "pricing.default"
        );
    }
}
