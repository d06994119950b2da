//! `tally replication`'s HTTP face: what the watcher last saw.

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;

use crate::View;

pub struct Status(pub watch::Receiver<View>);

impl web::Service for Status {
    async fn call(&self, req: Request<Incoming>, _conn: &web::Connection) -> Response<web::Body> {
        if req.method() != Method::GET {
            return web::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "only GET",
            );
        }
        let view = self.0.borrow().clone();
        match req.uri().path() {
            "/status" => web::json(StatusCode::OK, &view),
            "/healthz" => web::text(StatusCode::OK, "text/plain", "ok\n"),
            // Ready while a primary answers: its one dependency.
            "/readyz" if view.primary.is_some() && !view.degraded => {
                web::text(StatusCode::OK, "text/plain", "ready\n")
            }
            "/readyz" => web::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_primary",
                "no primary answers",
            ),
            "/metrics" => web::render_metrics(),
            _ => web::error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}
