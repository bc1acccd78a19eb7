//! Settings: defaults in code, then a TOML file, then `TURNPIKE_<SECTION>__<KEY>` environment
//! overrides. Every problem is reported as one line naming the key (exit code 2 in the CLI).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides; `__` separates the section from the key.
pub const ENV_PREFIX: &str = "TURNPIKE_";

/// Shortest admin token accepted (`openssl rand -hex 32` gives 64).
pub const ADMIN_TOKEN_MIN_CHARS: usize = 32;

/// A listener address: `IP:port`, or `host:port` resolved now (the first address wins).
fn socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    use std::net::ToSocketAddrs;
    let text = String::deserialize(d)?;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let resolved = text.to_socket_addrs().map_err(|e| {
        serde::de::Error::custom(format!(
            "{text:?} is neither IP:port nor a host:port that resolves ({e})"
        ))
    })?;
    resolved
        .into_iter()
        .next()
        .ok_or_else(|| serde::de::Error::custom(format!("{text:?} resolves to no address")))
}

/// A `TURNPIKE_` variable that looks like a setting but is not one (`TURNPIKE_ADMIN_TOKEN`):
/// the error names the variable it should be.
fn misspelled_env(vars: impl Iterator<Item = String>) -> Result<(), ConfigError> {
    // The sections are the settings' own tables (`accounts` is a list, not set this way).
    let defaults = serde_json::to_value(Settings::default()).unwrap_or_default();
    let sections: Vec<String> = defaults
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(_, v)| v.is_object())
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default();
    for var in vars {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if rest.contains("__") {
            continue;
        }
        let lower = rest.to_ascii_lowercase();
        if let Some(section) = sections
            .iter()
            .find(|s| lower.starts_with(&format!("{s}_")))
        {
            let key = &rest[section.len() + 1..];
            return Err(ConfigError::new(
                var.clone(),
                format!(
                    "not a setting: section and key are separated by a double underscore \
                     ({ENV_PREFIX}{}__{key})",
                    section.to_ascii_uppercase()
                ),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub session: SessionSettings,
    pub upstream: UpstreamSettings,
    pub pool: PoolSettings,
    pub limits: LimitSettings,
    pub accounting: AccountingSettings,
    pub compensation: CompensationSettings,
    pub billing: BillingSettings,
    pub pricing: crate::billing::pricing::PricingSettings,
    pub accounts: Vec<AccountSettings>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountingSettings {
    /// Directory of the durable spool. Empty: beside the SQLite file (`<db>.spool/`), or
    /// `data/spool` with PostgreSQL.
    pub spool_dir: String,
    /// Rows per database transaction.
    pub batch_max_rows: usize,
    /// How often buffered records are written to the database.
    pub flush_interval_ms: u64,
    /// Records kept in memory while the database lags; beyond, they wait on disk only.
    pub max_in_memory: usize,
    /// How long a finished turn waits for its record to be durable (spool fsync, or a direct
    /// database commit while the spool is unusable) before the client gets
    /// `accounting_unavailable` instead of the turn's terminal event.
    pub ack_timeout_ms: u64,
    /// Database writes failing this long (while the database may still answer a ping) make
    /// `/readyz` answer 503 `billing stuck`.
    pub stuck_after_ms: u64,
}

impl Default for AccountingSettings {
    fn default() -> Self {
        Self {
            spool_dir: String::new(),
            batch_max_rows: 500,
            flush_interval_ms: 200,
            max_in_memory: 100_000,
            ack_timeout_ms: 5_000,
            stuck_after_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompensationSettings {
    /// How often the compensator looks for due rows.
    pub poll_interval_ms: u64,
    /// Wait before the second attempt; doubled each attempt, with ±20 % jitter.
    pub base_backoff_ms: u64,
    /// Longest wait between attempts.
    pub max_backoff_ms: u64,
    /// Attempts after which a row is `dead` (an operator can re-queue it).
    pub max_attempts: i32,
}

impl Default for CompensationSettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1_000,
            base_backoff_ms: 1_000,
            max_backoff_ms: 300_000,
            max_attempts: 12,
        }
    }
}

/// Bounds on what one turn is billed (docs/DESIGN.md#usage-bounds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingSettings {
    /// A reported usage with any count (or input + output) above this is not believed: the
    /// turn is billed from the relay's estimate and the report kept in `usage_quarantine`.
    pub max_tokens_per_response: u64,
    /// Output tokens a turn reserves against its key's quota and its user's balance when the
    /// request sets no `max_output_tokens` (docs/DESIGN.md#reservations).
    pub reserve_output_tokens: u64,
    /// How long a reservation counts when its turn's record never comes (a relay that died).
    pub reservation_ttl_s: u64,
    /// Turns' expected cost a limited key reserves at once, as a block its turns on this relay
    /// draw from in memory (docs/DESIGN.md#reservation-blocks); 1 reserves turn by turn.
    pub reservation_block_turns: u32,
    /// How long a block serves turns; then what it has unused goes back.
    pub reservation_block_ms: u64,
    /// Turns a key's block grows to at most, while its blocks run out before their time.
    pub reservation_block_max_turns: u32,
}

impl Default for BillingSettings {
    fn default() -> Self {
        Self {
            max_tokens_per_response: 20_000_000,
            reserve_output_tokens: 4_096,
            reservation_ttl_s: 3_600,
            reservation_block_turns: 8,
            reservation_block_ms: 1_000,
            reservation_block_max_turns: 256,
        }
    }
}

impl Settings {
    /// The spool directory in effect.
    pub fn spool_dir(&self) -> PathBuf {
        if !self.accounting.spool_dir.is_empty() {
            return PathBuf::from(&self.accounting.spool_dir);
        }
        match DatabaseTarget::parse(&self.database.url) {
            Ok(DatabaseTarget::Sqlite(path)) => {
                let mut p = path.into_os_string();
                p.push(".spool");
                PathBuf::from(p)
            }
            _ => PathBuf::from("data/spool"),
        }
    }
}

/// What a `response.create` during a turn in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOverlap {
    /// Wait behind the turn in flight, in order (as the upstream queues creates on a lane);
    /// at most `session.lane_queue_max` wait, more get `lane_queue_full`.
    Queue,
    /// End the turn in flight (`response_preempted`) and start the new one.
    Preempt,
    /// Refuse the new frame (`response_already_in_flight`); the turn in flight goes on.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    pub on_overlap: OnOverlap,
    /// `response.create`s that may wait behind the turn in flight (`on_overlap = "queue"`).
    pub lane_queue_max: usize,
    /// Bytes of `response.create`s that may wait across one session's lanes; a create that
    /// would wait beyond it gets `lane_queue_full` (docs/DESIGN.md#overlap).
    pub lane_queue_max_bytes: usize,
    /// After `response.cancel`, how long to wait for the upstream's terminal before the
    /// connection is dropped and the turn ends as cancelled.
    pub cancel_grace_ms: u64,
    /// After the client vanishes mid-turn, how long to keep reading upstream for the terminal.
    pub drain_ms: u64,
    /// Without a turn for this long, the session gives its upstream lease back to the pool.
    pub lease_idle_ms: u64,
    /// Without a turn for this long, the session is closed (1000, `websocket idle timeout`).
    pub idle_timeout_ms: u64,
    /// Consecutive lease timeouts after which the session is closed with 1013.
    pub max_lease_failures: u32,
    /// Bytes of conversation a session keeps to replay a `store:false` chain whose connection
    /// is gone; past it a lost chain fails closed (`continuation_unavailable`), never truncated.
    pub replay_max_bytes: usize,
    /// How long a `store:true` response stays bound to its account and key
    /// (`response_bindings`); the upstream keeps stored responses 30 days.
    pub binding_ttl_s: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSettings {
    /// WebSocket handshake timeout towards an upstream account.
    pub connect_timeout_ms: u64,
    /// A turn with no upstream frame for this long has lost its upstream.
    pub read_timeout_ms: u64,
    /// Largest upstream frame accepted.
    pub frame_max_bytes: usize,
    /// A turn whose first upstream event has not arrived this long after its request was
    /// written has lost its upstream (retried on a fresh connection when nothing was
    /// forwarded): an upstream that went silent costs a turn seconds, not `read_timeout_ms`.
    pub first_event_timeout_ms: u64,
    /// A connection that has heard nothing from the upstream for this long is proven alive
    /// (ping, pong) before a request is written on it.
    pub probe_idle_ms: u64,
    /// How long that proof may take; no pong in time → the connection is dropped and the turn
    /// goes to a fresh one.
    pub probe_timeout_ms: u64,
    /// How the HTTP surface's `POST /responses` turns reach the upstream
    /// (docs/DESIGN.md#upstream-transports).
    pub http_transport: HttpTransport,
    /// How often what relays learnt of accounts' transports (426, refused lanes, 1009 limits)
    /// is shared through the database (docs/DESIGN.md#learnt-facts); 0: not shared.
    pub learnt_refresh_ms: u64,
    /// Learnt transport facts are forgotten this long after they were learnt: the next turn
    /// probes the upstream again.
    pub learnt_ttl_s: u64,
}

/// How an HTTP client's turn reaches the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpTransport {
    /// On a leased upstream WebSocket of the pool, where the account has one and the request
    /// fits its frame limit; else over HTTP.
    Ws,
    /// Always as an HTTP request of its own.
    Http,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolSettings {
    /// How long a session waits for an upstream connection before the turn is refused.
    pub lease_timeout_ms: u64,
    /// Connections are retired before this age (the upstream closes them at 60 minutes).
    pub max_age_s: u64,
    /// Idle connections kept open per account (beyond this they are closed).
    pub max_idle: usize,
    /// Idle connections older than this are closed.
    pub idle_timeout_s: u64,
    /// How long a prompt cache's or client session's account is remembered after its last
    /// turn (sticky routing, docs/DESIGN.md#routing); 0 keeps no affinity in the database
    /// (the rendezvous order alone then keeps an affinity on one account while the set of
    /// eligible accounts does not change).
    pub affinity_ttl_s: u64,
    /// An account whose credential the upstream refuses (401/403) is disabled: `probe` (one
    /// dial a minute; enabled again when one works) or `operator` (until
    /// `POST /admin/accounts/{name}/enable`).
    pub refused_credential: OnRefusedCredential,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest client frame; larger ones get `frame_too_large` and close 1009.
    pub client_frame_max_bytes: usize,
    /// Largest HTTP request body (`POST /v1/responses`, `/compact`); larger ones get 413
    /// `request_body_too_large`.
    pub http_body_max_bytes: usize,
    /// Bytes of one key's request bodies being received at once; a body that would pass it
    /// gets 429 `request_bytes_in_flight` (docs/DESIGN.md#http-surface).
    pub http_body_bytes_per_key: usize,
    /// An upload that sends nothing for this long gets 408 `request_body_timeout`.
    pub http_body_idle_timeout_ms: u64,
    /// A key's standing (revoked, disabled, quota, balance, allow-lists) and its affinities read
    /// for a turn serve the key's turns for this long before they are read again
    /// (docs/DESIGN.md#admission-cache); 0 reads them for every turn.
    pub standing_cache_ms: u64,
    /// Bytes sent to a client and not yet shown read (by a pong to a relay ping) before the
    /// session is ended with `client_too_slow`. What one connection can hold queued is this
    /// plus one frame.
    pub client_send_buffer_bytes: usize,
    /// A client socket whose peer acknowledges nothing (or keeps a zero window) for this long
    /// is aborted by the kernel (`TCP_USER_TIMEOUT`); 0 leaves the system default.
    pub client_stall_timeout_ms: u64,
    /// Sessions open at once per key when the key sets no `max_sessions`.
    pub default_max_sessions_per_key: i32,
    /// Refused handshakes from one address prefix (IPv4 /24, IPv6 /48) within a summary
    /// interval after which each further refusal is answered only after
    /// `refused_handshake_delay_ms` (valid keys are never delayed); 0 disables.
    pub refused_handshakes_before_delay: u32,
    pub refused_handshake_delay_ms: u64,
    /// PostgreSQL: a key's open sessions and turns in flight are counted for every relay on
    /// the database (`fleet_slots`); a dead relay's slots stop counting after this. 0: counted
    /// per relay only.
    pub fleet_slot_ttl_ms: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            on_overlap: OnOverlap::Queue,
            lane_queue_max: 64,
            lane_queue_max_bytes: 32 * 1024 * 1024,
            cancel_grace_ms: 5_000,
            drain_ms: 10_000,
            lease_idle_ms: 60_000,
            idle_timeout_ms: 900_000,
            max_lease_failures: 3,
            replay_max_bytes: 8 * 1024 * 1024,
            binding_ttl_s: 30 * 24 * 3600,
        }
    }
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            read_timeout_ms: 300_000,
            frame_max_bytes: 16 * 1024 * 1024,
            first_event_timeout_ms: 10_000,
            probe_idle_ms: 10_000,
            probe_timeout_ms: 1_000,
            http_transport: HttpTransport::Ws,
            learnt_refresh_ms: 10_000,
            learnt_ttl_s: 86_400,
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            lease_timeout_ms: 5_000,
            max_age_s: 55 * 60,
            max_idle: 8,
            idle_timeout_s: 300,
            affinity_ttl_s: 3600,
            refused_credential: OnRefusedCredential::Probe,
        }
    }
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            client_frame_max_bytes: 16 * 1024 * 1024,
            http_body_max_bytes: 16 * 1024 * 1024,
            http_body_bytes_per_key: 64 * 1024 * 1024,
            http_body_idle_timeout_ms: 10_000,
            standing_cache_ms: 1_000,
            client_send_buffer_bytes: 8 * 1024 * 1024,
            client_stall_timeout_ms: 30_000,
            default_max_sessions_per_key: 256,
            refused_handshakes_before_delay: 100,
            refused_handshake_delay_ms: 500,
            fleet_slot_ttl_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Client-facing listener: `IP:port`, or `host:port` (resolved at start).
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// actix-web worker threads; 0 = one per core.
    pub workers: usize,
    /// How long a graceful stop waits for open connections before dropping them.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://PATH` (the default, a file under `./data/`) or `postgres://…`.
    pub url: String,
    pub pool_max_size: usize,
    /// Wait for a pooled connection / for a new connection to open.
    pub connect_timeout_ms: u64,
    /// SQLite only: how long a writer waits on a locked database.
    pub sqlite_busy_timeout_ms: u64,
    /// Longest a statement may run: PostgreSQL's `statement_timeout`, and on both backends the
    /// client-side limit after which accounting treats the database as down (a database that
    /// accepts connections but never answers is an outage like any other).
    pub statement_timeout_ms: u64,
    /// Apply pending migrations when `serve` starts.
    pub migrate_on_start: bool,
    /// PostgreSQL unreachable when `serve` starts: it serves `/healthz`, answers `/readyz` 503
    /// and retries (doubling from 1 s up to this) until the database answers.
    pub start_retry_max_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Admin API listener; loopback by default. `IP:port`, or `host:port` (resolved at start).
    #[serde(deserialize_with = "socket_addr")]
    pub bind: SocketAddr,
    /// Bearer token for the admin API; empty disables the admin API (and `/metrics`).
    pub token: String,
    /// `GET /metrics` needs the token too (off: a loopback/private scrape target).
    pub metrics_require_token: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `turnpike=debug,actix_web=warn`); `RUST_LOG` wins when set.
    pub level: String,
    /// Refused handshakes are not logged one by one: one summary line per this many seconds
    /// (counts by reason and by address prefix) when there were any.
    pub refusal_summary_s: u64,
}

/// OpenTelemetry traces (docs/DESIGN.md#traces): one span per turn, exported over OTLP/HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySettings {
    /// The OTLP/HTTP traces endpoint (`http://collector:4318/v1/traces`); empty: no traces.
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of turns traced, 0 to 1 (a turn's span is kept or dropped whole).
    pub trace_sample_ratio: f64,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "turnpike".into(),
            trace_sample_ratio: 1.0,
        }
    }
}

/// What happens to an account whose credential the upstream refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnRefusedCredential {
    /// Disabled, probed once a minute: a fixed credential serves again by itself.
    #[default]
    Probe,
    /// Disabled until an operator enables it.
    Operator,
}

/// One upstream account: a credential and the pool of upstream sockets opened with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSettings {
    pub name: String,
    /// The HTTP base, e.g. `http://127.0.0.1:18080/v1`; the WebSocket URL is derived from it.
    pub base_url: String,
    /// Name of the environment variable holding the account's API key (preferred).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The API key itself (for local setups; prefer `api_key_env`).
    #[serde(default)]
    pub api_key: Option<String>,
    /// Most upstream sockets open at once for this account.
    #[serde(default = "default_max_conns")]
    pub max_conns: usize,
    /// Most turns in flight at once on this account; default `max_conns` × 16 (responses in
    /// flight per connection).
    #[serde(default)]
    pub max_concurrent_turns: Option<usize>,
    /// `OpenAI-Organization` sent on this account's upstream handshakes (never the client's).
    #[serde(default)]
    pub organization: Option<String>,
    /// `OpenAI-Project` sent on this account's upstream handshakes (never the client's).
    #[serde(default)]
    pub project: Option<String>,
    /// Accounts of a lower priority are used first; higher ones when those cannot serve.
    #[serde(default)]
    pub priority: i32,
    /// Share of the turns without an affinity among the accounts of one priority (≥ 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Largest `response.create` frame sent over this account's WebSocket; a larger turn goes
    /// as `POST /responses` (SSE) on the same account instead (docs/DESIGN.md#upstream-transports).
    /// Default 16 MiB − 1: OpenAI's endpoint closes a message of 16 MiB or more with 1009.
    #[serde(default = "default_account_frame_max")]
    pub frame_max_bytes: usize,
    /// Named lanes (`stream_id`) on this account's WebSocket (docs/DESIGN.md#upstream-transports).
    #[serde(default)]
    pub lanes: LanesMode,
    /// How turns reach this account: `auto` (its WebSocket, HTTP when it must) or `http` (an
    /// account without a WebSocket mode: every turn a `POST /responses`, no socket dialled).
    #[serde(default)]
    pub transport: AccountTransport,
}

/// How an account's turns reach it (docs/DESIGN.md#upstream-transports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountTransport {
    /// The WebSocket; HTTP for a turn too large for it, and for every turn once the upstream
    /// answered a handshake 426.
    #[default]
    Auto,
    /// HTTP only, declared: the relay never dials the account's WebSocket.
    Http,
}

/// Whether an account's WebSocket carries named lanes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LanesMode {
    /// Yes, until its upstream refuses a `stream_id`; then named lanes go over HTTP.
    #[default]
    Auto,
    /// Yes: a refusal of `stream_id` is relayed as any upstream error.
    Native,
    /// No: named lanes' turns go over HTTP from the start.
    Http,
}

fn default_weight() -> u32 {
    1
}

fn default_account_frame_max() -> usize {
    16 * 1024 * 1024 - 1
}

impl AccountSettings {
    /// An account with every optional setting at its default.
    pub fn new(name: &str, base_url: &str) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            api_key_env: None,
            api_key: None,
            max_conns: default_max_conns(),
            max_concurrent_turns: None,
            organization: None,
            project: None,
            priority: 0,
            weight: default_weight(),
            frame_max_bytes: default_account_frame_max(),
            lanes: LanesMode::Auto,
            transport: AccountTransport::Auto,
        }
    }

    /// The WebSocket URL, derived like clients derive it: scheme http→ws / https→wss, then
    /// `/responses` appended to the base path.
    pub fn ws_url(&self) -> String {
        let base = self.base_url.trim_end_matches('/');
        let swapped = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            base.to_string()
        };
        format!("{swapped}/responses")
    }

    /// The account's API key: `api_key_env` names a variable, else `api_key`.
    pub fn resolve_key(&self) -> Result<String, ConfigError> {
        if let Some(var) = &self.api_key_env {
            return std::env::var(var).map_err(|_| {
                ConfigError::new(
                    format!("accounts.{}.api_key_env", self.name),
                    format!("environment variable {var} is not set"),
                )
            });
        }
        self.api_key.clone().ok_or_else(|| {
            ConfigError::new(
                format!("accounts.{}.api_key", self.name),
                "no key configured",
            )
        })
    }

    /// The account's own handshake headers.
    pub fn handshake_headers(&self) -> Vec<(&'static str, String)> {
        [
            ("openai-organization", &self.organization),
            ("openai-project", &self.project),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }

    /// Default: every connection carrying the upstream's limit of responses in flight (lanes
    /// of one session share a connection, docs/DESIGN.md#overlap).
    pub fn turn_limit(&self) -> usize {
        self.max_concurrent_turns.unwrap_or(
            self.max_conns
                .saturating_mul(crate::protocol::frames::MAX_IN_FLIGHT),
        )
    }
}

fn default_max_conns() -> usize {
    16
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/turnpike.db".into(),
            pool_max_size: 8,
            connect_timeout_ms: 5_000,
            sqlite_busy_timeout_ms: 5_000,
            statement_timeout_ms: 15_000,
            migrate_on_start: true,
            start_retry_max_ms: 30_000,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8081)),
            token: String::new(),
            metrics_require_token: false,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            refusal_summary_s: 60,
        }
    }
}

/// A configuration problem, rendered as one line: `config: <key>: <problem> (<where>)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {key}: {problem}{}", origin.as_ref().map(|o| format!(" (in {o})")).unwrap_or_default())]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub origin: Option<String>,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
            origin: None,
        }
    }

    fn from_figment(err: figment::Error) -> Self {
        use figment::error::Kind;
        let origin = err.metadata.as_ref().map(|m| match &m.source {
            Some(source) => source.to_string(),
            None => m.name.to_string(),
        });
        let mut path = err.path.join(".");
        let problem = match &err.kind {
            // Name the offending key itself, not only its parent table.
            Kind::UnknownField(field, _) => {
                path = join_key(&path, field);
                "unknown key".to_string()
            }
            Kind::MissingField(field) => {
                path = join_key(&path, field);
                "missing required key".to_string()
            }
            other => one_line(&other.to_string()),
        };
        Self {
            key: if path.is_empty() {
                "(file)".into()
            } else {
                path
            },
            problem,
            origin,
        }
    }
}

/// Parser messages draw a source excerpt over several lines; keep the words, drop the drawing.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .collect::<Vec<_>>()
        .join(": ")
}

/// `parent.field`, unless figment's path already ends with the field.
fn join_key(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else if path == field || path.ends_with(&format!(".{field}")) {
        path.to_string()
    } else {
        format!("{path}.{field}")
    }
}

impl Settings {
    /// Defaults, then the TOML file (which must exist when named), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::new(
                    "--config",
                    format!("no such file: {}", path.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only `SECTION__KEY` variables are settings; `TURNPIKE_CONFIG` and test variables are not.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|k| k.as_str().contains("__"))
                .split("__"),
        );
        misspelled_env(std::env::vars().map(|(k, _)| k))?;
        let settings: Settings = figment.extract().map_err(ConfigError::from_figment)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks no serde type can express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        DatabaseTarget::parse(&self.database.url)?;
        if !(0.0..=1.0).contains(&self.telemetry.trace_sample_ratio) {
            return Err(ConfigError::new(
                "telemetry.trace_sample_ratio",
                "must be between 0 and 1",
            ));
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        if !endpoint.is_empty() && !endpoint.starts_with("http://") {
            return Err(ConfigError::new(
                "telemetry.otlp_endpoint",
                "expected http://HOST:PORT/v1/traces (OTLP over plain HTTP: a collector beside the relay)",
            ));
        }
        let prices = crate::billing::pricing::PriceTable::from_settings(&self.pricing)
            .map_err(|(key, e)| ConfigError::new(key, e.to_string()))?;
        let max_tokens = self.billing.max_tokens_per_response;
        if max_tokens == 0 {
            return Err(ConfigError::new(
                "billing.max_tokens_per_response",
                "must be at least 1",
            ));
        }
        if !prices
            .prices()
            .all(|p| crate::billing::bounds::max_cost_fits(p, max_tokens))
        {
            return Err(ConfigError::new(
                "billing.max_tokens_per_response",
                "at the dearest configured price a response of this size (as many input as \
                 output tokens) would cost more than $1,000,000; lower it or the prices",
            ));
        }
        if self.billing.reservation_block_turns > 1_000 {
            return Err(ConfigError::new(
                "billing.reservation_block_turns",
                "must be at most 1000",
            ));
        }
        if !(self.billing.reservation_block_turns..=10_000)
            .contains(&self.billing.reservation_block_max_turns)
        {
            return Err(ConfigError::new(
                "billing.reservation_block_max_turns",
                "must be between billing.reservation_block_turns and 10000",
            ));
        }
        // A block serving turns after its row stopped counting would admit them unreserved.
        let block_ms = self.billing.reservation_block_ms;
        if block_ms == 0 || block_ms / 1_000 >= self.billing.reservation_ttl_s {
            return Err(ConfigError::new(
                "billing.reservation_block_ms",
                "must be at least 1 and shorter than billing.reservation_ttl_s",
            ));
        }
        if self.database.pool_max_size == 0 {
            return Err(ConfigError::new(
                "database.pool_max_size",
                "must be at least 1",
            ));
        }
        // At most $1M a record (`bounds::MAX_COST_PER_RESPONSE_NANOUSD`): 5,000 of them
        // still sum inside 64 bits.
        if !(1..=5_000).contains(&self.accounting.batch_max_rows) {
            return Err(ConfigError::new(
                "accounting.batch_max_rows",
                "must be between 1 and 5000",
            ));
        }
        let token = self.admin.token.chars().count();
        if token > 0 && token < ADMIN_TOKEN_MIN_CHARS {
            return Err(ConfigError::new(
                "admin.token",
                format!(
                    "at least {ADMIN_TOKEN_MIN_CHARS} characters (this one has {token}); e.g. `openssl rand -hex 32`"
                ),
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::new("log.level", "must not be empty"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, account) in self.accounts.iter().enumerate() {
            let key = |field: &str| format!("accounts[{i}].{field}");
            if account.name.trim().is_empty() {
                return Err(ConfigError::new(key("name"), "must not be empty"));
            }
            if !seen.insert(account.name.as_str()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate account name {:?}", account.name),
                ));
            }
            if !(account.base_url.starts_with("http://")
                || account.base_url.starts_with("https://"))
            {
                return Err(ConfigError::new(
                    key("base_url"),
                    "must start with http:// or https://",
                ));
            }
            if account.api_key_env.is_none() && account.api_key.is_none() {
                return Err(ConfigError::new(
                    key("api_key_env"),
                    "set api_key_env or api_key",
                ));
            }
            if account.max_conns == 0 {
                return Err(ConfigError::new(key("max_conns"), "must be at least 1"));
            }
            if account.max_concurrent_turns == Some(0) {
                return Err(ConfigError::new(
                    key("max_concurrent_turns"),
                    "must be at least 1",
                ));
            }
            if account.weight == 0 {
                return Err(ConfigError::new(key("weight"), "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Which database a `database.url` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    Postgres(String),
    Sqlite(PathBuf),
}

impl DatabaseTarget {
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres(url.to_string()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| {
                ConfigError::new(
                    "database.url",
                    format!("expected sqlite://PATH or postgres://…, got {url:?}"),
                )
            })?;
        if path.is_empty() || path == ":memory:" {
            // Every pooled connection would see its own empty in-memory database.
            return Err(ConfigError::new(
                "database.url",
                "SQLite needs a file path (in-memory databases are not shared by the pool)",
            ));
        }
        Ok(Self::Sqlite(PathBuf::from(path)))
    }
}

impl DatabaseSettings {
    /// A PostgreSQL URL's `host:port` (5432 when none is given), for a connection probe.
    pub fn tcp_endpoint(&self) -> Option<String> {
        let DatabaseTarget::Postgres(url) = DatabaseTarget::parse(&self.url).ok()? else {
            return None;
        };
        let rest = url
            .trim_start_matches("postgres://")
            .trim_start_matches("postgresql://");
        let host = rest.rsplit('@').next().unwrap_or(rest);
        let host = host.split(['/', '?']).next().unwrap_or(host);
        if host.is_empty() {
            return None;
        }
        Some(
            if host
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            {
                host.to_string()
            } else {
                format!("{host}:5432")
            },
        )
    }

    /// Where the database is, for messages: `SQLite PATH`, or `PostgreSQL host:port/db`
    /// (never the user or the password).
    pub fn label(&self) -> String {
        match DatabaseTarget::parse(&self.url) {
            Ok(DatabaseTarget::Sqlite(path)) => format!("SQLite {}", path.display()),
            Ok(DatabaseTarget::Postgres(url)) => {
                let rest = url
                    .trim_start_matches("postgres://")
                    .trim_start_matches("postgresql://");
                let host = rest.rsplit('@').next().unwrap_or(rest);
                format!("PostgreSQL {}", host.split('?').next().unwrap_or(host))
            }
            Err(_) => "the configured database".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            DatabaseTarget::parse("sqlite://data/t.db").unwrap(),
            DatabaseTarget::Sqlite("data/t.db".into())
        );
        assert_eq!(
            DatabaseTarget::parse("sqlite:/tmp/x.db").unwrap(),
            DatabaseTarget::Sqlite("/tmp/x.db".into())
        );
        assert!(matches!(
            DatabaseTarget::parse("postgres://u@h/db").unwrap(),
            DatabaseTarget::Postgres(_)
        ));
        assert_eq!(
            DatabaseTarget::parse("mysql://x").unwrap_err().key,
            "database.url"
        );
        assert!(DatabaseTarget::parse("sqlite://:memory:").is_err());
    }

    #[test]
    fn defaults_validate() {
        Settings::default().validate().unwrap();
        assert_eq!(
            Settings::default().server.bind.to_string(),
            "127.0.0.1:8080"
        );
    }

    #[test]
    fn duplicate_accounts_are_named() {
        let mut s = Settings::default();
        let a = AccountSettings {
            api_key_env: Some("K".into()),
            ..AccountSettings::new("a", "http://x/v1")
        };
        s.accounts = vec![a.clone(), a];
        let err = s.validate().unwrap_err();
        assert_eq!(err.key, "accounts[1].name");
    }

    #[test]
    fn a_block_never_outlives_its_reservation() {
        let mut s = Settings::default();
        s.billing.reservation_ttl_s = 2;
        s.billing.reservation_block_ms = 1_999;
        s.validate().unwrap();
        s.billing.reservation_block_ms = 2_000;
        let err = s.validate().unwrap_err();
        assert_eq!(err.key, "billing.reservation_block_ms");
        s.billing.reservation_block_ms = 0;
        assert_eq!(
            s.validate().unwrap_err().key,
            "billing.reservation_block_ms"
        );
    }

    #[test]
    fn ws_url_is_derived_like_clients_do() {
        let mut a = AccountSettings {
            api_key: Some("k".into()),
            ..AccountSettings::new("a", "http://127.0.0.1:18080/v1")
        };
        assert_eq!(a.ws_url(), "ws://127.0.0.1:18080/v1/responses");
        a.base_url = "https://api.openai.com/v1/".into();
        assert_eq!(a.ws_url(), "wss://api.openai.com/v1/responses");
        assert_eq!(a.resolve_key().unwrap(), "k");
        a.api_key_env = Some("TURNPIKE_TEST_SURELY_UNSET".into());
        assert!(a.resolve_key().unwrap_err().to_string().contains("not set"));
    }
}

#[cfg(test)]
mod database_tests {
    use super::*;

    #[test]
    fn endpoints_and_labels_never_carry_credentials() {
        let db = |url: &str| DatabaseSettings {
            url: url.into(),
            ..DatabaseSettings::default()
        };
        let pg = db("postgres://u:pw@db.internal:6432/turnpike?sslmode=require");
        assert_eq!(pg.tcp_endpoint().as_deref(), Some("db.internal:6432"));
        assert_eq!(pg.label(), "PostgreSQL db.internal:6432/turnpike");
        assert_eq!(
            db("postgresql://db/x").tcp_endpoint().as_deref(),
            Some("db:5432")
        );
        assert_eq!(db("sqlite://data/t.db").tcp_endpoint(), None);
    }
}

#[cfg(test)]
mod shipped_file_tests {
    use super::*;

    /// `config/turnpike.toml` sets every key to its default, so the file is the reference.
    #[test]
    fn reference_file_documents_every_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/turnpike.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed: Settings = Figment::from(Toml::file_exact(&path)).extract().unwrap();
        assert_eq!(parsed, Settings::default());
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        for (section, keys) in defaults.as_object().unwrap() {
            let Some(keys) = keys.as_object() else {
                continue;
            };
            let body = text
                .split(&format!("[{section}]\n"))
                .nth(1)
                .unwrap_or_else(|| panic!("no [{section}] in turnpike.toml"));
            for (key, value) in keys {
                let documented = if value.is_object() {
                    text.contains(&format!("[{section}.{key}"))
                } else {
                    body.contains(&format!("\n{key} = "))
                };
                assert!(documented, "{section}.{key} undocumented");
            }
        }
    }
}
