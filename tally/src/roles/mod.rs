//! `tally ingest|aggregator|reader|replication`: every setting a flag and a `TALLY_*` variable
//! (named beside each role's `Config`), checked before a port is bound.

mod aggregator;
mod ingest;
mod reader;
mod replication;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use model::RegionName;
use web::{ENV_KEEP_ALIVE_TIMEOUT_MS, ENV_LISTEN, ENV_MAX_CONNECTIONS, ENV_REGION};

use crate::usage::bad;

pub use self::aggregator::AggregatorArgs;
pub use self::ingest::IngestArgs;
pub use self::reader::ReaderArgs;
pub use self::replication::ReplicationArgs;

#[derive(Debug, Subcommand)]
pub enum Role {
    /// Serve the vote API: validate, stamp, shard and store votes in Redis.
    Ingest(Box<IngestArgs>),
    /// Drain Redis shards into PostgreSQL in batches, exactly once.
    Aggregator(AggregatorArgs),
    /// Serve results from the local read replica.
    Reader(ReaderArgs),
    /// Watch every PostgreSQL server (role, lag) and fail over when the primary is gone; or,
    /// on a managed platform, `promote` its best read replica.
    #[command(args_conflicts_with_subcommands = true)]
    Replication(ReplicationArgs),
}

impl Role {
    /// Checks the role's configuration (a bad one exits 64 before any port is bound), then
    /// serves until SIGINT/SIGTERM.
    pub fn run(self) -> anyhow::Result<()> {
        let shutdown = web::shutdown_signal;
        match self {
            Role::Ingest(args) => {
                let config = args.config()?;
                serve(&args.common.listen, |l| {
                    ::ingest::run(l, config, shutdown())
                })
            }
            Role::Aggregator(args) => {
                let config = args.config()?;
                serve(&args.common.listen, |l| {
                    ::aggregator::run(l, config, shutdown())
                })
            }
            Role::Reader(args) => {
                let config = args.config()?;
                serve(&args.common.listen, |l| {
                    ::reader::run(l, config, shutdown())
                })
            }
            Role::Replication(args) => {
                if let Some(self::replication::ReplicationCmd::Promote(promote)) = args.action {
                    return promote.run();
                }
                let config = args.config()?;
                serve(&args.listen, |l| ::replication::run(l, config, shutdown()))
            }
        }
    }
}

/// Binds `listen` and runs a role on it until it returns.
fn serve<F, Fut, E>(listen: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    crate::runtime()?.block_on(async {
        let listener = bind(listen).await?;
        run(listener).await?;
        Ok(())
    })
}

#[derive(Debug, Args)]
pub struct Common {
    /// Address to serve HTTP on.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The region this process serves.
    #[arg(long, env = ENV_REGION, default_value = "us-east-1")]
    pub region: String,
    /// Most open connections.
    #[arg(long, env = ENV_MAX_CONNECTIONS, default_value_t = 10_000)]
    pub max_connections: usize,
    /// How long a connection may wait for a request's headers, from connecting or from its last
    /// answer: idle keep-alive connections close after it. Behind a load balancer, set it above
    /// the balancer's idle timeout, or the balancer reuses connections the role has closed (502s).
    #[arg(long, env = ENV_KEEP_ALIVE_TIMEOUT_MS, default_value_t = 10_000)]
    pub keep_alive_timeout_ms: u64,
}

impl Common {
    pub(crate) fn region(&self) -> anyhow::Result<RegionName> {
        RegionName::new(&self.region).map_err(|e| bad(format!("--region: {e}")))
    }

    pub(crate) fn serve_config(&self) -> anyhow::Result<web::ServeConfig> {
        if !(1_000..=3_600_000).contains(&self.keep_alive_timeout_ms) {
            return Err(bad(format!(
                "--keep-alive-timeout-ms {} is outside 1000..=3600000",
                self.keep_alive_timeout_ms
            )));
        }
        Ok(web::ServeConfig {
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_millis(self.keep_alive_timeout_ms),
            ..Default::default()
        })
    }
}

pub(crate) fn urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Binds after the configuration was checked; a port in use is an operational error, not a usage one.
async fn bind(listen: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(keep_alive_timeout_ms: u64) -> Common {
        Common {
            listen: "127.0.0.1:0".into(),
            region: "us-east-1".into(),
            max_connections: 10,
            keep_alive_timeout_ms,
        }
    }

    #[test]
    fn the_keep_alive_timeout_reaches_the_server_and_is_bounded() {
        let config = common(75_000).serve_config().unwrap();
        assert_eq!(config.header_read_timeout, Duration::from_secs(75));
        for wrong in [0, 999, 3_600_001] {
            let e = common(wrong).serve_config().unwrap_err().to_string();
            assert!(e.contains("--keep-alive-timeout-ms"), "{e}");
        }
    }
}
