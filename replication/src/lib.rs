//! Replication: what the servers say about themselves (which one is the primary, how far each
//! replica is behind, read from PostgreSQL rather than estimated), and `tally replication`, which
//! watches them all and fails over when the primary is gone. Only this crate promotes.
#![forbid(unsafe_code)]

pub mod choose;
pub mod failover;
mod fence;
mod http;
#[cfg(feature = "rds")]
pub mod rds;
pub mod watch;

use std::future::Future;

use tokio::net::TcpListener;

pub use failover::{Action, Failover, Observation};
pub use fence::{fence_dir, fence_marker};
pub use watch::{asynchronous, slot_name, Config, Route, Server, View};

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("rds: {0}")]
    Platform(String),
}

/// Watches the servers (and fails over when configured to) and serves its view on `listener`
/// (`/status`, `/healthz`, `/readyz`, `/metrics`) until `shutdown`.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicationError> {
    if config.servers.is_empty() {
        return Err(ReplicationError::Config(
            "no PostgreSQL servers to watch".into(),
        ));
    }
    web::metrics_handle();
    let (view_tx, view_rx) = tokio::sync::watch::channel(View::default());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let servers = config.servers.len();
    let watcher = tokio::spawn(watch::run_loop(config, view_tx, stop_rx));
    tracing::info!(addr = ?listener.local_addr().ok(), servers, "replication watching");
    web::serve(
        listener,
        std::sync::Arc::new(http::Status(view_rx)),
        web::ServeConfig::default(),
        async {
            shutdown.await;
            let _ = stop_tx.send(true);
        },
    )
    .await;
    match watcher.await {
        Ok(r) => r,
        Err(e) => Err(ReplicationError::Io(format!("watcher: {e}"))),
    }
}
