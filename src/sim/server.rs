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
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
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
    if !shared.authorised(&req) {
        return Ok(HttpResponse::Unauthorized().json(json!({"error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key",
        }})));
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
    }))
}
