//! Token usage: extraction from a terminal event with fallbacks, and a defensive merge.

use serde_json::Value;

/// Token counts of one turn. All fields are counts; `None` in the source counts as absent.
/// Records spooled before a field existed read it as zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    /// Every cache write (at least the two below together).
    pub cache_write_tokens: u64,
    /// Cache writes kept 30 minutes (`cache_write_tokens_details.ttl_30m_tokens`).
    pub cache_write_30m_tokens: u64,
    /// Cache writes kept 12 hours (`cache_write_tokens_details.ttl_12h_tokens`).
    pub cache_write_12h_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub total_tokens: u64,
}

/// Why a usage could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// `usage` is present but is not an object of numbers (counted in a metric; never applied).
    Malformed(String),
}

impl Usage {
    /// Reads `response.usage` (else a top-level `usage`) of an event. `Ok(None)`: no usage.
    pub fn from_event(event: &Value) -> Result<Option<Usage>, UsageError> {
        let usage = event
            .pointer("/response/usage")
            .filter(|u| !u.is_null())
            .or_else(|| event.get("usage").filter(|u| !u.is_null()));
        usage.map(Usage::from_value).transpose()
    }

    /// Parses a usage object, accepting the chat-style aliases.
    pub fn from_value(v: &Value) -> Result<Usage, UsageError> {
        let obj = v
            .as_object()
            .ok_or_else(|| UsageError::Malformed(format!("usage is not an object: {v}")))?;
        let count = |path: &[&str]| -> Result<Option<u64>, UsageError> {
            let mut cur = Some(v);
            for key in path {
                cur = match cur {
                    Some(Value::Object(m)) => m.get(*key),
                    Some(Value::Null) | None => None,
                    Some(other) => {
                        return Err(UsageError::Malformed(format!(
                            "{} is not an object: {other}",
                            path.join(".")
                        )));
                    }
                };
            }
            match cur {
                None | Some(Value::Null) => Ok(None),
                Some(n) => n.as_u64().map(Some).ok_or_else(|| {
                    UsageError::Malformed(format!("{} is not a count: {n}", path.join(".")))
                }),
            }
        };
        let first = |paths: &[&[&str]]| -> Result<u64, UsageError> {
            for p in paths {
                if let Some(n) = count(p)? {
                    return Ok(n);
                }
            }
            Ok(0)
        };
        let _ = obj;
        let input = first(&[&["input_tokens"], &["prompt_tokens"]])?;
        let output = first(&[&["output_tokens"], &["completion_tokens"]])?;
        // The lifetimes of cache writes, under `input_tokens_details` or beside it.
        let lifetime = |ttl: &str| {
            first(&[
                &["input_tokens_details", "cache_write_tokens_details", ttl],
                &["cache_write_tokens_details", ttl],
            ])
        };
        let (w30, w12) = (lifetime("ttl_30m_tokens")?, lifetime("ttl_12h_tokens")?);
        let usage = Usage {
            input_tokens: input,
            cached_input_tokens: first(&[
                &["input_tokens_details", "cached_tokens"],
                &["prompt_tokens_details", "cached_tokens"],
            ])?,
            // Writes split by lifetime are writes, whether or not the total says so.
            cache_write_tokens: first(&[
                &["input_tokens_details", "cache_write_tokens"],
                &["prompt_tokens_details", "cache_write_tokens"],
            ])?
            .max(w30.saturating_add(w12)),
            cache_write_30m_tokens: w30,
            cache_write_12h_tokens: w12,
            output_tokens: output,
            reasoning_tokens: first(&[
                &["output_tokens_details", "reasoning_tokens"],
                &["completion_tokens_details", "reasoning_tokens"],
            ])?,
            total_tokens: first(&[&["total_tokens"]])?,
        };
        Ok(usage)
    }

    /// Merges a later observation: a later zero never overwrites an earlier non-zero value.
    pub fn merge(&mut self, later: &Usage) {
        let keep = |mine: &mut u64, theirs: u64| {
            if theirs != 0 {
                *mine = theirs;
            }
        };
        keep(&mut self.input_tokens, later.input_tokens);
        keep(&mut self.cached_input_tokens, later.cached_input_tokens);
        keep(&mut self.cache_write_tokens, later.cache_write_tokens);
        keep(
            &mut self.cache_write_30m_tokens,
            later.cache_write_30m_tokens,
        );
        keep(
            &mut self.cache_write_12h_tokens,
            later.cache_write_12h_tokens,
        );
        keep(&mut self.output_tokens, later.output_tokens);
        keep(&mut self.reasoning_tokens, later.reasoning_tokens);
        keep(&mut self.total_tokens, later.total_tokens);
    }

    /// `total_tokens` when reported, else input + output.
    pub fn total(&self) -> u64 {
        if self.total_tokens != 0 {
            self.total_tokens
        } else {
            self.input_tokens + self.output_tokens
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }
}

/// Output tokens estimated from streamed text: about four characters per token.
pub fn estimate_tokens(chars: usize) -> u64 {
    crate::num::count(chars).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_usage() {
        let e = json!({"type": "response.completed", "response": {"usage": {
            "input_tokens": 12, "input_tokens_details": {"cached_tokens": 4, "cache_write_tokens": 2},
            "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 17}}});
        let u = Usage::from_event(&e).unwrap().unwrap();
        assert_eq!(
            u,
            Usage {
                input_tokens: 12,
                cached_input_tokens: 4,
                cache_write_tokens: 2,
                output_tokens: 5,
                reasoning_tokens: 1,
                total_tokens: 17,
                ..Usage::default()
            }
        );
    }

    #[test]
    fn cache_write_lifetimes() {
        let e = json!({"response": {"usage": {"input_tokens": 100, "input_tokens_details": {
            "cached_tokens": 10, "cache_write_tokens": 50,
            "cache_write_tokens_details": {"ttl_30m_tokens": 20, "ttl_12h_tokens": 30}},
            "output_tokens": 1}}});
        let u = Usage::from_event(&e).unwrap().unwrap();
        assert_eq!(
            (
                u.cache_write_tokens,
                u.cache_write_30m_tokens,
                u.cache_write_12h_tokens
            ),
            (50, 20, 30)
        );
        // Beside `input_tokens_details`, and with no total: the lifetimes are the writes.
        let e = json!({"usage": {"input_tokens": 100, "cache_write_tokens_details": {"ttl_12h_tokens": 7}}});
        let u = Usage::from_event(&e).unwrap().unwrap();
        assert_eq!((u.cache_write_tokens, u.cache_write_12h_tokens), (7, 7));
        let bad = json!({"usage": {"input_tokens": 1, "cache_write_tokens_details": {"ttl_30m_tokens": "x"}}});
        assert!(Usage::from_event(&bad).is_err());
        // A spooled record of before the lifetimes reads them as zero.
        let old: Usage =
            serde_json::from_value(json!({"input_tokens": 3, "cached_input_tokens": 0,
            "cache_write_tokens": 1, "output_tokens": 1, "reasoning_tokens": 0, "total_tokens": 4}))
            .unwrap();
        assert_eq!((old.cache_write_tokens, old.cache_write_30m_tokens), (1, 0));
    }

    #[test]
    fn aliases_nulls_and_top_level() {
        let e = json!({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 1}}});
        let u = Usage::from_event(&e).unwrap().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.total()
            ),
            (3, 4, 1, 7)
        );
        let e = json!({"response": {"usage": {"input_tokens": 2, "input_tokens_details": null, "output_tokens": 1, "output_tokens_details": null}}});
        assert_eq!(
            Usage::from_event(&e).unwrap().unwrap().cached_input_tokens,
            0
        );
        assert_eq!(
            Usage::from_event(&json!({"response": {"usage": null}})).unwrap(),
            None
        );
        assert_eq!(Usage::from_event(&json!({"type": "x"})).unwrap(), None);
    }

    #[test]
    fn malformed_is_never_half_applied() {
        for bad in [
            json!("oops"),
            json!({"input_tokens": "many"}),
            json!({"input_tokens": 3, "output_tokens": [1]}),
            json!({"input_tokens": -1}),
            json!({"input_tokens_details": 5}),
        ] {
            let e = json!({"response": {"usage": bad}});
            assert!(Usage::from_event(&e).is_err(), "{e}");
        }
    }

    #[test]
    fn merge_keeps_earlier_non_zero() {
        let mut u = Usage {
            input_tokens: 10,
            cached_input_tokens: 2,
            ..Usage::default()
        };
        u.merge(&Usage {
            input_tokens: 0,
            output_tokens: 7,
            ..Usage::default()
        });
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (10, 2, 7)
        );
        u.merge(&Usage {
            input_tokens: 11,
            ..Usage::default()
        });
        assert_eq!(u.input_tokens, 11);
    }

    #[test]
    fn estimate() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(9), 3);
    }
}
