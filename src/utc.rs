//! Timestamps as operators read them (docs/DESIGN.md#admin): the database keeps UTC without a
//! zone (`TIMESTAMP`), so every admin answer writes it with its zone — `2026-12-07T01:45:15.123456Z`
//! — and no reader has to guess. Serde helpers for `#[serde(serialize_with = …)]`.

use chrono::NaiveDateTime;
use serde::Serializer;

/// RFC 3339, UTC, microseconds.
pub fn text(t: &NaiveDateTime) -> String {
    t.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn serialize<S: Serializer>(t: &NaiveDateTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&text(t))
}

pub fn serialize_opt<S: Serializer>(t: &Option<NaiveDateTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => serialize(t, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_with_its_zone() {
        let t = chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
            .and_then(|d| d.and_hms_micro_opt(1, 45, 15, 123_456))
            .unwrap();
        assert_eq!(super::text(&t), "2026-12-07T01:45:15.123456Z");
    }
}
