//! The control face: change the delay, cut and heal regions, see every link.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};

use crate::Links;

pub struct Control(pub Links);

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

impl web::Service for Control {
    async fn call(&self, req: Request<Incoming>, _conn: &web::Connection) -> Response<web::Body> {
        let links = &self.0;
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/status") => web::json(StatusCode::OK, &links.status()),
            (&Method::GET, "/healthz") | (&Method::GET, "/readyz") => {
                web::text(StatusCode::OK, "text/plain", "ok\n")
            }
            (&Method::GET, "/metrics") => web::render_metrics(),
            (&Method::POST, "/delay") => {
                let parsed = query(&req, "ms").and_then(|ms| ms.parse::<u64>().ok());
                let Some(ms) = parsed else {
                    return web::error(
                        StatusCode::BAD_REQUEST,
                        "bad_delay",
                        "expected ?ms=<whole milliseconds>",
                    );
                };
                match crate::delay(ms) {
                    Ok(d) => {
                        links.set_delay(d);
                        tracing::info!(delay_ms = ms, "delay changed");
                        web::json(StatusCode::OK, &links.status())
                    }
                    Err(e) => web::error(StatusCode::BAD_REQUEST, "bad_delay", e.to_string()),
                }
            }
            (&Method::POST, path @ ("/cut" | "/heal")) => {
                let Some(region) = query(&req, "region").filter(|r| links.knows(r)) else {
                    return web::error(
                        StatusCode::NOT_FOUND,
                        "unknown_region",
                        "expected ?region=<a region one of the links reaches>",
                    );
                };
                if path == "/cut" {
                    links.cut(region);
                } else {
                    links.heal(region);
                }
                web::json(StatusCode::OK, &links.status())
            }
            (_, "/status" | "/healthz" | "/readyz" | "/metrics" | "/delay" | "/cut" | "/heal") => {
                web::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "GET /status, /healthz, /readyz, /metrics; POST /delay, /cut, /heal",
                )
            }
            _ => web::error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}
