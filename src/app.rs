//! Wiring and order: database → (actors, later) → listeners; shutdown in reverse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use tracing::{info, warn};
use tracing_actix_web::TracingLogger;

use crate::config::{ConfigError, Settings};
use crate::db::{DbError, DbPool, migrate};
use crate::http::health::{self, Readiness};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{key} {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Server(#[from] std::io::Error),
}

/// Opens the pool and applies pending migrations when configured to.
pub async fn open_database(settings: &Settings, migrate_now: bool) -> Result<DbPool, AppError> {
    let db = DbPool::connect(&settings.database)?;
    if migrate_now {
        let applied = migrate::run_pending(&db).await?;
        info!(backend = db.backend(), applied = ?applied, "migrations up to date");
    }
    Ok(db)
}

/// `turnpike serve`: runs until SIGINT/SIGTERM, then stops accepting, reports not-ready, and
/// waits at most `server.shutdown_grace_ms` for open connections.
pub async fn serve(settings: Settings) -> Result<(), AppError> {
    let db = open_database(&settings, settings.database.migrate_on_start).await?;
    let draining = Arc::new(AtomicBool::new(false));
    let readiness = Readiness {
        db: db.clone(),
        draining: draining.clone(),
    };
    let grace = Duration::from_millis(settings.server.shutdown_grace_ms);
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(TracingLogger::default())
            .app_data(web::Data::new(readiness.clone()))
            .configure(health::routes)
    })
    .disable_signals()
    .shutdown_timeout(grace.as_secs().max(1));
    if settings.server.workers > 0 {
        server = server.workers(settings.server.workers);
    }
    let addr = settings.server.bind;
    let server = server.bind(addr).map_err(|source| AppError::Bind {
        key: "server.bind",
        addr,
        source,
    })?;
    for a in server.addrs() {
        info!(addr = %a, backend = db.backend(), "turnpike listening on http://{a}");
    }
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        let signal = wait_for_signal().await;
        info!(signal, "shutting down");
        draining.store(true, Ordering::Relaxed);
        handle.stop(true).await;
    });
    server.await?;
    info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT with the signal's name.
pub async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(e) => {
            warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the server");
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
