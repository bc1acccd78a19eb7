//! What a turn costs, in integer nano-USD. Pure.
//!
//! Rounding rule: each price is nano-USD per million tokens; a turn's cost is
//! `Σ tokens × price / 1,000,000` summed exactly (128-bit) and rounded half up once, at the end.
//! Input tokens are split into cached (cached price), cache writes (by lifetime: 30 minutes,
//! 12 hours, or unnamed — each its price) and the rest (input price); output tokens include
//! reasoning tokens. Every model has a price per service tier (docs/DESIGN.md#pricing): a
//! table of its own, or the standard prices times the tier's multiplier. Warm-ups are priced
//! like any turn, from what the upstream reports (`bounds::settle`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::money::{MoneyError, NANOS_PER_USD, parse_usd};
use crate::protocol::usage::Usage;

pub use crate::record::STANDARD_TIER;
/// A request's `service_tier: "auto"`: the upstream picks (and reports) the tier.
pub const AUTO_TIER: &str = "auto";

/// The built-in multipliers of the standard prices, by tier (the upstream's list prices:
/// priority twice standard, flex half); `[pricing.tiers]` adds to or overrides them.
const BUILT_IN_TIERS: [(&str, &str); 2] = [("priority", "2"), ("flex", "0.5")];

/// Longest tier name kept (it comes from the client or the upstream).
const TIER_MAX_CHARS: usize = 32;

/// A tier as the relay names it: lower case, the upstream's `default` is `standard`; `auto`
/// stays `auto` (the upstream resolves it).
pub fn tier_name(raw: &str) -> String {
    let name = crate::record::clean_label(raw.trim(), TIER_MAX_CHARS).to_ascii_lowercase();
    match name.as_str() {
        "" | "default" => STANDARD_TIER.to_string(),
        _ => name,
    }
}

/// The tier a turn is billed at: the one the upstream reported for the response, else the one
/// requested; `auto` or nothing at all is standard.
pub fn billed_tier(reported: Option<&str>, requested: Option<&str>) -> String {
    let named = |t: Option<&str>| t.map(tier_name).filter(|t| t != AUTO_TIER);
    named(reported)
        .or_else(|| named(requested))
        .unwrap_or_else(|| STANDARD_TIER.to_string())
}

/// Prices in USD per million tokens, as decimal strings (no floating point anywhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceSettings {
    pub input_usd_per_mtok: String,
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<String>,
    /// Cache writes of no named lifetime (default: the input price).
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<String>,
    /// Cache writes kept 30 minutes (default: `cache_write_usd_per_mtok`).
    #[serde(default)]
    pub cache_write_30m_usd_per_mtok: Option<String>,
    /// Cache writes kept 12 hours (default: `cache_write_usd_per_mtok`).
    #[serde(default)]
    pub cache_write_12h_usd_per_mtok: Option<String>,
    pub output_usd_per_mtok: String,
    /// This model's own prices per service tier (`priority`, `flex`, …), instead of the
    /// standard prices times the tier's multiplier.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<String, PriceSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PricingSettings {
    /// Prices of models without an entry of their own.
    pub default: PriceSettings,
    /// Per-model prices, by exact model name.
    pub models: BTreeMap<String, PriceSettings>,
    /// Multipliers of the standard prices by service tier, as decimal strings, over the
    /// built-in `priority = "2"` and `flex = "0.5"`.
    pub tiers: BTreeMap<String, String>,
}

impl Default for PricingSettings {
    fn default() -> Self {
        Self {
            default: PriceSettings {
                input_usd_per_mtok: "1.25".into(),
                cached_input_usd_per_mtok: Some("0.125".into()),
                cache_write_usd_per_mtok: None,
                cache_write_30m_usd_per_mtok: None,
                cache_write_12h_usd_per_mtok: None,
                output_usd_per_mtok: "10".into(),
                tiers: BTreeMap::new(),
            },
            models: BTreeMap::new(),
            tiers: BTreeMap::new(),
        }
    }
}

/// Nano-USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    pub cached_input: i64,
    pub cache_write: i64,
    pub cache_write_30m: i64,
    pub cache_write_12h: i64,
    pub output: i64,
}

/// The default prices, parsed (for unit tests).
#[cfg(test)]
pub const DEFAULT_PRICE: Price = Price {
    input: 1_250_000_000,
    cached_input: 125_000_000,
    cache_write: 1_250_000_000,
    cache_write_30m: 1_250_000_000,
    cache_write_12h: 1_250_000_000,
    output: 10_000_000_000,
};

impl Price {
    /// Every price times `multiplier` (nano-units: 10^9 is ×1), each rounded half up;
    /// `None` when one does not fit.
    fn scaled(&self, multiplier: i64) -> Option<Price> {
        let s = |p: i64| {
            let exact = i128::from(p).checked_mul(i128::from(multiplier))?;
            let half = i128::from(NANOS_PER_USD / 2);
            i64::try_from((exact + half) / i128::from(NANOS_PER_USD)).ok()
        };
        Some(Price {
            input: s(self.input)?,
            cached_input: s(self.cached_input)?,
            cache_write: s(self.cache_write)?,
            cache_write_30m: s(self.cache_write_30m)?,
            cache_write_12h: s(self.cache_write_12h)?,
            output: s(self.output)?,
        })
    }

    /// The dearest of its input prices (what an input token may cost at most).
    pub fn dearest_input(&self) -> i64 {
        self.input
            .max(self.cached_input)
            .max(self.cache_write)
            .max(self.cache_write_30m)
            .max(self.cache_write_12h)
    }
}

impl PriceSettings {
    pub fn parse(&self) -> Result<Price, MoneyError> {
        let input = parse_usd(&self.input_usd_per_mtok)?;
        let opt = |v: &Option<String>| v.as_deref().map(parse_usd).transpose();
        let cache_write = opt(&self.cache_write_usd_per_mtok)?.unwrap_or(input);
        Ok(Price {
            input,
            cached_input: opt(&self.cached_input_usd_per_mtok)?.unwrap_or(input),
            cache_write,
            cache_write_30m: opt(&self.cache_write_30m_usd_per_mtok)?.unwrap_or(cache_write),
            cache_write_12h: opt(&self.cache_write_12h_usd_per_mtok)?.unwrap_or(cache_write),
            output: parse_usd(&self.output_usd_per_mtok)?,
        })
    }
}

/// One model's prices by tier (always with `standard`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct TierPrices(BTreeMap<String, Price>);

impl TierPrices {
    fn of(
        s: &PriceSettings,
        multipliers: &BTreeMap<String, i64>,
        at: &str,
    ) -> Result<Self, (String, MoneyError)> {
        let standard = s.parse().map_err(|e| (at.to_string(), e))?;
        let mut tiers = BTreeMap::from([(STANDARD_TIER.to_string(), standard)]);
        for (tier, m) in multipliers {
            let price = standard.scaled(*m).ok_or_else(|| {
                (
                    format!("pricing.tiers.{tier}"),
                    MoneyError::Overflow(tier.clone()),
                )
            })?;
            tiers.insert(tier.clone(), price);
        }
        for (tier, own) in &s.tiers {
            let at = format!("{at}.tiers.{tier}");
            if !own.tiers.is_empty() {
                return Err((at, MoneyError::Syntax("tiers of a tier".into())));
            }
            tiers.insert(tier_name(tier), own.parse().map_err(|e| (at, e))?);
        }
        Ok(Self(tiers))
    }

    /// The tier's price; a tier without one is priced at the dearest tier (money fails
    /// closed: an upstream naming a tier the operator did not price is not billed less).
    fn get(&self, tier: &str) -> (Price, bool) {
        match self.0.get(tier) {
            Some(p) => (*p, true),
            None => {
                let dearest = self
                    .0
                    .values()
                    .max_by_key(|p| (p.output, p.dearest_input()))
                    .copied();
                (dearest.unwrap_or(DEAREST), false)
            }
        }
    }
}

/// Unreachable (a `TierPrices` always holds `standard`); a price no turn can afford.
const DEAREST: Price = Price {
    input: i64::MAX,
    cached_input: i64::MAX,
    cache_write: i64::MAX,
    cache_write_30m: i64::MAX,
    cache_write_12h: i64::MAX,
    output: i64::MAX,
};

/// Parsed price table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    default: TierPrices,
    models: BTreeMap<String, TierPrices>,
}

impl PriceTable {
    pub fn from_settings(s: &PricingSettings) -> Result<Self, (String, MoneyError)> {
        let mut multipliers = BTreeMap::new();
        let built_in = BUILT_IN_TIERS.iter().map(|(t, m)| (*t, *m));
        let configured = s.tiers.iter().map(|(t, m)| (t.as_str(), m.as_str()));
        for (tier, m) in built_in.chain(configured) {
            let at = || format!("pricing.tiers.{tier}");
            multipliers.insert(tier_name(tier), parse_usd(m).map_err(|e| (at(), e))?);
        }
        // `standard` is the prices themselves.
        multipliers.remove(STANDARD_TIER);
        let default = TierPrices::of(&s.default, &multipliers, "pricing.default")?;
        let mut models = BTreeMap::new();
        for (name, p) in &s.models {
            let at = format!("pricing.models.{name}");
            models.insert(name.clone(), TierPrices::of(p, &multipliers, &at)?);
        }
        Ok(Self { default, models })
    }

    /// `model`'s price at `tier`, and whether that tier has a price of its own (`false`: the
    /// dearest of the model's tiers stands in).
    pub fn price_of(&self, model: &str, tier: &str) -> (Price, bool) {
        self.models.get(model).unwrap_or(&self.default).get(tier)
    }

    /// The cost of `usage` at `model`'s prices of `tier` (`None`: it does not fit).
    pub fn cost(&self, model: &str, tier: &str, usage: &Usage) -> Option<i64> {
        cost(&self.price_of(model, tier).0, usage)
    }

    /// Every configured price (every model, every tier), the default's first.
    pub fn prices(&self) -> impl Iterator<Item = &Price> {
        std::iter::once(&self.default)
            .chain(self.models.values())
            .flat_map(|t| t.0.values())
    }

    /// The tiers that have prices (of any model).
    pub fn tiers(&self) -> std::collections::BTreeSet<&str> {
        std::iter::once(&self.default)
            .chain(self.models.values())
            .flat_map(|t| t.0.keys().map(String::as_str))
            .collect()
    }
}

/// `Σ tokens × price / 10^6`, rounded half up once; `None` when it does not fit a 64-bit
/// nano-USD amount (never saturated: docs/DESIGN.md#usage-bounds). Inconsistent counts are
/// read in the order cached, cache writes (30 minutes, 12 hours, unnamed), plain input, each
/// bounded by what remains, so none is ever negative or counted twice.
pub fn cost(p: &Price, u: &Usage) -> Option<i64> {
    let cached = u.cached_input_tokens.min(u.input_tokens);
    let writes = u.cache_write_tokens.min(u.input_tokens - cached);
    let w30 = u.cache_write_30m_tokens.min(writes);
    let w12 = u.cache_write_12h_tokens.min(writes - w30);
    let unnamed = writes - w30 - w12;
    let plain = u.input_tokens - cached - writes;
    let term = |tokens: u64, price: i64| i128::from(tokens).checked_mul(i128::from(price));
    let micro = term(plain, p.input)?
        .checked_add(term(cached, p.cached_input)?)?
        .checked_add(term(w30, p.cache_write_30m)?)?
        .checked_add(term(w12, p.cache_write_12h)?)?
        .checked_add(term(unnamed, p.cache_write)?)?
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
        assert_eq!(t.price_of("x", STANDARD_TIER).0, DEFAULT_PRICE);
        // 1M input at $1.25 + 1M output at $10.
        assert_eq!(
            t.cost("x", STANDARD_TIER, &usage(1_000_000, 0, 1_000_000)),
            Some(11_250_000_000)
        );
        // 1000 input of which 400 cached, 500 output:
        // 600 × 1250 + 400 × 125 + 500 × 10000 nano-USD per token... per million: exact sum.
        assert_eq!(
            t.cost("x", STANDARD_TIER, &usage(1000, 400, 500)),
            Some((600 * 1_250_000_000 + 400 * 125_000_000 + 500 * 10_000_000_000i64) / 1_000_000)
        );
        // Beyond 64 bits: no amount rather than a saturated one.
        assert_eq!(
            t.cost("x", STANDARD_TIER, &usage(u64::MAX, 0, u64::MAX)),
            None
        );
    }

    #[test]
    fn rounding_is_half_up_once() {
        let p = Price {
            input: 1,
            cached_input: 1,
            cache_write: 1,
            cache_write_30m: 1,
            cache_write_12h: 1,
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
                cache_write_30m_usd_per_mtok: None,
                cache_write_12h_usd_per_mtok: Some("4".into()),
                output_usd_per_mtok: "8".into(),
                tiers: BTreeMap::new(),
            },
        );
        let t = PriceTable::from_settings(&s).unwrap();
        let u = Usage {
            input_tokens: 1_000_000,
            cache_write_tokens: 500_000,
            output_tokens: 0,
            ..Usage::default()
        };
        assert_eq!(
            t.cost("big", STANDARD_TIER, &u),
            Some(500_000 * 2_000 + 500_000 * 3_000)
        );
        assert_eq!(
            t.price_of("big", STANDARD_TIER).0.cached_input,
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
        assert!(t.cost("big", STANDARD_TIER, &odd).is_some_and(|c| c >= 0));
        let mut bad = PricingSettings::default();
        bad.default.output_usd_per_mtok = "ten".into();
        assert_eq!(
            PriceTable::from_settings(&bad).unwrap_err().0,
            "pricing.default"
        );
    }

    fn big() -> PriceTable {
        let mut s = PricingSettings::default();
        s.models.insert(
            "big".into(),
            PriceSettings {
                input_usd_per_mtok: "2".into(),
                cached_input_usd_per_mtok: Some("0.2".into()),
                cache_write_usd_per_mtok: Some("2.5".into()),
                cache_write_30m_usd_per_mtok: None,
                cache_write_12h_usd_per_mtok: Some("4".into()),
                output_usd_per_mtok: "8".into(),
                tiers: BTreeMap::from([(
                    "priority".into(),
                    PriceSettings {
                        input_usd_per_mtok: "5".into(),
                        cached_input_usd_per_mtok: None,
                        cache_write_usd_per_mtok: None,
                        cache_write_30m_usd_per_mtok: None,
                        cache_write_12h_usd_per_mtok: None,
                        output_usd_per_mtok: "30".into(),
                        tiers: BTreeMap::new(),
                    },
                )]),
            },
        );
        s.tiers.insert("flex".into(), "0.25".into());
        s.tiers.insert("scale".into(), "3".into());
        PriceTable::from_settings(&s).unwrap()
    }

    #[test]
    fn tiers_by_multiplier_or_by_table() {
        let t = big();
        let out = Usage {
            output_tokens: 1_000_000,
            ..Usage::default()
        };
        // The default model: the built-in priority multiplier (×2), flex overridden (×0.25),
        // an operator's own tier (×3).
        assert_eq!(t.cost("x", STANDARD_TIER, &out), Some(10_000_000_000));
        assert_eq!(t.cost("x", "priority", &out), Some(20_000_000_000));
        assert_eq!(t.cost("x", "flex", &out), Some(2_500_000_000));
        assert_eq!(t.cost("x", "scale", &out), Some(30_000_000_000));
        // A model's own priority table wins over the multiplier; its flex is still one.
        assert_eq!(t.cost("big", "priority", &out), Some(30_000_000_000));
        assert_eq!(t.cost("big", "flex", &out), Some(2_000_000_000));
        // A tier nobody priced is billed at the model's dearest, and says so.
        let (p, known) = t.price_of("big", "turbo");
        assert!(!known);
        assert_eq!(p.output, 30_000_000_000);
        assert!(t.price_of("big", "flex").1);
        assert!(t.tiers().contains("scale"));
        // Every tier's every price is checked at start.
        assert_eq!(t.prices().count(), 4 + 4);
    }

    #[test]
    fn tier_names() {
        assert_eq!(billed_tier(Some("priority"), Some("flex")), "priority");
        assert_eq!(billed_tier(Some("default"), Some("priority")), "standard");
        assert_eq!(billed_tier(None, Some("flex")), "flex");
        assert_eq!(billed_tier(Some("auto"), Some("Priority")), "priority");
        assert_eq!(billed_tier(None, Some("auto")), STANDARD_TIER);
        assert_eq!(billed_tier(None, None), STANDARD_TIER);
        assert_eq!(tier_name("x\n".repeat(40).as_str()).len(), TIER_MAX_CHARS);
    }

    #[test]
    fn cache_writes_by_lifetime() {
        let t = big();
        // 1M input: 100k cached, 600k written (200k for 30 minutes, 300k for 12 hours, 100k
        // of no named lifetime), 300k plain.
        let u = Usage {
            input_tokens: 1_000_000,
            cached_input_tokens: 100_000,
            cache_write_tokens: 600_000,
            cache_write_30m_tokens: 200_000,
            cache_write_12h_tokens: 300_000,
            ..Usage::default()
        };
        let micro = 300_000 * 2_000_000_000i64
            + 100_000 * 200_000_000
            + 200_000 * 2_500_000_000
            + 300_000 * 4_000_000_000
            + 100_000 * 2_500_000_000;
        assert_eq!(t.cost("big", STANDARD_TIER, &u), Some(micro / 1_000_000));
        // Lifetimes that claim more than was written are bounded by it, never negative.
        let odd = Usage {
            input_tokens: 10,
            cache_write_tokens: 4,
            cache_write_30m_tokens: 9,
            cache_write_12h_tokens: 9,
            ..Usage::default()
        };
        let p = t.price_of("big", STANDARD_TIER).0;
        assert_eq!(
            cost(&p, &odd),
            Some((6 * 2_000_000_000 + 4 * 2_500_000_000 + 500_000) / 1_000_000)
        );
        let mut bad = PricingSettings::default();
        bad.tiers.insert("priority".into(), "two".into());
        assert_eq!(
            PriceTable::from_settings(&bad).unwrap_err().0,
            "pricing.tiers.priority"
        );
    }
}
