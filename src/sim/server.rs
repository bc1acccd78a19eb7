//! Routes, handshake authentication, shared state and the inspection endpoints of the sim.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde::Serialize;
use serde_json::json;

use super::conn::SimConn;
use super::events::Remembered;
use super::monotonic_ns;

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Accepted bearer keys; empty: any non-empty key.
    pub api_keys: Vec<String>,
    /// Connection age after which `websocket_connection_limit_reached` is sent (real: 60 min).
    pub max_age: Duration,
    /// How often the sim pings each socket.
    pub ping_interval: Duration,
    /// A socket whose last pong is older than this is closed (1011).
    pub pong_timeout: Duration,
    /// Largest frame accepted from a client.
    pub max_frame: usize,
    /// Keep every frame in the inspection log (off for benchmarks).
    pub record_frames: bool,
    /// actix-web workers (0 = one per core).
    pub workers: usize,
    /// Fixed id seed: a restarted sim with the same seed hands out the same response ids
    /// again (an upstream that repeats ids). `None`: random per process.
    pub id_seed: Option<String>,
    /// Largest HTTP request body accepted (an upstream's HTTP takes what its WebSocket refuses).
    pub max_body: usize,
    /// Answer a `stream_id` with 400 `Unsupported parameter` (an upstream without lanes).
    pub refuse_stream_id: bool,
    /// Answer WebSocket handshakes 426 (an upstream reachable over HTTP only).
    pub http_only: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_age: Duration::from_secs(60 * 60),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(80),
            max_frame: 16 * 1024 * 1024,
            record_frames: true,
            workers: 1,
            id_seed: None,
            max_body: 64 * 1024 * 1024,
            refuse_stream_id: false,
            http_only: false,
        }
    }
}

/// One frame in the inspection log.
#[derive(Debug, Clone, Serialize)]
pub struct FrameRecord {
    /// `in` (from the client) or `out` (sent by the sim).
    pub dir: &'static str,
    pub ts_ns: u64,
    /// Text frames verbatim; other frames as `<binary N bytes>`, `<close CODE>` …
    pub text: String,
}

/// One accepted connection in the inspection log.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRecord {
    pub id: u64,
    pub path: String,
    /// Handshake headers, lower-case names, in arrival order.
    pub headers: Vec<(String, String)>,
    pub opened_ns: u64,
    pub closed_ns: Option<u64>,
    pub responses: u64,
    pub frames: Vec<FrameRecord>,
}

#[derive(Default)]
struct Registry {
    conns: Vec<ConnRecord>,
    index: HashMap<u64, usize>,
    open: u64,
    rejected: u64,
    responses: u64,
    /// `store:true` responses, visible to every socket.
    stored: HashMap<String, Remembered>,
    /// Directives whose `once` fault has fired.
    fired: std::collections::HashSet<String>,
    /// Keys refused with a status (and `Retry-After`) by `POST /sim/refuse`, and how many
    /// requests each refusal answered.
    refused: HashMap<String, (u16, Option<u64>)>,
    refused_count: HashMap<String, u64>,
    /// HTTP requests (`POST /v1/responses…`), in arrival order.
    http: Vec<HttpRecord>,
    /// HTTP responses played to their end, and those whose client left (or that were cut).
    http_completed: u64,
    http_abandoned: u64,
}

/// One HTTP request in the inspection log.
#[derive(Debug, Clone, Serialize)]
pub struct HttpRecord {
    pub path: String,
    /// Request headers, lower-case names.
    pub headers: Vec<(String, String)>,
    pub ts_ns: u64,
    /// The body (when frames are recorded).
    pub body: Option<String>,
}

/// State shared by every connection of one sim.
pub struct SimShared {
    pub config: SimConfig,
    registry: Mutex<Registry>,
    next: AtomicU64,
    /// Random per process, so response ids never repeat across sim restarts.
    seed: String,
    /// TCP connections accepted (WebSocket and HTTP alike).
    tcp_accepted: AtomicU64,
}

impl SimShared {
    fn new(config: SimConfig) -> Self {
        // Random per process: response ids never repeat across sim restarts.
        let seed = config
            .id_seed
            .clone()
            .unwrap_or_else(|| crate::ids::random_hex(4));
        Self {
            config,
            registry: Mutex::new(Registry::default()),
            next: AtomicU64::new(1),
            seed,
            tcp_accepted: AtomicU64::new(0),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // A poisoned lock only means a panic elsewhere; the log itself is still usable.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh id tag for connections and responses.
    pub fn next_tag(&self) -> (u64, String) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        (n, format!("sim{}{n:08x}", self.seed))
    }

    pub fn opened(&self, id: u64, path: String, headers: Vec<(String, String)>) {
        let mut r = self.registry();
        let at = r.conns.len();
        r.conns.push(ConnRecord {
            id,
            path,
            headers,
            opened_ns: monotonic_ns(),
            closed_ns: None,
            responses: 0,
            frames: Vec::new(),
        });
        r.index.insert(id, at);
        r.open += 1;
    }

    pub fn closed(&self, id: u64) {
        let mut r = self.registry();
        if let Some(&at) = r.index.get(&id)
            && r.conns[at].closed_ns.is_none()
        {
            r.conns[at].closed_ns = Some(monotonic_ns());
            r.open -= 1;
        }
    }

    pub fn frame(&self, id: u64, dir: &'static str, text: impl FnOnce() -> String) {
        if !self.config.record_frames {
            return;
        }
        let mut r = self.registry();
        if let Some(&at) = r.index.get(&id) {
            r.conns[at].frames.push(FrameRecord {
                dir,
                ts_ns: monotonic_ns(),
                text: text(),
            });
        }
    }

    pub fn response_started(&self, id: u64) {
        let mut r = self.registry();
        r.responses += 1;
        if let Some(&at) = r.index.get(&id) {
            r.conns[at].responses += 1;
        }
    }

    pub fn store(&self, remembered: Remembered) {
        self.registry()
            .stored
            .insert(remembered.response_id.clone(), remembered);
    }

    pub fn stored(&self, response_id: &str) -> Option<Remembered> {
        self.registry().stored.get(response_id).cloned()
    }

    /// Whether a `once` fault of this directive may fire now (true the first time only).
    pub fn fire_once(&self, directive: &str) -> bool {
        self.registry().fired.insert(directive.to_string())
    }

    fn rejected(&self) {
        self.registry().rejected += 1;
    }

    /// The answer to a request refused before anything — a missing or unknown key (401), or
    /// a refusal set for its key — or `None`: it may go on.
    pub fn refusal(&self, req: &HttpRequest) -> Option<HttpResponse> {
        if !self.authorised(req) {
            return Some(error_response(
                401,
                Some("invalid_api_key"),
                "Incorrect API key provided.",
                None,
            ));
        }
        let key = bearer(req)?;
        let mut r = self.registry();
        let (status, retry_after) = r.refused.get(key).copied()?;
        *r.refused_count.entry(key.to_string()).or_insert(0) += 1;
        r.rejected += 1;
        let code = match status {
            401 => "invalid_api_key",
            403 => "unsupported_country_region_territory",
            429 => "rate_limit_exceeded",
            _ => "server_error",
        };
        let mut res = error_response(
            status,
            Some(code),
            &format!("Simulated refusal {status}."),
            None,
        );
        if let Some(s) = retry_after {
            res.headers_mut().insert(
                actix_web::http::header::RETRY_AFTER,
                actix_web::http::header::HeaderValue::from(s),
            );
        }
        Some(res)
    }

    /// Whether the request carries an accepted bearer key (counted as rejected when not).
    pub fn authorised(&self, req: &HttpRequest) -> bool {
        let ok = match bearer(req) {
            None => false,
            Some(key) => {
                self.config.api_keys.is_empty() || self.config.api_keys.iter().any(|k| k == key)
            }
        };
        if !ok {
            self.rejected();
        }
        ok
    }

    pub fn http_request(
        &self,
        path: &str,
        headers: &actix_web::http::header::HeaderMap,
        body: &[u8],
    ) {
        let headers = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = self
            .config
            .record_frames
            .then(|| String::from_utf8_lossy(body).into_owned());
        self.registry().http.push(HttpRecord {
            path: path.to_string(),
            headers,
            ts_ns: monotonic_ns(),
            body,
        });
    }

    pub fn http_response_started(&self) {
        self.registry().responses += 1;
    }

    /// An HTTP response ended: played to its end, or not (cut, or its client left).
    pub fn http_finished(&self, complete: bool) {
        let mut r = self.registry();
        if complete {
            r.http_completed += 1;
        } else {
            r.http_abandoned += 1;
        }
    }
}

/// A running sim.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub shared: Arc<SimShared>,
    pub server: ServerHandle,
}

impl SimHandle {
    /// The HTTP base clients are given, e.g. `http://127.0.0.1:18080/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub async fn stop(&self) {
        self.server.stop(false).await;
    }
}

/// Binds and starts the sim on the current actix System; it serves until stopped.
pub fn start(
    config: SimConfig,
    bind: SocketAddr,
) -> std::io::Result<(SimHandle, actix_web::dev::Server)> {
    start_on(config, std::net::TcpListener::bind(bind)?)
}

/// `start` on a listener bound beforehand.
pub fn start_on(
    config: SimConfig,
    listener: std::net::TcpListener,
) -> std::io::Result<(SimHandle, actix_web::dev::Server)> {
    let shared = Arc::new(SimShared::new(config.clone()));
    let data = web::Data::from(shared.clone());
    let counter = shared.clone();
    let max_body = config.max_body;
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(max_body))
            .route("/v1/responses", web::get().to(upgrade))
            .route("/responses", web::get().to(upgrade))
            .route("/v1/responses", web::post().to(super::http::create))
            .route("/responses", web::post().to(super::http::create))
            .route(
                "/v1/responses/compact",
                web::post().to(super::http::compact),
            )
            .route("/responses/compact", web::post().to(super::http::compact))
            .route("/sim/http", web::get().to(http_requests))
            .route("/sim/refuse", web::post().to(refuse))
            .route("/sim/connections", web::get().to(connections))
            .route("/sim/stats", web::get().to(stats))
            .route(
                "/healthz",
                web::get().to(|| async { HttpResponse::Ok().json(json!({"status": "ok"})) }),
            )
    })
    .on_connect(move |_, _| {
        counter.tcp_accepted.fetch_add(1, Ordering::Relaxed);
    })
    .disable_signals()
    .tcp_nodelay(true)
    .shutdown_timeout(1);
    if config.workers > 0 {
        server = server.workers(config.workers);
    }
    let server = server.listen(listener)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("sim bound no address"))?;
    let server = server.run();
    Ok((
        SimHandle {
            addr,
            shared,
            server: server.handle(),
        },
        server,
    ))
}

fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    shared: web::Data<SimShared>,
) -> actix_web::Result<HttpResponse> {
    if let Some(refused) = shared.refusal(&req) {
        return Ok(refused);
    }
    if shared.config.http_only {
        shared.registry().rejected += 1;
        return Ok(error_response(
            426,
            Some("upgrade_required"),
            "WebSocket mode is not available for this account; use HTTP.",
            None,
        ));
    }
    let headers = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let shared = shared.into_inner();
    let (id, _) = shared.next_tag();
    shared.opened(id, req.path().to_string(), headers);
    let max_frame = shared.config.max_frame;
    let conn = SimConn::new(id, shared.clone());
    let response = actix_web_actors::ws::WsResponseBuilder::new(conn, &req, stream)
        .frame_size(max_frame)
        .start();
    if response.is_err() {
        // Not a WebSocket handshake: nothing was opened.
        shared.closed(id);
    }
    response
}

async fn connections(shared: web::Data<SimShared>) -> HttpResponse {
    let conns = shared.registry().conns.clone();
    HttpResponse::Ok().json(conns)
}

/// `POST /sim/refuse` `{"key", "status", "retry_after"}`: requests (handshakes and HTTP) with
/// that bearer key get `status` (with `Retry-After`) until a `status: null` clears it.
#[derive(Debug, serde::Deserialize)]
struct Refuse {
    key: String,
    status: Option<u16>,
    #[serde(default)]
    retry_after: Option<u64>,
}

async fn refuse(shared: web::Data<SimShared>, body: web::Json<Refuse>) -> HttpResponse {
    let Refuse {
        key,
        status,
        retry_after,
    } = body.into_inner();
    let mut r = shared.registry();
    match status {
        Some(s) => r.refused.insert(key, (s, retry_after)),
        None => r.refused.remove(&key),
    };
    HttpResponse::Ok().json(json!({"refused": r.refused.len()}))
}

/// A JSON error answer of `status` (the OpenAI HTTP shape).
pub fn error_response(
    status: u16,
    code: Option<&str>,
    message: &str,
    param: Option<&str>,
) -> HttpResponse {
    let wrapped = super::events::wrapped_error(status, code, message, param);
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(json!({"error": wrapped["error"]}))
}

async fn http_requests(shared: web::Data<SimShared>) -> HttpResponse {
    let http = shared.registry().http.clone();
    HttpResponse::Ok().json(http)
}

async fn stats(shared: web::Data<SimShared>) -> HttpResponse {
    let r = shared.registry();
    HttpResponse::Ok().json(json!({
        "open": r.open,
        "accepted": r.conns.len(),
        "rejected": r.rejected,
        "responses": r.responses,
        "http_requests": r.http.len(),
        "http_completed": r.http_completed,
        "http_abandoned": r.http_abandoned,
        "tcp_accepted": shared.tcp_accepted.load(Ordering::Relaxed),
        "refused": r.refused_count,
    }))
}
