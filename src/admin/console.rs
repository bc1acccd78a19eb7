//! The operators' console (docs/DESIGN.md#console): one page served by the admin listener, its
//! assets embedded in the binary (no build step, nothing fetched at run time). The page itself
//! holds no data: it asks for the admin token (kept for the tab only) and reads and acts through
//! the admin API and `/metrics` — the same numbers as everyone else.

use actix_web::{HttpResponse, web};

use crate::http::error::HttpError;
use crate::protocol::errors::ErrorCode;

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const APP_CSS: &str = include_str!("console/app.css");

/// Only its own scripts and styles, only its own origin, never framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/console", web::get().to(index))
        .route("/admin/console/{asset}", web::get().to(asset));
}

fn page(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        .insert_header(("content-security-policy", CSP))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header(("cache-control", "no-store"))
        .body(body)
}

async fn index() -> HttpResponse {
    page("text/html; charset=utf-8", INDEX)
}

async fn asset(name: web::Path<String>) -> Result<HttpResponse, HttpError> {
    match name.as_str() {
        "app.js" => Ok(page("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Ok(page("text/css; charset=utf-8", APP_CSS)),
        other => Err(HttpError::new(
            ErrorCode::NotFound,
            format!("no console asset {other:?}"),
        )),
    }
}
