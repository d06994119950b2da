//! The HTTP plumbing every role shares: the serve loop (connection cap, header timeout, graceful
//! drain), JSON bodies and errors in one shape, bounded body reads, health and metrics.
#![forbid(unsafe_code)]

mod body;
mod histogram;
mod metrics_endpoint;
mod serve;

pub use body::{error, full, json, read_body, text, Body, BodyError, ErrorBody};
pub use histogram::LatencyHistogram;
pub use metrics_endpoint::{metrics_handle, render_metrics, spawn_upkeep};
pub use serve::{
    serve, Connection, Enlisted, ServeConfig, Service, DEFAULT_MAX_HEAD_BYTES,
    ENV_KEEP_ALIVE_TIMEOUT_MS, ENV_LISTEN, ENV_MAX_CONNECTIONS, ENV_REGION,
};

/// A future that completes on SIGINT or SIGTERM, for `run(listener, config, shutdown)`.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
