//! `tracing` setup: text or JSON lines on stderr (stdout is for command output, such as a new
//! key); `RUST_LOG` overrides `log.level`. With `telemetry.otlp_endpoint` set, the turns' spans
//! also go out as OpenTelemetry traces over OTLP/HTTP (docs/DESIGN.md#traces).

use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The span names exported as traces: a WebSocket turn and an HTTP one.
const TRACED_SPANS: [&str; 2] = ["turn", "http_turn"];

/// The trace pipeline, kept to flush it at exit.
static TRACER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt: Traces = match log.format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let traces = match traces(telemetry) {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("telemetry.otlp_endpoint: traces off: {e}");
            None
        }
    };
    let layers: Vec<Traces> = std::iter::once(fmt).chain(traces).collect();
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = tracing_subscriber::registry().with(layers).try_init();
}

/// A layer of the one subscriber (the log, the traces).
type Traces = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The OTLP layer: sees only the turns' spans (and nothing else, whatever the log level), so a
/// turn is a trace of its own; exported in batches from a thread of the SDK's.
fn traces(t: &TelemetrySettings) -> Result<Option<Traces>, String> {
    use opentelemetry::trace::TracerProvider;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    if t.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&t.otlp_endpoint)
        .with_headers(Default::default())
        .build()
        .map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(t.service_name.clone())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(Reported::new(exporter))
        .with_sampler(Sampler::TraceIdRatioBased(t.trace_sample_ratio))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("turnpike");
    let _ = TRACER.set(provider);
    let only_turns =
        tracing_subscriber::filter::filter_fn(|m| m.is_span() && TRACED_SPANS.contains(&m.name()));
    Ok(Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_turns)
            .boxed(),
    ))
}

/// The OTLP exporter, saying when exports start failing and when they work again — one line
/// each, with the spans lost in between — instead of nothing (the SDK's own logging is off).
#[derive(Debug)]
struct Reported<E> {
    inner: E,
    failing: std::sync::atomic::AtomicBool,
    lost: std::sync::atomic::AtomicUsize,
}

impl<E> Reported<E> {
    fn new(inner: E) -> Self {
        Self {
            inner,
            failing: Default::default(),
            lost: Default::default(),
        }
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Reported<E>
{
    fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        use std::sync::atomic::Ordering;
        let spans = batch.len();
        async move {
            let result = self.inner.export(batch).await;
            match &result {
                Err(e) => {
                    self.lost.fetch_add(spans, Ordering::Relaxed);
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "traces: export to telemetry.otlp_endpoint failed; spans are dropped until it answers");
                    }
                }
                Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                    let lost = self.lost.swap(0, Ordering::Relaxed);
                    tracing::info!(
                        lost,
                        "traces: export to telemetry.otlp_endpoint works again"
                    );
                }
                Ok(()) => {}
            }
            result
        }
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Exports the spans still buffered (at exit; a no-op without traces).
pub fn flush_traces() {
    if let Some(p) = TRACER.get()
        && let Err(e) = p.shutdown()
    {
        eprintln!("telemetry: the last traces were not exported: {e}");
    }
}

/// A turn's span with the fields its trace carries, filled when it ends (`record_turn`):
/// OpenTelemetry's GenAI attributes and the phases of the turn, in ms from its acceptance.
#[macro_export]
macro_rules! turn_span {
    ($($head:tt)*) => {
        ::tracing::info_span!($($head)*,
            gen_ai.system = "openai",
            gen_ai.operation.name = "chat",
            gen_ai.request.model = ::tracing::field::Empty,
            gen_ai.response.id = ::tracing::field::Empty,
            gen_ai.usage.input_tokens = ::tracing::field::Empty,
            gen_ai.usage.output_tokens = ::tracing::field::Empty,
            turnpike.account = ::tracing::field::Empty,
            turnpike.service_tier = ::tracing::field::Empty,
            turnpike.status = ::tracing::field::Empty,
            turnpike.cost_nanousd = ::tracing::field::Empty,
            turnpike.upstream_wait_ms = ::tracing::field::Empty,
            turnpike.first_event_ms = ::tracing::field::Empty,
            turnpike.first_token_ms = ::tracing::field::Empty,
            turnpike.duration_ms = ::tracing::field::Empty,
        )
    };
}

/// Fills a turn's span (`turn_span!`) from its record — only when traces go out: otherwise the
/// fields would only lengthen the turn's log lines.
pub fn record_turn(span: &tracing::Span, r: &crate::record::TurnRecord) {
    if TRACER.get().is_none() {
        return;
    }
    span.record("gen_ai.request.model", r.model.as_str());
    if let Some(id) = &r.response_id {
        span.record("gen_ai.response.id", id.as_str());
    }
    // As i64: the OpenTelemetry layer writes a u64 as text.
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    span.record("gen_ai.usage.input_tokens", count(r.usage.input_tokens));
    span.record("gen_ai.usage.output_tokens", count(r.usage.output_tokens));
    span.record("turnpike.account", r.account.as_str());
    span.record("turnpike.service_tier", r.service_tier.as_str());
    span.record("turnpike.status", r.status.as_str());
    span.record("turnpike.cost_nanousd", r.cost_nanousd);
    let t = &r.timing;
    for (field, ms) in [
        ("turnpike.upstream_wait_ms", t.upstream_wait_ms),
        ("turnpike.first_event_ms", t.first_event_ms),
        ("turnpike.first_token_ms", t.first_token_ms),
        ("turnpike.duration_ms", Some(t.duration_ms)),
    ] {
        if let Some(ms) = ms {
            span.record(field, ms);
        }
    }
}

/// Prometheus metrics (served at `GET /metrics` on the admin listener). Every name is listed in
/// docs/operations.md; recording is a no-op until `install_metrics` ran (tests that embed the relay).
pub mod metric {
    pub const SESSIONS_OPEN: &str = "turnpike_sessions_open";
    pub const SESSIONS_MOVED: &str = "turnpike_sessions_moved_total";
    pub const HTTP_REQUESTS_IN_FLIGHT: &str = "turnpike_http_requests_in_flight";
    pub const HANDSHAKES_REFUSED: &str = "turnpike_handshakes_refused_total";
    pub const TURNS: &str = "turnpike_turns_total";
    pub const FIRST_TOKEN_MS: &str = "turnpike_first_token_ms";
    pub const DURATION_MS: &str = "turnpike_turn_duration_ms";
    pub const UPSTREAM_WAIT_MS: &str = "turnpike_upstream_wait_ms";
    pub const USAGE_MALFORMED: &str = "turnpike_usage_malformed_total";
    pub const USAGE_QUARANTINED: &str = "turnpike_usage_quarantined_total";
    pub const BILLED: &str = "turnpike_billed_nanousd_total";
    pub const INPUT_TOKENS: &str = "turnpike_input_tokens_total";
    pub const ADMIN_REFUSED: &str = "turnpike_admin_refused_total";
    pub const UPSTREAM_ERRORS: &str = "turnpike_upstream_errors_total";
    pub const DIALS: &str = "turnpike_upstream_dials_total";
    pub const DIAL_FAILURES: &str = "turnpike_upstream_dial_failures_total";
    pub const UPSTREAM_CONNECTIONS: &str = "turnpike_upstream_connections";
    pub const LEASE_WAITERS: &str = "turnpike_upstream_lease_waiters";
    pub const LEASES_RECOVERED: &str = "turnpike_upstream_leases_recovered_total";
    pub const LEASE_READS: &str = "turnpike_upstream_lease_reads_total";
    pub const ACCOUNT_COOLING: &str = "turnpike_upstream_account_cooling";
    pub const AFFINITY_MOVES: &str = "turnpike_affinity_moves_total";
    pub const ACCOUNT_STATE: &str = "turnpike_upstream_account_state";
    pub const ACCOUNT_HTTP: &str = "turnpike_upstream_account_http";
    pub const SPOOL_BACKLOG: &str = "turnpike_accounting_backlog_records";
    pub const SPOOL_BACKLOG_AGE: &str = "turnpike_accounting_backlog_age_seconds";
    pub const BATCH_ROWS: &str = "turnpike_accounting_batch_rows";
    pub const FLUSH_SECONDS: &str = "turnpike_accounting_flush_seconds";
    pub const DB_ERRORS: &str = "turnpike_accounting_db_errors_total";
    pub const ACCOUNTING_UNAVAILABLE: &str = "turnpike_accounting_unavailable";
    pub const COMPENSATIONS: &str = "turnpike_compensations";
    pub const COMPENSATION_AMOUNT: &str = "turnpike_compensations_nanousd";
    /// How limited keys' turns reserved: `drawn` from an open block, a new `block`, their `own`
    /// row (docs/DESIGN.md#reservation-blocks).
    pub const RESERVATIONS: &str = "turnpike_reservations_total";

    /// Every metric, as `/metrics` shows it from the start.
    pub const ALL: &[&str] = &[
        SESSIONS_OPEN,
        SESSIONS_MOVED,
        HTTP_REQUESTS_IN_FLIGHT,
        HANDSHAKES_REFUSED,
        TURNS,
        FIRST_TOKEN_MS,
        DURATION_MS,
        UPSTREAM_WAIT_MS,
        USAGE_MALFORMED,
        USAGE_QUARANTINED,
        BILLED,
        INPUT_TOKENS,
        ADMIN_REFUSED,
        UPSTREAM_ERRORS,
        DIALS,
        DIAL_FAILURES,
        UPSTREAM_CONNECTIONS,
        LEASE_WAITERS,
        LEASES_RECOVERED,
        LEASE_READS,
        ACCOUNT_COOLING,
        AFFINITY_MOVES,
        ACCOUNT_STATE,
        ACCOUNT_HTTP,
        SPOOL_BACKLOG,
        SPOOL_BACKLOG_AGE,
        BATCH_ROWS,
        FLUSH_SECONDS,
        DB_ERRORS,
        ACCOUNTING_UNAVAILABLE,
        COMPENSATIONS,
        COMPENSATION_AMOUNT,
        RESERVATIONS,
    ];
}

/// Registers every metric at zero, with the label values known at start (turn statuses,
/// refusal reasons, relay error codes, compensation statuses, each account and connection
/// state), so dashboards and alerts see 0 rather than "no data" until something happens.
pub fn register_metrics(accounts: &[String]) {
    use ::metrics::{counter, gauge, histogram};
    use metric::*;
    gauge!(SESSIONS_OPEN).increment(0.0);
    counter!(SESSIONS_MOVED).increment(0);
    gauge!(HTTP_REQUESTS_IN_FLIGHT).increment(0.0);
    for reason in [
        "missing_api_key",
        "invalid_api_key",
        "api_key_in_query",
        "api_key_revoked",
        "user_disabled",
        "quota_exhausted",
        "balance_exhausted",
        "too_many_sessions",
        "upgrade_required",
        "not_ready",
    ] {
        counter!(HANDSHAKES_REFUSED, "reason" => reason).increment(0);
    }
    for status in [
        "completed",
        "incomplete",
        "failed",
        "cancelled",
        "preempted",
        "client_gone",
        "upstream_lost",
        "rejected",
    ] {
        for transport in ["ws", "http"] {
            for upstream in ["ws", "http"] {
                counter!(TURNS, "status" => status, "transport" => transport, "upstream_transport" => upstream)
                    .increment(0);
            }
        }
    }
    for h in [
        FIRST_TOKEN_MS,
        DURATION_MS,
        UPSTREAM_WAIT_MS,
        BATCH_ROWS,
        FLUSH_SECONDS,
    ] {
        // A histogram appears in the exposition once it exists.
        let _ = histogram!(h);
    }
    counter!(USAGE_MALFORMED).increment(0);
    counter!(ADMIN_REFUSED).increment(0);
    for reason in ["above_bound", "cost_overflow"] {
        counter!(USAGE_QUARANTINED, "reason" => reason).increment(0);
    }
    for tier in BILLED_TIERS.iter().chain(&["other"]) {
        counter!(BILLED, "service_tier" => *tier).increment(0);
    }
    for cache in ["hit", "miss"] {
        counter!(INPUT_TOKENS, "cache" => cache).increment(0);
    }
    for code in [
        "upstream_restarting",
        "upstream_connection_lost",
        "upstream_protocol_error",
    ] {
        counter!(UPSTREAM_ERRORS, "code" => code).increment(0);
    }
    for account in accounts {
        let a = account.clone();
        counter!(DIALS, "account" => a.clone()).increment(0);
        counter!(DIAL_FAILURES, "account" => a.clone()).increment(0);
        counter!(LEASES_RECOVERED, "account" => a.clone()).increment(0);
        for reads in ["direct", "relayed"] {
            counter!(LEASE_READS, "account" => a.clone(), "reads" => reads).increment(0);
        }
        gauge!(ACCOUNT_COOLING, "account" => a.clone()).set(0.0);
        counter!(AFFINITY_MOVES, "from" => a.clone()).increment(0);
        account_state(&a, "healthy");
        account_http(&a, false, false);
        gauge!(LEASE_WAITERS, "account" => a.clone()).set(0.0);
        for state in ["idle", "leased", "parked", "dialing"] {
            gauge!(UPSTREAM_CONNECTIONS, "account" => a.clone(), "state" => state).set(0.0);
        }
    }
    gauge!(SPOOL_BACKLOG).increment(0.0);
    gauge!(SPOOL_BACKLOG_AGE).increment(0.0);
    counter!(DB_ERRORS).increment(0);
    gauge!(ACCOUNTING_UNAVAILABLE).increment(0.0);
    for how in ["drawn", "block", "own"] {
        counter!(RESERVATIONS, "how" => how).increment(0);
    }
    for status in crate::record::CompensationStatus::ALL.map(|s| s.as_str()) {
        gauge!(COMPENSATIONS, "status" => status).increment(0.0);
        gauge!(COMPENSATION_AMOUNT, "status" => status).increment(0.0);
    }
}

/// Installs the process-wide Prometheus recorder (once; later calls get `None`).
pub fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let ms = [
        1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
        60000.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_ms".into()), &ms)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(metric::FLUSH_SECONDS.into()),
                &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(metric::BATCH_ROWS.into()),
                &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 4000.0],
            )
        })
        .ok()?;
    builder.install_recorder().ok()
}

/// Every state an account's health can be in (`pool::health::View::state`).
pub const ACCOUNT_STATES: [&str; 4] = ["healthy", "cooling", "probing", "disabled"];

/// An account's health state as a gauge per state (1 for the current one).
pub fn account_state(account: &str, current: &str) {
    for state in ACCOUNT_STATES {
        ::metrics::gauge!(metric::ACCOUNT_STATE, "account" => account.to_string(), "state" => state)
            .set(if state == current { 1.0 } else { 0.0 });
    }
}

/// What an account's upstream taught the relay (docs/DESIGN.md#upstream-transports): a gauge
/// per reason its turns go over HTTP (1 when it holds).
pub fn account_http(account: &str, websocket_refused: bool, lanes_refused: bool) {
    for (reason, holds) in [
        ("websocket_refused", websocket_refused),
        ("lanes_refused", lanes_refused),
    ] {
        ::metrics::gauge!(metric::ACCOUNT_HTTP, "account" => account.to_string(), "reason" => reason)
            .set(if holds { 1.0 } else { 0.0 });
    }
}

/// The service tiers `turnpike_billed_nanousd_total` names; any other is `other` (tier names
/// come from the upstream: the label set stays bounded).
const BILLED_TIERS: [&str; 3] = ["standard", "priority", "flex"];

/// An account could not be reached: a WebSocket dial failed or was refused, or an HTTP request
/// got no answer's head or an account-level refusal (401, 403, 429, 5xx) — both transports
/// count, so the no-upstream alert fires for HTTP-only traffic too.
pub fn dial_failed(account: &str) {
    ::metrics::counter!(metric::DIAL_FAILURES, "account" => account.to_string()).increment(1);
}

/// An upstream error ended (or would have ended) a turn: its code, cleaned to a label.
pub fn upstream_error(code: &str) {
    let label = crate::record::clean_label(code, 64);
    ::metrics::counter!(metric::UPSTREAM_ERRORS, "code" => label).increment(1);
}

/// A turn's record reached accounting: count it, its cost by tier and its timing.
pub fn turn_ended(r: &crate::record::TurnRecord, usage_malformed: bool) {
    let tier = BILLED_TIERS
        .iter()
        .find(|t| **t == r.service_tier)
        .copied()
        .unwrap_or("other");
    ::metrics::counter!(metric::BILLED, "service_tier" => tier)
        .increment(u64::try_from(r.cost_nanousd).unwrap_or(0));
    // Input billed, read from the prompt cache or not (the cache-hit alert's ratio).
    let hit = r.usage.cached_input_tokens.min(r.usage.input_tokens);
    ::metrics::counter!(metric::INPUT_TOKENS, "cache" => "hit").increment(hit);
    ::metrics::counter!(metric::INPUT_TOKENS, "cache" => "miss")
        .increment(r.usage.input_tokens - hit);
    ::metrics::counter!(metric::TURNS, "status" => r.status.as_str(), "transport" => r.transport.as_str(),
        "upstream_transport" => r.upstream_transport.as_str())
    .increment(1);
    if let Some(ms) = r.timing.first_token_ms {
        ::metrics::histogram!(metric::FIRST_TOKEN_MS).record(crate::num::f64_of_i64(ms));
    }
    if let Some(ms) = r.timing.upstream_wait_ms {
        ::metrics::histogram!(metric::UPSTREAM_WAIT_MS).record(crate::num::f64_of_i64(ms));
    }
    ::metrics::histogram!(metric::DURATION_MS).record(crate::num::f64_of_i64(r.timing.duration_ms));
    if usage_malformed {
        ::metrics::counter!(metric::USAGE_MALFORMED).increment(1);
    }
}
