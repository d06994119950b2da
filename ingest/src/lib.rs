//! Ingest: the hyper front door. Validates a vote against the cached poll catalog, stamps it,
//! picks its Redis shard by (poll, voter), and answers `202` only once that shard has stored it.
//! Concurrent votes for one shard share one pipelined write (group commit).
// Denied, not forbidden: on a measured hot path (see `limit`) the rate-limit table asks for huge
// pages and a check prefetches its bucket, and those two functions allow it.
#![deny(unsafe_code)]

mod accumulator;
pub mod auth;
pub mod config;
mod group;
mod http;
pub mod identity;
mod jwks;
pub mod limit;
mod page;
pub mod request;
mod shards;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use config::{Config, ConfigError, GroupCommit, Rate};
pub use http::VOTER_COOKIE;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Shard(#[from] shard::LinkError),
}

/// Serves ingest on `listener` until `shutdown` completes; then stops accepting, answers every
/// request in flight (their writes complete first) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), IngestError> {
    config.validate()?;
    // Before any metric handle is registered, or it would go to the no-op recorder.
    web::metrics_handle();
    let catalog = Arc::new(db::CatalogCache::default());
    tokio::spawn(db::CatalogCache::refresh_loop(
        Arc::downgrade(&catalog),
        config.postgres_url.clone(),
        config.catalog_refresh,
    ));
    let voters = match &config.identity {
        identity::Identity::Jwt(jwt) => http::Voters::Jwt(auth::Verifier::new(jwt.clone())),
        identity::Identity::Anonymous(a) => http::Voters::Anonymous(a.clone()),
    };
    let keys = match &voters {
        http::Voters::Jwt(verifier) => Some(tokio::spawn(jwks::refresh_loop(
            verifier.clone(),
            config.region.to_string(),
        ))),
        http::Voters::Anonymous(_) => None,
    };
    let shards = shards::Shards::start(&config)?;
    // Give the first probes a moment so /readyz is truthful as soon as we listen.
    shards.wait_probed(Duration::from_secs(1)).await;
    let app = Arc::new(http::Ingest {
        region: config.region.clone(),
        catalog,
        shards,
        clock: model::Clock::skewed(config.drill_clock_skew_ms.saturating_mul(1000)),
        skew_us: config.drill_clock_skew_ms.saturating_mul(1000),
        catalog_max_age: config.catalog_max_age,
        max_clock_offset_us: config.max_clock_offset.as_micros() as i64,
        voter_limit: config
            .voter_limit
            .map(|rate| limiter(&config, rate, "voter")),
        ip_limit: config
            .ip_limit
            .map(|rate| limiter(&config, rate, "address")),
        voters,
        trusted_proxies: config.trusted_proxies.clone(),
        allowed_origins: config.allowed_origins.clone(),
        secure_cookies: config.secure_cookies,
        body_limit: config.body_limit,
        body_timeout: config.body_timeout,
        metrics: http::IngestMetrics::new(&config.region),
    });
    let watch = tokio::spawn(http::watch_rules(Arc::downgrade(&app)));
    tracing::info!(addr = ?listener.local_addr().ok(), region = %config.region, shards = config.redis_urls.len(), "ingest serving");
    // Stopping, the requests in flight are answered once stored, not after a linger.
    let shutdown = {
        let app = app.clone();
        async move {
            shutdown.await;
            app.shards.stop_lingering();
        }
    };
    web::serve(listener, app, config.serve.clone(), shutdown).await;
    if let Some(keys) = keys {
        keys.abort();
    }
    watch.abort();
    tracing::info!("ingest stopped");
    Ok(())
}

fn limiter(config: &Config, rate: Rate, by: &'static str) -> limit::Limiter {
    let forgiven = metrics::counter!(
        "tally_ingest_limit_forgiven_total",
        "region" => config.region.to_string(),
        "limit" => by,
    );
    limit::Limiter::new(rate, config.limit_keys, forgiven)
}
