//! Usage export (docs/DESIGN.md#retention): `usage_logs` rows as CSV or JSON lines, read a page
//! at a time and written as they come — the CLI to stdout, the admin API as a streamed body —
//! so an export of millions of rows holds one page in memory. One list of columns serves both
//! formats and both callers.

use bytes::Bytes;
use chrono::NaiveDateTime;
use futures_util::Stream;
use serde_json::{Value, json};

use crate::db::models::UsageRow;
use crate::db::queries::usage::{ExportFilter, ExportRow};
use crate::db::{DbError, DbPool, queries};

/// Rows read per page.
const PAGE: i64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "csv" => Some(Self::Csv),
            "jsonl" | "ndjson" => Some(Self::Jsonl),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Csv => "text/csv; charset=utf-8",
            Self::Jsonl => "application/x-ndjson",
        }
    }
}

/// A time bound as operators write it: a day (`2026-12-01`, its midnight UTC) or an RFC 3339
/// instant (`2026-12-01T12:00:00Z`, any offset, converted to UTC).
pub fn parse_time(field: &str, text: &str) -> Result<NaiveDateTime, String> {
    let t = text.trim();
    if let Ok(day) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN));
    }
    chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| d.naive_utc())
        .map_err(|_| format!("{field}: expected YYYY-MM-DD or an RFC 3339 time, got {t:?}"))
}

/// The columns, in order: the CSV header and the JSON keys.
pub const COLUMNS: [&str; 29] = [
    "id",
    "request_id",
    "accepted_at",
    "key_prefix",
    "user",
    "session_id",
    "turn_index",
    "account",
    "model",
    "service_tier",
    "status",
    "usage_source",
    "origin",
    "transport",
    "upstream_transport",
    "warmup",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "cache_write_30m_tokens",
    "cache_write_12h_tokens",
    "output_tokens",
    "reasoning_tokens",
    "total_tokens",
    "cost_nanousd",
    "first_token_ms",
    "duration_ms",
    "error_code",
    "response_id",
];

/// A row's values, in `COLUMNS` order.
fn values(r: &UsageRow, key_prefix: &str, user: &str) -> [Value; 29] {
    [
        json!(r.id),
        json!(r.request_id),
        json!(crate::utc::text(&r.accepted_at)),
        json!(key_prefix),
        json!(user),
        json!(r.session_id),
        json!(r.turn_index),
        json!(r.account),
        json!(r.model),
        json!(r.service_tier),
        json!(r.status),
        json!(r.usage_source),
        json!(r.origin),
        json!(r.transport),
        json!(r.upstream_transport),
        json!(r.warmup),
        json!(r.input_tokens),
        json!(r.cached_input_tokens),
        json!(r.cache_write_tokens),
        json!(r.cache_write_30m_tokens),
        json!(r.cache_write_12h_tokens),
        json!(r.output_tokens),
        json!(r.reasoning_tokens),
        json!(r.total_tokens),
        json!(r.cost_nanousd),
        json!(r.first_token_ms),
        json!(r.duration_ms),
        json!(r.error_code),
        json!(r.response_id),
    ]
}

/// One CSV field (RFC 4180): quoted when it holds a comma, a quote or a line break; a field that
/// a spreadsheet would run as a formula (`=`, `+`, `-`, `@` first) gets a leading `'`.
fn csv_field(v: &Value) -> String {
    let text = match v {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => return other.to_string(),
    };
    let text = if text.starts_with(['=', '+', '-', '@']) {
        format!("'{text}")
    } else {
        text
    };
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    }
}

/// A day's cache hit rate: cached input over input (`None` without input).
pub fn hit_rate(d: &crate::db::models::DailyRow) -> Option<f64> {
    (d.input_tokens > 0).then(|| {
        crate::num::f64_of_i64(d.cached_input_tokens) / crate::num::f64_of_i64(d.input_tokens)
    })
}

/// What comes before the rows (the CSV header).
pub fn header(format: Format) -> String {
    match format {
        Format::Csv => format!("{}\r\n", COLUMNS.join(",")),
        Format::Jsonl => String::new(),
    }
}

/// One row, with its line ending.
pub fn line(format: Format, row: &ExportRow) -> String {
    let vals = values(&row.usage, &row.key_prefix, &row.user);
    match format {
        Format::Csv => {
            let fields: Vec<String> = vals.iter().map(csv_field).collect();
            format!("{}\r\n", fields.join(","))
        }
        Format::Jsonl => {
            let obj: serde_json::Map<String, Value> =
                COLUMNS.iter().map(|c| (*c).to_string()).zip(vals).collect();
            format!("{}\n", Value::Object(obj))
        }
    }
}

/// The export as a stream of chunks (the header, then a chunk per page), oldest row first.
/// Pages go by id, so rows written while it runs are either in it or after it, never twice.
pub fn stream(
    db: DbPool,
    filter: ExportFilter,
    format: Format,
) -> impl Stream<Item = Result<Bytes, DbError>> {
    // No empty chunk: a zero-length chunk ends an HTTP/1.1 chunked body.
    let start = (Some(header(format)).filter(|h| !h.is_empty()), 0_i64, false);
    futures_util::stream::try_unfold(start, move |(head, after, done)| {
        let db = db.clone();
        let filter = filter.clone();
        async move {
            if let Some(h) = head {
                return Ok(Some((Bytes::from(h), (None, after, false))));
            }
            if done {
                return Ok(None);
            }
            let rows = queries::usage::export_page(&db, &filter, after, PAGE).await?;
            let Some(last) = rows.last().map(|r| r.usage.id) else {
                return Ok(None);
            };
            let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) >= PAGE;
            let chunk: String = rows.iter().map(|r| line(format, r)).collect();
            Ok(Some((Bytes::from(chunk), (None, last, !full))))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field(&json!("plain")), "plain");
        assert_eq!(csv_field(&json!("a,b")), "\"a,b\"");
        assert_eq!(csv_field(&json!("say \"hi\"")), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field(&json!("=cmd()")), "'=cmd()");
        assert_eq!(csv_field(&json!(-5)), "-5", "numbers stay numbers");
        assert_eq!(csv_field(&Value::Null), "");
    }

    #[test]
    fn times_as_days_or_instants() {
        assert_eq!(
            parse_time("from", "2026-12-01").unwrap().to_string(),
            "2026-12-01 00:00:00"
        );
        assert_eq!(
            parse_time("to", "2026-12-01T12:00:00+02:00")
                .unwrap()
                .to_string(),
            "2026-12-01 10:00:00"
        );
        assert!(
            parse_time("from", "yesterday")
                .unwrap_err()
                .contains("from")
        );
    }
}
