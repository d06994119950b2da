//! The reader: serves results from its region's read replica, falling back along its source
//! list when the replica is down or too far behind, and says how fresh every answer is.
//! Readers never write.
#![forbid(unsafe_code)]

pub mod config;
mod http;
mod page;
mod snapshot;
pub mod source;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{Config, ConfigError, Source};

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
}

/// Serves results on `listener` until `shutdown`; event streams are ended so the drain is quick.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReaderError> {
    config.validate()?;
    web::metrics_handle();
    let (snap_tx, snap_rx) = watch::channel(Arc::new(snapshot::Snapshot::default()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let refresher = tokio::spawn(snapshot::refresh_loop(
        config.clone(),
        snap_tx,
        stop_rx.clone(),
    ));
    let app = Arc::new(http::Reader {
        snapshots: snap_rx,
        stop: stop_rx,
        heartbeat: config.heartbeat,
        operator_token: config.operator_token.clone(),
        metrics: http::ReaderMetrics::new(config.region.as_str()),
    });
    tracing::info!(addr = ?listener.local_addr().ok(), region = %config.region, sources = config.sources.len(), "reader serving");
    web::serve(listener, app, config.serve.clone(), async {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    refresher.abort();
    tracing::info!("reader stopped");
    Ok(())
}
