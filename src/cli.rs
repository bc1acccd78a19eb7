//! Subcommands → functions. Errors are one line on stderr; exit code 2 for bad configuration
//! or arguments, 1 for everything else.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, AppError};
use crate::auth::{self, AuthError, KeyRequest};
use crate::billing::money;
use crate::config::{ConfigError, Settings};
use crate::db::{DbError, DbPool, queries};
use crate::export;
use crate::manage;
use crate::record::CompensationStatus;

#[derive(Debug, Parser)]
#[command(
    name = "turnpike",
    version,
    about = "Relay for the OpenAI Responses API WebSocket mode"
)]
pub struct Cli {
    /// Configuration file (TOML). Without it: built-in defaults plus TURNPIKE_* variables.
    #[arg(long, global = true, env = "TURNPIKE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Let a users/keys/compensations command create the database (apply the migrations) when
    /// it holds no turnpike tables yet; without it such a command refuses, so a missing
    /// `--config` never silently makes a new `./data/turnpike.db`.
    #[arg(long, global = true)]
    pub create: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (applies pending migrations first unless database.migrate_on_start=false).
    Serve,
    /// Apply pending database migrations and exit (idempotent).
    Migrate,
    /// Ask the relay on this machine whether it is ready (`GET /readyz` on server.bind): exit 0
    /// when it is, 1 with the reason when not — a container's HEALTHCHECK, which has no curl.
    Healthcheck {
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Manage users.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect and re-queue failed debits.
    #[command(subcommand)]
    Compensations(CompensationsCommand),
    /// Usage rows: export them, read the daily rollups, purge old rows.
    #[command(subcommand)]
    Usage(UsageCommand),
    /// Run the simulated upstream (a Responses WebSocket server with scriptable faults).
    Sim(SimArgs),
    /// Run the relay against an in-process simulated upstream, with a fresh demo key.
    Demo {
        /// Where the simulated upstream listens.
        #[arg(long, default_value = "127.0.0.1:18080")]
        sim_bind: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum CompensationsCommand {
    /// List compensations (all, or one status: pending, settled, dead).
    List {
        #[arg(long)]
        status: Option<String>,
    },
    /// Re-queue a dead (or pending) compensation: due now, attempts reset.
    Retry { id: i64 },
}

/// Which usage an export or the rollups cover.
#[derive(Debug, clap::Args)]
pub struct UsageRange {
    /// From this on (YYYY-MM-DD, or an RFC 3339 time).
    #[arg(long)]
    from: Option<String>,
    /// Up to, not including, this.
    #[arg(long)]
    to: Option<String>,
    /// One key's, by its display prefix (tpk_…).
    #[arg(long)]
    key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Write usage rows to stdout, oldest first, streamed (docs/DESIGN.md#retention).
    Export {
        #[command(flatten)]
        range: UsageRange,
        #[arg(long)]
        model: Option<String>,
        /// csv or jsonl.
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Daily rollups per key and model, with the cache hit rate (they outlive purged rows).
    Daily {
        #[command(flatten)]
        range: UsageRange,
    },
    /// Delete usage rows accepted before a time, in batches; the daily rollups keep their sums
    /// and rows whose debit is not settled stay.
    Purge {
        /// YYYY-MM-DD, or an RFC 3339 time.
        #[arg(long)]
        before: String,
        /// Rows deleted per statement (each batch its own short transaction).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(i64).range(1..))]
        batch: i64,
    },
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Listen address (port 0 picks a free port; the address is logged).
    #[arg(long, default_value = "127.0.0.1:18080")]
    pub bind: std::net::SocketAddr,
    /// Accepted bearer key (repeatable). Without it any non-empty key is accepted.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,
    /// Connection age limit in ms (the real service: 60 minutes).
    #[arg(long, default_value_t = 3_600_000)]
    pub max_age_ms: u64,
    /// How often each socket is pinged, in ms.
    #[arg(long, default_value_t = 20_000)]
    pub ping_interval_ms: u64,
    /// Close a socket whose last pong is older than this (ms).
    #[arg(long, default_value_t = 80_000)]
    pub pong_timeout_ms: u64,
    /// Largest client frame accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    pub max_frame_bytes: usize,
    /// Do not keep frames in the inspection log (for benchmarks).
    #[arg(long)]
    pub no_record: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Fixed id seed (hex): a restarted sim with the same seed repeats its response ids, as an
    /// upstream may. Default: random per process.
    #[arg(long)]
    pub id_seed: Option<String>,
    /// Largest HTTP request body accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Refuse `stream_id` with 400 "Unsupported parameter" (an upstream without lanes).
    #[arg(long)]
    pub refuse_stream_id: bool,
    /// Answer WebSocket handshakes 426 (an upstream reachable over HTTP only).
    #[arg(long)]
    pub http_only: bool,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a user (no balance limit unless --balance-usd).
    Create {
        name: String,
        /// Prepaid balance in USD, e.g. 25 or 0.50.
        #[arg(long, value_name = "USD", allow_hyphen_values = true)]
        balance_usd: Option<String>,
    },
    /// List users.
    List,
    /// Set a user's prepaid balance in USD ("none" removes the limit).
    SetBalance {
        name: String,
        #[arg(allow_hyphen_values = true)]
        usd: String,
    },
    /// Add USD to a user's prepaid balance (a user without a balance limit has none to top up).
    TopUp { name: String, usd: String },
    /// Refuse every key of a user from the next connect or turn on.
    Disable { name: String },
    /// Re-enable a disabled user.
    Enable { name: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key; prints the key, and only the key, on stdout. It is not shown again.
    Create {
        #[arg(long)]
        user: String,
        /// Spending cap of this key in USD.
        #[arg(long, value_name = "USD", allow_hyphen_values = true)]
        quota_usd: Option<String>,
        /// Most client WebSockets open at once with this key.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
        max_sessions: Option<i32>,
        /// Most turns in flight at once with this key.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
        max_concurrent_turns: Option<i32>,
        /// Free-text label.
        #[arg(long)]
        label: Option<String>,
        /// Models the key may use, comma-separated (default: any).
        #[arg(long, value_name = "MODEL,…", value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Service tiers the key may ask for, comma-separated: standard, flex, priority, …
        /// (default: any; each billed at its price).
        #[arg(long, value_name = "TIER,…", value_delimiter = ',')]
        service_tiers: Option<Vec<String>>,
    },
    /// List keys (prefixes only; keys are never stored).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a key by id.
    Revoke { id: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    BadValue(String),
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already (exit 1, like "no such").
    #[error("{0}")]
    Exists(String),
    #[error(transparent)]
    App(#[from] AppError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{target}: {source}{}", .cause.as_deref().map_or(String::new(), |c| format!(" ({c})")))]
    DbAt {
        target: String,
        source: DbError,
        /// What a TCP probe of the server found, when the driver said no more than that it
        /// could not connect.
        cause: Option<String>,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl From<manage::ManageError> for CliError {
    fn from(e: manage::ManageError) -> Self {
        use manage::ManageError as M;
        match e {
            M::Invalid(m) => CliError::BadValue(m),
            M::NotFound(m) => CliError::NotFound(m),
            M::Exists(m) => CliError::Exists(m),
            M::Db(e) => CliError::Db(e),
            M::Auth(e) => CliError::Auth(e),
        }
    }
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::BadValue(_) => 2,
            CliError::App(AppError::Config(_)) => 2,
            _ => 1,
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

pub fn run(cli: Cli) -> Result<(), CliError> {
    let settings = Settings::load(cli.config.as_deref())?;
    if matches!(
        cli.command,
        Command::Serve | Command::Migrate | Command::Sim(_) | Command::Demo { .. }
    ) {
        crate::telemetry::init(&settings.log, &settings.telemetry);
    }
    // Actors, awc and the pool's PostgreSQL drivers need an actix System.
    actix_web::rt::System::new().block_on(dispatch(cli.command, settings, cli.create))
}

/// A database error of a management command, naming the database.
fn at_database(target: String, endpoint: Option<String>) -> impl Fn(CliError) -> CliError {
    move |e| match e {
        CliError::Db(source) | CliError::App(AppError::Db(source)) => CliError::DbAt {
            target: target.clone(),
            cause: endpoint
                .as_deref()
                .filter(|_| source.to_string().ends_with("error connecting to server"))
                .map(crate::db::tcp_probe),
            source,
        },
        other => other,
    }
}

/// Opens the database for a command, saying which one (stderr). A command that only reads
/// never migrates, and says so when migrations are pending; a command that writes refuses a
/// database without turnpike tables (a new SQLite file, an empty PostgreSQL database) unless
/// `--create` — a forgotten `--config` must not quietly create `./data/turnpike.db`.
async fn open_for(
    settings: &Settings,
    read_only: bool,
    create: bool,
) -> Result<crate::db::DbPool, CliError> {
    let label = settings.database.label();
    eprintln!("database: {label}");
    let missing_file = match crate::config::DatabaseTarget::parse(&settings.database.url) {
        Ok(crate::config::DatabaseTarget::Sqlite(path)) => !path.exists(),
        _ => false,
    };
    let refuse_new = || {
        CliError::NotFound(format!(
            "{label} holds no turnpike tables: point --config (or TURNPIKE_DATABASE__URL) at your \
             database, or create this one with `turnpike migrate` or --create"
        ))
    };
    if !create && missing_file {
        return Err(refuse_new());
    }
    // One pool, one read of the applied migrations, then what the command may do about them.
    let db = app::open_database(settings, false).await?;
    let pending = crate::db::migrate::pending(&db).await?;
    if !pending.is_empty() {
        if read_only {
            return Err(CliError::NotFound(
                "the database has pending migrations; run `turnpike migrate` first".into(),
            ));
        }
        if !create && crate::db::migrate::is_fresh_given(&db, pending.len())? {
            return Err(refuse_new());
        }
        crate::db::migrate::run_pending(&db).await?;
    }
    Ok(db)
}

async fn dispatch(command: Command, settings: Settings, create: bool) -> Result<(), CliError> {
    let at = at_database(settings.database.label(), settings.database.tcp_endpoint());
    match command {
        Command::Serve => {
            rustls_provider();
            // A database error at start names the database (path, or host:port/db).
            let served = app::serve(settings).await.map_err(|e| at(e.into()));
            crate::telemetry::flush_traces();
            Ok(served?)
        }
        Command::Healthcheck { timeout_ms } => healthcheck(&settings, timeout_ms),
        Command::Migrate => {
            // One line: what was applied, or that nothing was pending.
            let run = async {
                let db = app::open_database(&settings, false).await?;
                let applied = crate::db::migrate::run_pending(&db).await?;
                Ok::<_, AppError>((db.backend(), applied))
            };
            let (backend, applied) = run.await.map_err(|e| at(e.into()))?;
            if applied.is_empty() {
                eprintln!("migrations up to date ({backend})");
            } else {
                eprintln!("migrations applied ({backend}): {}", applied.join(", "));
            }
            Ok(())
        }
        // Commands that only read never change the schema.
        Command::Users(cmd) => {
            let read_only = matches!(cmd, UsersCommand::List);
            let run = async { users(&open_for(&settings, read_only, create).await?, cmd).await };
            run.await.map_err(at)
        }
        Command::Keys(cmd) => {
            let read_only = matches!(cmd, KeysCommand::List { .. });
            let run = async { keys(&open_for(&settings, read_only, create).await?, cmd).await };
            run.await.map_err(at)
        }
        Command::Compensations(cmd) => {
            let read_only = matches!(cmd, CompensationsCommand::List { .. });
            let run =
                async { compensations(&open_for(&settings, read_only, create).await?, cmd).await };
            run.await.map_err(at)
        }
        Command::Usage(cmd) => {
            let read_only = !matches!(cmd, UsageCommand::Purge { .. });
            let run = async { usage(&open_for(&settings, read_only, create).await?, cmd).await };
            run.await.map_err(at)
        }
        Command::Sim(args) => sim(args).await,
        Command::Demo { sim_bind } => {
            rustls_provider();
            demo(settings, sim_bind).await
        }
    }
}

async fn demo(mut settings: Settings, sim_bind: std::net::SocketAddr) -> Result<(), CliError> {
    // Both ports first: a port in use is one clear error, and no key is made for nothing.
    let listener = app::bind_listener("server.bind", settings.server.bind)?;
    let sim_listener = app::bind_listener("--sim-bind", sim_bind)?;
    settings.server.bind = listener.local_addr().map_err(AppError::from)?;
    let db = app::open_database(&settings, true).await?;
    let user = match queries::users::by_name(&db, "demo").await? {
        Some(u) => u,
        None => queries::users::create(&db, "demo", None).await?,
    };
    // One demo key at a time: the keys of earlier demos are revoked.
    for (old, _) in queries::keys::list(&db, Some("demo")).await? {
        if old.revoked_at.is_none() && old.label.as_deref() == Some("demo") {
            queries::keys::revoke(&db, old.id).await?;
        }
    }
    let (key, _) = auth::create_key(
        &db,
        user.id,
        &KeyRequest {
            label: Some("demo".into()),
            ..KeyRequest::default()
        },
    )
    .await?;
    let (sim, sim_server) = crate::sim::start_on(crate::sim::SimConfig::default(), sim_listener)
        .map_err(|source| AppError::Bind {
            key: "--sim-bind",
            addr: sim_bind,
            source,
        })?;
    actix_web::rt::spawn(sim_server);
    settings.accounts = vec![crate::config::AccountSettings {
        api_key: Some("sk-sim-demo".into()),
        max_conns: 8,
        ..crate::config::AccountSettings::new("sim", &sim.base_url())
    }];
    let base = format!("http://{}/v1", settings.server.bind);
    println!(
        "turnpike demo: relay on {base}, simulated upstream on {}\n\n\
         Your demo key (shown once):\n  {key}\n\n\
         Codex ($CODEX_HOME/config.toml, then `TURNPIKE_KEY={key} codex exec --skip-git-repo-check \"Say hello\"`;\n\
         the flag is needed outside a git repository):\n\
         \n  model = \"gpt-5.2\"\n  model_provider = \"turnpike\"\n\n  [model_providers.turnpike]\n  \
         name = \"turnpike\"\n  base_url = \"{base}\"\n  wire_api = \"responses\"\n  \
         env_key = \"TURNPIKE_KEY\"\n  supports_websockets = true\n\n\
         Python (pip install \"openai[realtime]\"):\n\n  from openai import OpenAI\n  \
         client = OpenAI(api_key=\"{key}\", base_url=\"{base}\")\n  \
         with client.responses.connect() as conn:\n      \
         conn.response.create(model=\"gpt-test\", input=\"Say hello\", store=False)\n      \
         for ev in conn:\n          print(ev.type)\n          \
         if ev.type == \"response.completed\": break\n\n\
         Script the simulated upstream with [[sim: …]] in your prompt (see docs/testing.md). Ctrl-C stops.",
        sim.addr
    );
    let deps = app::start_relay(settings, db)?;
    let _compensator = app::start_compensator(&deps.settings, deps.db.clone());
    tracing::info!(relay = %base, sim = %sim.addr, "demo ready (earlier demo keys revoked)");
    app::run_server(deps, listener).await?;
    Ok(())
}

async fn sim(args: SimArgs) -> Result<(), CliError> {
    use std::time::Duration;
    let config = crate::sim::SimConfig {
        api_keys: args.api_keys,
        max_age: Duration::from_millis(args.max_age_ms),
        ping_interval: Duration::from_millis(args.ping_interval_ms.max(1)),
        pong_timeout: Duration::from_millis(args.pong_timeout_ms),
        max_frame: args.max_frame_bytes,
        record_frames: !args.no_record,
        workers: args.workers,
        id_seed: args.id_seed,
        max_body: args.max_body_bytes,
        refuse_stream_id: args.refuse_stream_id,
        http_only: args.http_only,
    };
    let (handle, server) =
        crate::sim::start(config, args.bind).map_err(|source| AppError::Bind {
            key: "--bind",
            addr: args.bind,
            source,
        })?;
    tracing::info!(
        "turnpike sim listening on http://{} (base_url {})",
        handle.addr,
        handle.base_url()
    );
    let stopper = handle.server.clone();
    actix_web::rt::spawn(async move {
        let signal = app::wait_for_signal().await;
        tracing::info!(signal, "sim shutting down");
        stopper.stop(false).await;
    });
    server.await.map_err(AppError::Server)?;
    Ok(())
}

/// awc's rustls connector needs a process-wide crypto provider.
fn rustls_provider() {
    // Err only means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn users(db: &DbPool, cmd: UsersCommand) -> Result<(), CliError> {
    let op = manage::Operator::cli();
    match cmd {
        UsersCommand::Create { name, balance_usd } => {
            let balance = balance_usd
                .map(|b| manage::usd("--balance-usd", &b))
                .transpose()?;
            let user = manage::create_user(db, &op, &name, balance).await?;
            eprintln!("created user {} (id {})", user.name, user.id);
        }
        UsersCommand::List => {
            let rows = queries::users::list(db).await?;
            let table = rows.iter().map(|u| {
                vec![
                    u.id.to_string(),
                    u.name.clone(),
                    if u.enabled { "yes" } else { "no" }.into(),
                    opt_usd(u.balance_nanousd),
                    u.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                ]
            });
            print_table(
                &["ID", "NAME", "ENABLED", "BALANCE_USD", "CREATED_UTC"],
                table,
            );
        }
        UsersCommand::SetBalance { name, usd } => {
            let balance = match usd.trim() {
                "none" | "unlimited" => None,
                text => Some(manage::usd("USD", text)?),
            };
            let now = manage::balance(db, &op, &name, manage::Balance::Set(balance)).await?;
            eprintln!("balance of {name}: {}", opt_usd(now));
        }
        UsersCommand::TopUp { name, usd } => {
            let add = manage::usd("USD", &usd)?;
            let now = manage::balance(db, &op, &name, manage::Balance::Add(add)).await?;
            eprintln!("balance of {name}: {}", opt_usd(now));
        }
        UsersCommand::Disable { name } => {
            manage::set_enabled(db, &op, &name, false).await?;
            eprintln!("disabled {name}");
        }
        UsersCommand::Enable { name } => {
            manage::set_enabled(db, &op, &name, true).await?;
            eprintln!("enabled {name}");
        }
    }
    Ok(())
}

async fn keys(db: &DbPool, cmd: KeysCommand) -> Result<(), CliError> {
    match cmd {
        KeysCommand::Create {
            user,
            quota_usd,
            max_sessions,
            max_concurrent_turns,
            label,
            models,
            service_tiers,
        } => {
            let req = KeyRequest {
                label,
                quota_nanousd: quota_usd
                    .map(|q| manage::usd("--quota-usd", &q))
                    .transpose()?,
                max_sessions,
                max_concurrent_turns,
                allowed_models: models,
                allowed_service_tiers: service_tiers,
            };
            let (key, row) = manage::create_key(db, &manage::Operator::cli(), &user, &req).await?;
            // The key goes to stdout alone so that `KEY=$(turnpike keys create …)` works.
            println!("{key}");
            eprintln!(
                "created key {} ({}…) for {user}; it is not shown again",
                row.id, row.key_prefix
            );
        }
        KeysCommand::List { user } => {
            let rows = queries::keys::list(db, user.as_deref()).await?;
            let table = rows.iter().map(|(k, owner)| {
                vec![
                    k.id.to_string(),
                    owner.clone(),
                    format!("{}…", k.key_prefix),
                    k.label.clone().unwrap_or_default(),
                    opt_usd(k.quota_nanousd),
                    money::format_usd(k.spent_nanousd),
                    opt_num(k.max_sessions),
                    opt_num(k.max_concurrent_turns),
                    k.allowed_models.clone().unwrap_or_else(|| "any".into()),
                    k.allowed_service_tiers
                        .clone()
                        .unwrap_or_else(|| "any".into()),
                    if k.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    }
                    .into(),
                    k.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                ]
            });
            print_table(
                &[
                    "ID",
                    "USER",
                    "PREFIX",
                    "LABEL",
                    "QUOTA_USD",
                    "SPENT_USD",
                    "MAX_SESSIONS",
                    "MAX_TURNS",
                    "MODELS",
                    "TIERS",
                    "STATE",
                    "CREATED_UTC",
                ],
                table,
            );
        }
        KeysCommand::Revoke { id } => {
            manage::revoke_key(db, &manage::Operator::cli(), id).await?;
            eprintln!("revoked key {id}");
        }
    }
    Ok(())
}

async fn compensations(db: &DbPool, cmd: CompensationsCommand) -> Result<(), CliError> {
    match cmd {
        CompensationsCommand::List { status } => {
            let status = match status.as_deref() {
                None => None,
                Some(s) => Some(CompensationStatus::parse(s).ok_or_else(|| {
                    CliError::BadValue(format!("--status {s:?}: expected pending, settled or dead"))
                })?),
            };
            let rows = queries::billing::compensations(db, status, None).await?;
            let table = rows.iter().map(|(c, key_prefix)| {
                vec![
                    c.id.to_string(),
                    c.status.clone(),
                    c.request_id.clone(),
                    format!("{key_prefix}… ({})", c.api_key_id),
                    money::format_usd(c.amount_nanousd),
                    c.attempts.to_string(),
                    c.next_attempt_at
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "-".into()),
                    c.last_error.clone().unwrap_or_default(),
                ]
            });
            print_table(
                &[
                    "ID",
                    "STATUS",
                    "REQUEST_ID",
                    "KEY",
                    "AMOUNT_USD",
                    "ATTEMPTS",
                    "NEXT_UTC",
                    "LAST_ERROR",
                ],
                table,
            );
        }
        CompensationsCommand::Retry { id } => {
            if !queries::billing::requeue_compensation(db, id).await? {
                return Err(CliError::NotFound(format!(
                    "no unsettled compensation with id {id}"
                )));
            }
            let op = manage::Operator::cli();
            let target = id.to_string();
            manage::audit(
                db,
                &op,
                "compensations.retry",
                &target,
                serde_json::json!({}),
            )
            .await;
            eprintln!("compensation {id} re-queued");
        }
    }
    Ok(())
}

fn opt_usd(nanos: Option<i64>) -> String {
    nanos.map_or_else(|| "-".into(), money::format_usd)
}

fn opt_num(n: Option<i32>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

/// Left-aligned columns separated by two spaces.
/// `GET /readyz` on the relay's own port (a wildcard bind is asked on loopback).
fn healthcheck(settings: &Settings, timeout_ms: u64) -> Result<(), CliError> {
    use std::io::{Read, Write};
    let mut addr = settings.server.bind;
    if addr.ip().is_unspecified() {
        let lo: std::net::IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        };
        addr.set_ip(lo);
    }
    let timeout = std::time::Duration::from_millis(timeout_ms.max(1));
    let fail = |why: String| CliError::NotFound(format!("not ready: {addr}: {why}"));
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| fail(e.to_string()))?;
    conn.set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_write_timeout(Some(timeout)))
        .and_then(|()| {
            conn.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        })
        .map_err(|e| fail(e.to_string()))?;
    let mut answer = Vec::new();
    conn.take(64 * 1024)
        .read_to_end(&mut answer)
        .map_err(|e| fail(e.to_string()))?;
    let answer = String::from_utf8_lossy(&answer);
    if answer.starts_with("HTTP/1.1 200") {
        return Ok(());
    }
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    let why = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| answer.lines().next().unwrap_or("no answer").to_string());
    Err(fail(why))
}

fn time_arg(flag: &str, text: Option<&str>) -> Result<Option<chrono::NaiveDateTime>, CliError> {
    text.map(|t| export::parse_time(flag, t).map_err(CliError::BadValue))
        .transpose()
}

async fn usage(db: &DbPool, cmd: UsageCommand) -> Result<(), CliError> {
    match cmd {
        UsageCommand::Export {
            range,
            model,
            format,
        } => {
            use futures_util::StreamExt;
            use std::io::Write;
            let format = export::Format::parse(&format).ok_or_else(|| {
                CliError::BadValue(format!("--format {format:?}: expected csv or jsonl"))
            })?;
            let filter = queries::usage::ExportFilter {
                from: time_arg("--from", range.from.as_deref())?,
                to: time_arg("--to", range.to.as_deref())?,
                key_prefix: range.key,
                model,
            };
            let chunks = export::stream(db.clone(), filter, format);
            futures_util::pin_mut!(chunks);
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = chunks.next().await {
                // A reader that went away (`| head`) ends the export quietly.
                if out.write_all(&chunk?).is_err() {
                    return Ok(());
                }
            }
            let _ = out.flush();
        }
        UsageCommand::Daily { range } => {
            let day = |flag: &str, t: Option<String>| time_arg(flag, t.as_deref());
            let rows = queries::usage::daily(
                db,
                day("--from", range.from)?.map(|t| t.date()),
                day("--to", range.to)?.map(|t| t.date()),
                range.key.as_deref(),
            )
            .await?;
            let table = rows.iter().map(|(d, prefix)| {
                vec![
                    d.day.to_string(),
                    format!("{prefix}…"),
                    d.model.clone(),
                    d.turns.to_string(),
                    d.input_tokens.to_string(),
                    d.cached_input_tokens.to_string(),
                    export::hit_rate(d).map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
                    d.output_tokens.to_string(),
                    money::format_usd(d.cost_nanousd),
                ]
            });
            print_table(
                &[
                    "DAY", "KEY", "MODEL", "TURNS", "INPUT", "CACHED", "HIT", "OUTPUT", "COST_USD",
                ],
                table,
            );
        }
        UsageCommand::Purge { before, batch } => {
            let before = export::parse_time("--before", &before).map_err(CliError::BadValue)?;
            let mut total = 0;
            loop {
                let n = queries::usage::purge_batch(db, before, batch).await?;
                total += n;
                if i64::try_from(n).unwrap_or(i64::MAX) < batch {
                    break;
                }
            }
            let detail = serde_json::json!({"before": crate::utc::text(&before), "rows": total});
            manage::audit(
                db,
                &manage::Operator::cli(),
                "usage.purge",
                "usage_logs",
                detail,
            )
            .await;
            eprintln!(
                "purged {total} usage rows accepted before {} (daily rollups kept)",
                crate::utc::text(&before)
            );
        }
    }
    Ok(())
}

fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}
