//! Integer nano-USD amounts (1 USD = 10^9 nano-USD). Amounts never pass through floats: a
//! decimal string is parsed digit by digit, and more than nine decimals is an error rather than
//! a silent rounding.

pub const NANOS_PER_USD: i64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not a USD amount (expected digits with an optional '.', e.g. 12.50)")]
    Syntax(String),
    #[error("{0:?} has more than 9 decimals (the smallest unit is one nano-USD)")]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    Overflow(String),
    #[error("{0:?} must not be negative")]
    Negative(String),
}

/// Parses a non-negative decimal USD amount (`"12"`, `"0.5"`, `"3.000000001"`) into nano-USD.
pub fn parse_usd(text: &str) -> Result<i64, MoneyError> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(MoneyError::Negative(text.into()));
    }
    let t = t.strip_prefix('$').unwrap_or(t);
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) {
        return Err(MoneyError::Syntax(text.into()));
    }
    if frac.len() > 9 {
        return Err(MoneyError::TooPrecise(text.into()));
    }
    let overflow = || MoneyError::Overflow(text.into());
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    let frac_nanos: i64 = if frac.is_empty() {
        0
    } else {
        // "5" → 500_000_000: pad to nine digits.
        format!("{frac:0<9}").parse().map_err(|_| overflow())?
    };
    whole
        .checked_mul(NANOS_PER_USD)
        .and_then(|n| n.checked_add(frac_nanos))
        .ok_or_else(overflow)
}

/// Formats nano-USD as a USD decimal with trailing zeros trimmed (`12.5`, `0.000000001`, `-3`).
pub fn format_usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let abs = nanos.unsigned_abs();
    let per = NANOS_PER_USD.unsigned_abs();
    let (whole, frac) = (abs / per, abs % per);
    if frac == 0 {
        format!("{sign}{whole}")
    } else {
        let frac = format!("{frac:09}");
        format!("{sign}{whole}.{}", frac.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!(parse_usd("12").unwrap(), 12 * NANOS_PER_USD);
        assert_eq!(parse_usd("12.5").unwrap(), 12_500_000_000);
        assert_eq!(parse_usd("0.000000001").unwrap(), 1);
        assert_eq!(parse_usd(".25").unwrap(), 250_000_000);
        assert_eq!(parse_usd("$3.").unwrap(), 3 * NANOS_PER_USD);
        // 0.1 + 0.2 style float error cannot happen.
        assert_eq!(parse_usd("0.3").unwrap(), parse_usd("0.1").unwrap() * 3);
    }

    #[test]
    fn rejects_bad_amounts() {
        assert!(matches!(parse_usd("abc"), Err(MoneyError::Syntax(_))));
        assert!(matches!(parse_usd("1.2.3"), Err(MoneyError::Syntax(_))));
        assert!(matches!(parse_usd("."), Err(MoneyError::Syntax(_))));
        assert!(matches!(parse_usd("1e3"), Err(MoneyError::Syntax(_))));
        assert!(matches!(parse_usd("-1"), Err(MoneyError::Negative(_))));
        assert!(matches!(
            parse_usd("0.0000000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        assert!(matches!(
            parse_usd("99999999999"),
            Err(MoneyError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for n in [
            0,
            1,
            999_999_999,
            1_000_000_000,
            12_500_000_000,
            -3_000_000_000,
            i64::MAX,
        ] {
            let text = format_usd(n);
            if n >= 0 {
                assert_eq!(parse_usd(&text).unwrap(), n, "{text}");
            }
        }
        assert_eq!(format_usd(12_500_000_000), "12.5");
        assert_eq!(format_usd(-1), "-0.000000001");
        assert_eq!(format_usd(i64::MIN), "-9223372036.854775808");
    }
}
