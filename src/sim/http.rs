//! The sim's HTTP surface: `POST /v1/responses` (the JSON response, or SSE with `stream: true`)
//! and `POST /v1/responses/compact`, from the same plans and directives as WebSocket turns.
//!
//! Faults over HTTP: an `error=CODE status=N` fault before the first event (`after=0`, the
//! default) is the HTTP status with the JSON error (429, 5xx… before any byte); later it is an
//! SSE `error` event. `close`/`drop` cut the body (no terminal); `stall` sends nothing more;
//! `first_delay_ms` delays the first event (and the JSON answer); `head_delay_ms` delays the
//! answer's head itself.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::events::{self, Ids, Step};
use super::script::{Fault, Script};
use super::server::{SimShared, error_response};

/// What the request asks for, checked; `Err` is the HTTP answer of a refused request.
fn prepare(
    req: &HttpRequest,
    body: &[u8],
    shared: &SimShared,
) -> Result<(Value, Script), Box<HttpResponse>> {
    if let Some(refused) = shared.refusal(req) {
        return Err(Box::new(refused));
    }
    let request: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return Err(Box::new(error_response(
                400,
                None,
                "We could not parse the JSON body of your request.",
                None,
            )));
        }
    };
    let directive = events::directive_of(&request);
    let mut script = match directive.as_deref().map(Script::parse) {
        None => Script::default(),
        Some(Ok(s)) => s,
        Some(Err(why)) => {
            return Err(Box::new(error_response(
                400,
                Some("invalid_sim_directive"),
                &why,
                Some("metadata.sim"),
            )));
        }
    };
    if script.once && !shared.fire_once(directive.as_deref().unwrap_or_default()) {
        script.fault = None;
    }
    shared.http_request(req.path(), req.headers(), body);
    if let Some(Fault::Error { code, status }) = &script.fault
        && script.after == 0
    {
        let mut res = error_response(
            *status,
            Some(code),
            &format!("Simulated error {code}."),
            None,
        );
        if let Some(s) = script.retry_after {
            res.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(s),
            );
        }
        return Err(Box::new(res));
    }
    Ok((request, script))
}

/// `POST /v1/responses`.
pub async fn create(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<SimShared>,
) -> HttpResponse {
    let shared = shared.into_inner();
    let (request, script) = match prepare(&req, &body, &shared) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    if let Some(Fault::HeadDelay(wait)) = script.fault {
        tokio::time::sleep(wait).await;
    }
    if let Err(e) = events::check_request(&request, |id| shared.stored(id)) {
        let status = e["status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(400);
        return HttpResponse::build(
            actix_web::http::StatusCode::from_u16(status)
                .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
        )
        .json(json!({"error": e["error"]}));
    }
    let (_, tag) = shared.next_tag();
    let plan = events::plan(
        &request,
        &script,
        &Ids::new(&tag),
        chrono::Utc::now().timestamp(),
    );
    shared.http_response_started();
    let store = request
        .get("store")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let run = Run {
        steps: plan.steps,
        remembered: plan.completes.then_some(plan.remembered),
        store,
        shared: shared.clone(),
        finished: false,
    };
    let streaming = request.get("stream").and_then(Value::as_bool) == Some(true);
    let mut res = HttpResponse::Ok();
    upstream_headers(&mut res, &request, &tag);
    if streaming {
        return res
            .content_type("text/event-stream")
            .insert_header(("cache-control", "no-cache"))
            .streaming(run.sse());
    }
    res.content_type("application/json").streaming(run.json())
}

/// The headers the upstream answers a response request with: the model that served it, the
/// request id, rate-limit usage, and the account's identity and cookies (a relay must not pass
/// those two on).
fn upstream_headers(res: &mut actix_web::HttpResponseBuilder, request: &Value, tag: &str) {
    let model = request.get("model").and_then(Value::as_str).unwrap_or("");
    res.insert_header(("openai-model", model))
        .insert_header(("x-request-id", format!("req_sim_{tag}")))
        .insert_header(("x-codex-primary-used-percent", "12"))
        .insert_header(("x-reasoning-included", "true"))
        .insert_header(("openai-organization", "org-sim-upstream"))
        .insert_header(("set-cookie", "__sim_session=upstream; Path=/"));
}

/// `POST /v1/responses/compact`: the input compacted into one opaque item, billed from the
/// input's size (the directive's delays, `report_input`/`report_output` and error faults apply).
pub async fn compact(
    req: HttpRequest,
    body: web::Bytes,
    shared: web::Data<SimShared>,
) -> HttpResponse {
    let shared = shared.into_inner();
    let (request, script) = match prepare(&req, &body, &shared) {
        Ok(p) => p,
        Err(refused) => return *refused,
    };
    if request
        .get("model")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        return error_response(
            400,
            Some("missing_required_parameter"),
            "Missing required parameter: 'model'.",
            Some("model"),
        );
    }
    shared.http_response_started();
    tokio::time::sleep(script.first_delay).await;
    let (_, tag) = shared.next_tag();
    let input = script
        .report_input
        .unwrap_or_else(|| events::input_tokens(&request));
    let output = script.report_output.unwrap_or(16);
    shared.http_finished(true);
    HttpResponse::Ok().json(json!({
        "id": format!("cmp_{tag}"),
        "object": "response.compaction",
        "created_at": chrono::Utc::now().timestamp(),
        "output": [{"id": format!("cmpi_{tag}"), "type": "compaction", "encrypted_content": format!("sim-compacted-{tag}")}],
        "usage": {
            "input_tokens": input,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input.saturating_add(output),
        },
    }))
}

/// One HTTP response being played: its remaining steps. Dropped before its end = the client
/// (the relay) went away mid-response, which the sim counts.
struct Run {
    steps: std::collections::VecDeque<Step>,
    remembered: Option<events::Remembered>,
    store: bool,
    shared: Arc<SimShared>,
    finished: bool,
}

/// What the next step yields on the wire.
enum Next {
    Bytes(Bytes),
    /// The body is cut (no terminal chunk): the connection closes.
    Cut,
    Stall,
    End,
}

impl Run {
    /// Runs steps up to the next thing to send; `event` renders a JSON event (`None`: not sent).
    async fn next(&mut self, event: &impl Fn(&Value) -> Option<Bytes>) -> Next {
        while let Some(step) = self.steps.pop_front() {
            match step {
                Step::Delay(d) => tokio::time::sleep(d).await,
                Step::Event(e) => {
                    if let Some(bytes) = event(&e) {
                        return Next::Bytes(bytes);
                    }
                }
                Step::Text(t) => return Next::Bytes(Bytes::from(format!("data: {t}\n\n"))),
                Step::Binary(_) => {}
                Step::Close(_) | Step::Drop => return Next::Cut,
                Step::Stall => return Next::Stall,
            }
        }
        self.end();
        Next::End
    }

    fn end(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if let Some(r) = self.remembered.take()
            && self.store
        {
            self.shared.store(r);
        }
        self.shared.http_finished(true);
    }

    fn into_stream(
        self,
        event: impl Fn(&Value) -> Option<Bytes> + 'static,
    ) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        futures_util::stream::unfold((self, event), |(mut run, event)| async move {
            match run.next(&event).await {
                Next::Bytes(b) => Some((Ok(b), (run, event))),
                Next::End => None,
                Next::Cut => {
                    run.finished = true;
                    run.shared.http_finished(false);
                    Some((Err(std::io::Error::other("simulated cut")), (run, event)))
                }
                Next::Stall => {
                    tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
                    None
                }
            }
        })
    }

    /// Every event as an SSE event (`event:` the type, `data:` the JSON).
    fn sse(self) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        self.into_stream(|e| {
            let kind = e["type"].as_str().unwrap_or("message").to_string();
            Some(Bytes::from(format!("event: {kind}\ndata: {e}\n\n")))
        })
    }

    /// The terminal's response object only (an `error` event becomes the JSON error).
    fn json(self) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
        self.into_stream(|e| match e["type"].as_str() {
            Some("response.completed" | "response.incomplete" | "response.failed") => {
                Some(Bytes::from(e["response"].to_string()))
            }
            Some("error") => Some(Bytes::from(json!({"error": e["error"]}).to_string())),
            _ => None,
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            // Dropped mid-response: the client closed its connection.
            self.shared.http_finished(false);
        }
    }
}
