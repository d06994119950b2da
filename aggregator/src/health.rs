//! What the aggregator says about itself: `/healthz`, `/readyz` (can it reach its shards and a
//! writable primary?), `/metrics`, and the probes that keep readiness and the backlog gauge true
//! while idle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;
use web::{error, json, Body};

/// What `/readyz` reports.
pub struct Health {
    pub shards_up: Vec<Arc<AtomicBool>>,
    pub postgres_up: AtomicBool,
}

pub struct Http {
    pub health: Arc<Health>,
}

impl web::Service for Http {
    async fn call(&self, req: Request<Incoming>, _conn: &web::Connection) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => {
                json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            (&Method::GET, "/readyz") => {
                let down: Vec<usize> = (0..self.health.shards_up.len())
                    .filter(|&i| !self.health.shards_up[i].load(Ordering::Relaxed))
                    .collect();
                let pg = self.health.postgres_up.load(Ordering::Relaxed);
                let ok = down.is_empty() && pg;
                let status = if ok {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                json(
                    status,
                    &serde_json::json!({"ready": ok, "postgres": pg, "shards_down": down}),
                )
            }
            (&Method::GET, "/metrics") => web::render_metrics(),
            (_, "/healthz" | "/readyz" | "/metrics") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET",
            ),
            _ => error(StatusCode::NOT_FOUND, "not_found", "no such path"),
        }
    }
}

/// Keeps `/readyz` truthful while idle: can we reach a writable primary?
pub async fn primary_probe(url: String, health: Arc<Health>, mut stop: watch::Receiver<bool>) {
    let mut client: Option<db::Client> = None;
    loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = tokio::time::timeout(Duration::from_secs(2), db::connect(&url))
                .await
                .ok()
                .and_then(Result::ok);
        }
        let writable = match &client {
            Some(c) => matches!(
                tokio::time::timeout(Duration::from_secs(2), c.query_one("SELECT NOT pg_is_in_recovery()", &[])).await,
                Ok(Ok(row)) if row.get::<_, bool>(0)
            ),
            None => false,
        };
        health.postgres_up.store(writable, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Exports each shard's votes not yet acknowledged (waiting or in flight), so operators see a
/// backlog build.
pub async fn backlog_probe(
    link: Arc<shard::Link>,
    region: String,
    shard: usize,
    mut stop: watch::Receiver<bool>,
) {
    let gauge = metrics::gauge!("tally_aggregator_backlog", "region" => region, "shard" => shard.to_string());
    loop {
        if let Ok(mut conn) = link.get() {
            match redis::cmd("GET")
                .arg(model::queue::STORED)
                .query_async::<Option<i64>>(&mut conn)
                .await
            {
                Ok(n) => gauge.set(model::queue::stored_votes(n) as f64),
                Err(e) => link.report(&e),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}
