//! The request log's span. `tracing-actix-web`'s default records `http.target` with the query
//! string — a key passed as `?api_key=…` (refused, but logged) would end up in every log line
//! of the request. This span records the path only, never the query (docs/DESIGN.md#handshake).
//!
//! `RequestLog` runs each request's handler in that span and logs its end. Unlike
//! tracing-actix-web's `TracingLogger` it does not enter the span on every poll of the response
//! body: an SSE body is polled once or twice per event (docs/DESIGN.md#event-scan). Nothing logs
//! from inside a body's poll (bodies' code logs with an explicit parent). WebSocket handshakes
//! never reach the app: the ingress gives them the same span and line (`span`, `ended`).

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::StatusCode;
use futures_util::future::LocalBoxFuture;
use tracing::{Instrument, Span};

use super::error::HttpError;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

pub struct PathOnlySpan;

impl RootSpanBuilder for PathOnlySpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let client_ip = request
            .connection_info()
            .realip_remote_addr()
            .unwrap_or("")
            .to_string();
        span(
            request.method().as_str(),
            request.match_pattern().as_deref().unwrap_or_default(),
            request.path(),
            &client_ip,
        )
    }

    /// One line per failed request — except refused handshakes, which are counted and
    /// summarized (docs/DESIGN.md#refusals).
    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let failure = match outcome {
            Ok(response) => response
                .response()
                .error()
                .map(|e| (e.as_response_error(), response.status())),
            Err(e) => Some((e.as_response_error(), e.as_response_error().status_code())),
        };
        if let Some((error, status)) = failure {
            let summarized = outcome
                .as_ref()
                .ok()
                .and_then(|r| r.response().error())
                .and_then(|e| e.as_error::<HttpError>())
                .is_some_and(|e| e.summarized);
            if !summarized {
                log_failure(&span, status, error);
            }
        }
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// A request's span: its path, never its query.
pub fn span(method: &str, route: &str, path: &str, client_ip: &str) -> Span {
    tracing::info_span!(
        "HTTP request",
        http.method = %method,
        http.route = %route,
        http.target = %path,
        http.client_ip = %client_ip,
        http.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        exception.message = tracing::field::Empty,
        exception.details = tracing::field::Empty,
    )
}

/// One line for a failed request: a warning for the client's error, an error for the relay's.
fn log_failure<E: std::fmt::Debug + ?Sized>(span: &Span, status: StatusCode, error: &E) {
    let _in = span.enter();
    if status.is_client_error() {
        tracing::warn!("request refused: {error:?}");
    } else {
        tracing::error!("request failed: {error:?}");
    }
}

/// The end of a request answered outside the app (a WebSocket handshake, `http/ingress.rs`):
/// its status on the span, and a failure's line unless the refusal summary counts it.
pub fn ended(span: &Span, status: StatusCode, failure: Option<&HttpError>) {
    span.record("http.status_code", status.as_u16());
    if let Some(e) = failure.filter(|e| !e.summarized) {
        log_failure(span, status, e);
    }
}

/// The request log middleware (module docs).
pub struct RequestLog;

impl<S, B> Transform<S, ServiceRequest> for RequestLog
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Transform = RequestLogService<S>;
    type InitError = ();
    type Future = std::future::Ready<Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        std::future::ready(Ok(RequestLogService { service }))
    }
}

pub struct RequestLogService<S> {
    service: S,
}

impl<S, B> Service<ServiceRequest> for RequestLogService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<B>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<ServiceResponse<B>, Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let span = PathOnlySpan::on_request_start(&req);
        let fut = span.in_scope(|| self.service.call(req));
        Box::pin(async move {
            let outcome = fut.instrument(span.clone()).await;
            PathOnlySpan::on_request_end(span, &outcome);
            outcome
        })
    }
}
