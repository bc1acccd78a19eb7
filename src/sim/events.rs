//! Builders of the simulated upstream's events, and the plan of one turn: the exact frames,
//! delays and faults in order. Pure: the connection actor only executes plans.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};

use super::script::{Fault, Script, Terminal, UsageMode};

/// One thing the connection does, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A JSON event (the send time is stamped into it as `sim_ts_ns`).
    Event(Value),
    /// A raw text frame (used for invalid JSON).
    Text(String),
    Binary(Vec<u8>),
    Delay(Duration),
    Close(u16),
    Drop,
    Stall,
}

/// Identifiers of one response.
#[derive(Debug, Clone)]
pub struct Ids {
    pub response: String,
    pub item: String,
    pub call: String,
}

impl Ids {
    /// Ids that share a unique `tag`.
    pub fn new(tag: &str) -> Self {
        Self {
            response: format!("resp_{tag}"),
            item: format!("msg_{tag}"),
            call: format!("call_{tag}"),
        }
    }
}

/// What the socket remembers of a finished response (its connection-local cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remembered {
    pub response_id: String,
    /// `call_id`s of the function calls it produced.
    pub call_ids: Vec<String>,
}

/// The plan of one turn and what the socket remembers once it completes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub steps: VecDeque<Step>,
    pub remembered: Remembered,
    /// Whether the plan ends with a terminal response event (then it is remembered).
    pub completes: bool,
}

const DEFAULT_REPLY: &str = "Hello from the turnpike sim.";
const FILLER: &str = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod ";

/// The wrapped WebSocket error event (`status` present, as Codex requires).
pub fn wrapped_error(status: u16, code: Option<&str>, message: &str, param: Option<&str>) -> Value {
    json!({
        "type": "error",
        "status": status,
        "error": {
            "type": error_type(status),
            "code": code,
            "message": message,
            "param": param,
        }
    })
}

fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// About four characters per token, at least one.
pub fn tokens_of(chars: usize) -> u64 {
    crate::num::count(chars).div_ceil(4).max(1)
}

/// Input tokens derived from the request's `input` and `instructions`.
pub fn input_tokens(req: &Value) -> u64 {
    let input = match req.get("input") {
        Some(Value::String(s)) => s.len(),
        Some(v) => v.to_string().len(),
        None => 0,
    };
    let instructions = req
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, str::len);
    tokens_of(input + instructions)
}

fn response_object(
    req: &Value,
    script: &Script,
    ids: &Ids,
    status: &str,
    created_at: i64,
) -> Value {
    let get = |k: &str| req.get(k).cloned().unwrap_or(Value::Null);
    // The tier that served it: as asked, `auto` resolved to `default`, unless scripted.
    let tier = script.served_tier.clone().unwrap_or_else(|| {
        match req.get("service_tier").and_then(Value::as_str) {
            None | Some("auto") => "default".to_string(),
            Some(t) => t.to_string(),
        }
    });
    json!({
        "service_tier": tier,
        "id": ids.response,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": get("model"),
        "output": [],
        "previous_response_id": get("previous_response_id"),
        "store": req.get("store").and_then(Value::as_bool).unwrap_or(true),
        "usage": null,
        "error": null,
        "incomplete_details": null,
        "instructions": get("instructions"),
        "parallel_tool_calls": req.get("parallel_tool_calls").cloned().unwrap_or(Value::Bool(true)),
        "tool_choice": req.get("tool_choice").cloned().unwrap_or_else(|| json!("auto")),
        "tools": req.get("tools").cloned().unwrap_or_else(|| json!([])),
        "text": {"format": {"type": "text"}},
        "reasoning": {"effort": null, "summary": null},
        "truncation": "disabled",
        "metadata": req.get("metadata").cloned().unwrap_or_else(|| json!({})),
    })
}

/// The text deltas of the reply.
fn text_deltas(script: &Script) -> Vec<String> {
    match script.deltas {
        None => DEFAULT_REPLY
            .split_inclusive(' ')
            .map(str::to_string)
            .collect(),
        Some(n) => {
            // FILLER is ASCII: offsets are byte offsets.
            let len = FILLER.len();
            (0..n)
                .map(|i| {
                    let start = (i * script.delta_size) % len;
                    FILLER
                        .bytes()
                        .cycle()
                        .skip(start)
                        .take(script.delta_size)
                        .map(char::from)
                        .collect()
                })
                .collect()
        }
    }
}

/// Which function tool a tool-call turn calls, and with what arguments.
fn tool_call(req: &Value, wanted: Option<&str>) -> (String, String) {
    let offered: Vec<&str> = req
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let name = wanted
        .map(str::to_string)
        .or_else(|| {
            ["exec_command", "shell"]
                .iter()
                .find(|n| offered.contains(n))
                .map(|n| n.to_string())
        })
        .or_else(|| offered.first().map(|n| n.to_string()))
        .unwrap_or_else(|| "exec_command".into());
    let args = match name.as_str() {
        "shell" => json!({"command": ["echo", "sim-tool-ran"]}),
        _ => json!({"cmd": "echo sim-tool-ran"}),
    };
    (name, args.to_string())
}

struct Usage {
    input: u64,
    cached: u64,
    /// Cache writes kept 30 minutes and 12 hours.
    written: (u64, u64),
    output: u64,
    reasoning: u64,
}

impl Usage {
    fn full(&self) -> Value {
        let mut details = json!({"cached_tokens": self.cached});
        let (w30, w12) = self.written;
        if w30 + w12 > 0 {
            details["cache_write_tokens"] = json!(w30 + w12);
            details["cache_write_tokens_details"] =
                json!({"ttl_30m_tokens": w30, "ttl_12h_tokens": w12});
        }
        json!({
            "input_tokens": self.input,
            "input_tokens_details": details,
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input.saturating_add(self.output),
        })
    }
}

/// Builds the plan of a `response.create` that passed validation.
pub fn plan(req: &Value, script: &Script, ids: &Ids, created_at: i64) -> Plan {
    let warmup = req.get("generate").and_then(Value::as_bool) == Some(false);
    let mut events: Vec<(Value, Duration)> = Vec::new(); // (event, delay before it)
    let mut call_ids = Vec::new();
    let in_progress = response_object(req, script, ids, "in_progress", created_at);
    events.push((
        json!({"type": "response.created", "response": in_progress}),
        script.first_delay,
    ));
    if script.stray {
        let other = json!({"id": format!("{}_stray", ids.response), "object": "response", "status": "completed",
            "output": [], "usage": {"input_tokens": 999, "output_tokens": 999, "total_tokens": 1998}});
        events.push((
            json!({"type": "response.completed", "response": other}),
            Duration::ZERO,
        ));
    }
    for kind in &script.extra {
        let event = json!({"type": kind, "response_id": ids.response, "x_sim": {"note": "an event type the client may not know"}});
        events.push((event, Duration::ZERO));
    }

    let (output_items, output_chars): (Vec<Value>, usize) = if warmup {
        (Vec::new(), 0)
    } else {
        let mut ip = json!({"type": "response.in_progress", "response": in_progress});
        let mut body = Vec::new();
        let (item, chars) = if let Some(wanted) = &script.tool {
            let (name, args) = tool_call(req, wanted.as_deref());
            let fc_id = ids.item.replacen("msg_", "fc_", 1);
            call_ids.push(ids.call.clone());
            let item = |status: &str, arguments: &str| {
                json!({"id": fc_id, "type": "function_call", "status": status,
                       "call_id": ids.call, "name": name, "arguments": arguments})
            };
            body.push(json!({"type": "response.output_item.added", "output_index": 0, "item": item("in_progress", "")}));
            body.push(json!({"type": "response.function_call_arguments.delta", "item_id": fc_id, "output_index": 0, "delta": args}));
            body.push(json!({"type": "response.function_call_arguments.done", "item_id": fc_id, "output_index": 0, "name": name, "arguments": args}));
            let done = item("completed", &args);
            body.push(
                json!({"type": "response.output_item.done", "output_index": 0, "item": done}),
            );
            (done, args.len())
        } else {
            let deltas = text_deltas(script);
            let text: String = deltas.concat();
            let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": [], "logprobs": []});
            let msg = |status: &str, content: Value| json!({"id": ids.item, "type": "message", "status": status, "role": "assistant", "content": content});
            body.push(json!({"type": "response.output_item.added", "output_index": 0, "item": msg("in_progress", json!([]))}));
            body.push(json!({"type": "response.content_part.added", "item_id": ids.item, "output_index": 0, "content_index": 0, "part": part("")}));
            for d in &deltas {
                body.push(json!({"type": "response.output_text.delta", "item_id": ids.item, "output_index": 0, "content_index": 0, "delta": d, "logprobs": []}));
            }
            body.push(json!({"type": "response.output_text.done", "item_id": ids.item, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}));
            body.push(json!({"type": "response.content_part.done", "item_id": ids.item, "output_index": 0, "content_index": 0, "part": part(&text)}));
            let done = msg("completed", json!([part(&text)]));
            body.push(
                json!({"type": "response.output_item.done", "output_index": 0, "item": done}),
            );
            (done, text.len())
        };
        let usage = usage_of(req, script, chars);
        if script.usage == UsageMode::Split {
            ip["response"]["usage"] = json!({
                "input_tokens": usage.input,
                "input_tokens_details": {"cached_tokens": usage.cached},
            });
        }
        events.push((ip, Duration::ZERO));
        let mut seen_delta = false;
        for e in body {
            let is_delta = e["type"].as_str().is_some_and(|t| t.ends_with(".delta"));
            // The delta delay separates deltas: none before the first.
            let delay = if is_delta && seen_delta {
                script.delta_delay
            } else {
                Duration::ZERO
            };
            seen_delta |= is_delta;
            events.push((e, delay));
        }
        (vec![item], chars)
    };

    // The terminal.
    let usage = if warmup {
        // What a warm-up reports (scripted counts: an upstream that ignores the flag).
        Usage {
            input: script.report_input.unwrap_or_else(|| input_tokens(req)),
            cached: 0,
            written: (0, 0),
            output: script.report_output.unwrap_or(0),
            reasoning: 0,
        }
    } else {
        usage_of(req, script, output_chars)
    };
    let (terminal_type, status) = match (warmup, script.terminal) {
        (true, _) | (false, Terminal::Completed) => ("response.completed", "completed"),
        (false, Terminal::Incomplete) => ("response.incomplete", "incomplete"),
        (false, Terminal::Failed) => ("response.failed", "failed"),
    };
    let mut response = response_object(req, script, ids, status, created_at);
    response["output"] = Value::Array(output_items);
    response["usage"] = match script.usage {
        UsageMode::Normal => usage.full(),
        UsageMode::Missing => Value::Null,
        UsageMode::Malformed => json!({"input_tokens": "many", "output_tokens": [1, 2]}),
        UsageMode::Split => json!({
            "input_tokens": 0,
            "output_tokens": usage.output,
            "output_tokens_details": {"reasoning_tokens": usage.reasoning},
            "total_tokens": usage.output,
        }),
    };
    match status {
        "incomplete" => {
            let reason = script.reason.as_deref().unwrap_or("max_output_tokens");
            response["incomplete_details"] = json!({"reason": reason});
        }
        "failed" => {
            let code = script.reason.as_deref().unwrap_or("server_error");
            response["error"] = json!({"code": code, "message": format!("The simulated response failed ({code}).")});
        }
        _ => {}
    }
    events.push((
        json!({"type": terminal_type, "response": response}),
        script.terminal_delay,
    ));
    for kind in &script.trailing {
        let event = json!({"type": kind, "response_id": ids.response, "x_sim": {"note": "sent after the terminal"}});
        events.push((event, Duration::ZERO));
    }

    // Number the events, then place the fault after `after` of them.
    let mut steps = VecDeque::new();
    let mut completes = true;
    let total = events.len();
    let fault_at = script.after.min(total);
    for (i, (mut event, delay)) in events.into_iter().enumerate() {
        if i == fault_at
            && let Some(fault) = &script.fault
        {
            steps.extend(fault_steps(fault, i));
            if !fault.continues() {
                completes = false;
                break;
            }
        }
        if !delay.is_zero() {
            steps.push_back(Step::Delay(delay));
        }
        event["sequence_number"] = json!(i);
        steps.push_back(Step::Event(event));
    }
    if fault_at == total
        && let Some(fault) = &script.fault
    {
        steps.extend(fault_steps(fault, total));
        completes = completes && fault.continues();
    }
    Plan {
        steps,
        remembered: Remembered {
            response_id: ids.response.clone(),
            call_ids,
        },
        completes,
    }
}

fn usage_of(req: &Value, script: &Script, output_chars: usize) -> Usage {
    let input = script.report_input.unwrap_or_else(|| input_tokens(req));
    Usage {
        input,
        cached: script.cached_tokens.min(input),
        written: (script.cache_write_30m, script.cache_write_12h),
        output: script
            .report_output
            .unwrap_or_else(|| tokens_of(output_chars) + script.reasoning_tokens),
        reasoning: script.reasoning_tokens,
    }
}

fn fault_steps(fault: &Fault, seq: usize) -> Vec<Step> {
    match fault {
        Fault::Error { code, status } => {
            let mut e = wrapped_error(
                *status,
                Some(code),
                &format!("Simulated error {code}."),
                None,
            );
            e["sequence_number"] = json!(seq);
            vec![Step::Event(e)]
        }
        Fault::ConnectionError(code) => {
            let e = wrapped_error(0, Some(code), &format!("Simulated error {code}."), None);
            // Raw text: events are tagged with their lane, this one belongs to none.
            vec![Step::Text(e.to_string()), Step::Stall]
        }
        Fault::Close(code) => vec![Step::Close(*code)],
        Fault::Drop => vec![Step::Drop],
        Fault::Stall => vec![Step::Stall],
        Fault::HeadDelay(_) => Vec::new(),
        Fault::Binary => vec![Step::Binary(b"\x00\x01sim-binary".to_vec())],
        Fault::InvalidJson => vec![Step::Text(
            "{\"type\": \"response.output_text.delta\", oops".into(),
        )],
        Fault::Oversize(bytes) => {
            let base = json!({"type": "response.output_text.delta", "item_id": "msg_oversize", "output_index": 0, "content_index": 0, "delta": ""});
            let pad = bytes.saturating_sub(base.to_string().len());
            let mut e = base;
            e["delta"] = json!("x".repeat(pad));
            vec![Step::Event(e)]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(plan: &Plan) -> Vec<&Value> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    fn types(plan: &Plan) -> Vec<String> {
        events(plan)
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_string())
            .collect()
    }

    fn req() -> Value {
        json!({"type": "response.create", "model": "gpt-test", "input": "Say hello", "store": false})
    }

    #[test]
    fn text_turn_sequence() {
        let p = plan(&req(), &Script::default(), &Ids::new("t1"), 1);
        let t = types(&p);
        assert_eq!(t[0], "response.created");
        assert_eq!(t[1], "response.in_progress");
        assert_eq!(t[2], "response.output_item.added");
        assert_eq!(t[3], "response.content_part.added");
        assert!(
            t[4..t.len() - 4]
                .iter()
                .all(|t| t == "response.output_text.delta")
        );
        assert_eq!(
            &t[t.len() - 4..],
            [
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let ev = events(&p);
        for (i, e) in ev.iter().enumerate() {
            assert_eq!(e["sequence_number"], i);
        }
        // Deltas carry no response id.
        assert!(ev[4].get("response").is_none() && ev[4].get("response_id").is_none());
        let done = ev.last().unwrap();
        assert_eq!(done["response"]["id"], "resp_t1");
        let u = &done["response"]["usage"];
        assert_eq!(u["input_tokens"], tokens_of("Say hello".len()));
        let text = DEFAULT_REPLY;
        assert_eq!(u["output_tokens"], tokens_of(text.len()));
        assert_eq!(
            u["total_tokens"],
            u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap()
        );
        assert!(p.completes);
    }

    #[test]
    fn warmup_is_created_and_completed() {
        let mut r = req();
        r["generate"] = json!(false);
        let p = plan(&r, &Script::default(), &Ids::new("w"), 1);
        assert_eq!(types(&p), ["response.created", "response.completed"]);
        assert_eq!(events(&p)[1]["response"]["usage"]["output_tokens"], 0);
        assert_eq!(events(&p)[1]["response"]["id"], "resp_w");
    }

    #[test]
    fn delays_are_placed() {
        let s =
            Script::parse("first_delay_ms=150 delta_delay_ms=10 terminal_delay_ms=300 deltas=3")
                .unwrap();
        let p = plan(&req(), &s, &Ids::new("d"), 1);
        let mut delays = Vec::new();
        let mut last_type = String::new();
        for step in &p.steps {
            match step {
                Step::Delay(d) => delays.push((d.as_millis(), last_type.clone())),
                Step::Event(e) => last_type = e["type"].as_str().unwrap().into(),
                _ => {}
            }
        }
        // 150 before created; 10 between deltas (2 gaps); 300 before the terminal.
        assert_eq!(delays[0], (150, String::new()));
        assert_eq!(delays[1], (10, "response.output_text.delta".into()));
        assert_eq!(delays[2], (10, "response.output_text.delta".into()));
        assert_eq!(delays[3], (300, "response.output_item.done".into()));
        assert_eq!(delays.len(), 4);
        let deltas: Vec<_> = events(&p)
            .into_iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .collect();
        assert_eq!(deltas.len(), 3);
        assert!(
            deltas
                .iter()
                .all(|d| d["delta"].as_str().unwrap().len() == 8)
        );
    }

    #[test]
    fn faults_cut_or_interleave() {
        let s = Script::parse("close=1012 after=2").unwrap();
        let p = plan(&req(), &s, &Ids::new("c"), 1);
        assert_eq!(events(&p).len(), 2);
        assert_eq!(p.steps.back(), Some(&Step::Close(1012)));
        assert!(!p.completes);

        let s = Script::parse("binary after=1").unwrap();
        let p = plan(&req(), &s, &Ids::new("b"), 1);
        assert!(matches!(p.steps[1], Step::Binary(_)));
        assert!(p.completes, "a binary frame does not end the response");

        let s = Script::parse("error=server_is_overloaded status=503").unwrap();
        let p = plan(&req(), &s, &Ids::new("e"), 1);
        let ev = events(&p);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["status"], 503);
        assert_eq!(ev[0]["error"]["code"], "server_is_overloaded");
        assert_eq!(ev[0]["error"]["type"], "server_error");

        let s = Script::parse("oversize=70000 after=4").unwrap();
        let p = plan(&req(), &s, &Ids::new("o"), 1);
        let big = events(&p)[4].to_string();
        assert!((69_990..=70_010).contains(&big.len()), "{}", big.len());
    }

    #[test]
    fn usage_modes() {
        let last = |s: &str| {
            let p = plan(&req(), &Script::parse(s).unwrap(), &Ids::new("u"), 1);
            let ev = events(&p);
            (
                ev[1]["response"]["usage"].clone(),
                ev.last().unwrap()["response"]["usage"].clone(),
            )
        };
        assert!(last("usage=missing").1.is_null());
        assert!(last("usage=malformed").1["input_tokens"].is_string());
        let (first, terminal) = last("usage=split");
        assert!(first["input_tokens"].as_u64().unwrap() > 0);
        assert_eq!(terminal["input_tokens"], 0);
        assert!(terminal["output_tokens"].as_u64().unwrap() > 0);
        let (_, t) = last("cached=1 reasoning=5");
        assert_eq!(t["input_tokens_details"]["cached_tokens"], 1);
        assert_eq!(t["output_tokens_details"]["reasoning_tokens"], 5);
        let (_, t) = last("cache_write_30m=3 cache_write_12h=4");
        let d = &t["input_tokens_details"];
        assert_eq!(d["cache_write_tokens"], 7);
        assert_eq!(d["cache_write_tokens_details"]["ttl_12h_tokens"], 4);
    }

    #[test]
    fn service_tiers() {
        let tier = |r: Value, s: &str| {
            let p = plan(&r, &Script::parse(s).unwrap(), &Ids::new("t"), 1);
            events(&p).last().unwrap()["response"]["service_tier"].clone()
        };
        assert_eq!(tier(req(), ""), "default");
        let mut r = req();
        r["service_tier"] = "priority".into();
        assert_eq!(tier(r.clone(), ""), "priority");
        assert_eq!(tier(r, "served_tier=flex"), "flex");
    }

    #[test]
    fn terminals() {
        let p = plan(
            &req(),
            &Script::parse("terminal=failed reason=rate_limit_exceeded").unwrap(),
            &Ids::new("f"),
            1,
        );
        let t = (*events(&p).last().unwrap()).clone();
        assert_eq!(t["type"], "response.failed");
        assert_eq!(t["response"]["error"]["code"], "rate_limit_exceeded");
        let p = plan(
            &req(),
            &Script::parse("terminal=incomplete").unwrap(),
            &Ids::new("i"),
            1,
        );
        let t = (*events(&p).last().unwrap()).clone();
        assert_eq!(
            t["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }

    #[test]
    fn tool_call_uses_an_offered_tool() {
        let mut r = req();
        r["tools"] = json!([{"type": "function", "name": "read_file"}, {"type": "function", "name": "exec_command"}]);
        let p = plan(&r, &Script::parse("tool").unwrap(), &Ids::new("x"), 1);
        let t = types(&p);
        assert!(t.contains(&"response.function_call_arguments.delta".to_string()));
        let done = (*events(&p).last().unwrap()).clone();
        let item = &done["response"]["output"][0];
        assert_eq!(item["type"], "function_call");
        assert_eq!(item["name"], "exec_command");
        assert_eq!(item["call_id"], "call_x");
        assert_eq!(p.remembered.call_ids, ["call_x"]);
    }
}

/// The directive of a request: `metadata.sim`, else a `[[sim: …]]` marker in the latest user
/// text — only when no tool output follows that text, so a tool loop does not repeat itself.
pub fn directive_of(req: &Value) -> Option<String> {
    if let Some(d) = req.pointer("/metadata/sim").and_then(Value::as_str) {
        return Some(d.to_string());
    }
    let text = latest_user_text(req.get("input")?)?;
    super::script::find_marker(&text).map(str::to_string)
}

fn latest_user_text(input: &Value) -> Option<String> {
    match input {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            for item in items.iter().rev() {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                if kind.ends_with("_output") {
                    return None;
                }
                if kind == "message" && item.get("role").and_then(Value::as_str) == Some("user") {
                    return Some(match item.get("content") {
                        Some(Value::String(s)) => s.clone(),
                        Some(Value::Array(parts)) => parts
                            .iter()
                            .filter_map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Vec<_>>()
                            .join("\n"),
                        _ => String::new(),
                    });
                }
            }
            None
        }
        _ => None,
    }
}

/// Checks a `response.create` against what the socket (or the store, for `store:true`
/// responses) remembers. The error is the wrapped event the real service would send.
pub fn check_request(req: &Value, known: impl Fn(&str) -> Option<Remembered>) -> Result<(), Value> {
    match req.get("model") {
        Some(Value::String(m)) if !m.is_empty() => {}
        _ => {
            return Err(wrapped_error(
                400,
                Some("missing_required_parameter"),
                "Missing required parameter: 'model'.",
                Some("model"),
            ));
        }
    }
    let mut known_calls: Vec<String> = Vec::new();
    if let Some(prev) = req.get("previous_response_id").filter(|v| !v.is_null()) {
        let id = prev.as_str().unwrap_or_default();
        match known(id) {
            Some(r) => known_calls.extend(r.call_ids),
            None => {
                return Err(wrapped_error(
                    400,
                    Some("previous_response_not_found"),
                    &format!("Previous response with id '{id}' not found."),
                    Some("previous_response_id"),
                ));
            }
        }
    }
    let items = req
        .get("input")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let call_id = |i: &Value| i.get("call_id").and_then(Value::as_str).map(str::to_string);
    known_calls.extend(
        items
            .iter()
            .filter(|i| {
                i.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.ends_with("_call"))
            })
            .filter_map(call_id),
    );
    for item in &items {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or_default();
        if kind.ends_with("_call_output")
            && let Some(id) = call_id(item)
            && !known_calls.contains(&id)
        {
            return Err(wrapped_error(
                400,
                None,
                &format!("No tool call found for function call output with call_id {id}."),
                Some("input"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod request_tests {
    use super::*;

    fn none(_: &str) -> Option<Remembered> {
        None
    }

    #[test]
    fn directive_sources() {
        let r = json!({"input": "hi [[sim: deltas=2]]"});
        assert_eq!(directive_of(&r).as_deref(), Some("deltas=2"));
        let r = json!({"input": "x [[sim: deltas=2]]", "metadata": {"sim": "drop"}});
        assert_eq!(directive_of(&r).as_deref(), Some("drop"));
        let r = json!({"input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go [[sim: tool]]"}]},
        ]});
        assert_eq!(directive_of(&r).as_deref(), Some("tool"));
        // A tool output after the user text: the loop ends with a normal reply.
        let r = json!({"input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "go [[sim: tool]]"}]},
            {"type": "function_call", "call_id": "c1", "name": "exec_command", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ]});
        assert_eq!(directive_of(&r), None);
    }

    #[test]
    fn continuation_and_tool_outputs() {
        let rem = Remembered {
            response_id: "resp_a".into(),
            call_ids: vec!["call_a".into()],
        };
        let known = |id: &str| (id == "resp_a").then(|| rem.clone());
        let ok = json!({"model": "m", "previous_response_id": "resp_a",
            "input": [{"type": "function_call_output", "call_id": "call_a", "output": "x"}]});
        check_request(&ok, known).unwrap();
        let e = check_request(
            &json!({"model": "m", "previous_response_id": "resp_b"}),
            known,
        )
        .unwrap_err();
        assert_eq!(
            (e["status"].as_u64(), e["error"]["code"].as_str()),
            (Some(400), Some("previous_response_not_found"))
        );
        let orphan = json!({"model": "m", "input": [{"type": "function_call_output", "call_id": "call_z", "output": "x"}]});
        let e = check_request(&orphan, none).unwrap_err();
        assert_eq!(
            e["error"]["message"],
            "No tool call found for function call output with call_id call_z."
        );
        let inline = json!({"model": "m", "input": [
            {"type": "function_call", "call_id": "call_z", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_z", "output": "x"}]});
        check_request(&inline, none).unwrap();
        let e = check_request(&json!({"input": "x"}), none).unwrap_err();
        assert_eq!(e["error"]["param"], "model");
    }
}
