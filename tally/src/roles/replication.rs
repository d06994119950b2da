//! `tally replication`'s flags.

use std::time::Duration;

use clap::Args;
use model::RegionName;
use replication::watch::*;
use web::ENV_LISTEN;

use super::urls;
use crate::usage::bad;

#[derive(Debug, Args)]
pub struct ReplicationArgs {
    /// Address to serve `/status`, `/metrics` and the probes on.
    #[arg(long, env = ENV_LISTEN, default_value = "127.0.0.1:8083")]
    pub listen: String,
    /// Every region's PostgreSQL server, comma-separated `region=postgres://superuser@...`.
    #[arg(long, env = ENV_POSTGRES_SERVERS)]
    pub servers: String,
    /// Data directories of servers on this machine, `region=/path,...`: a failed primary among
    /// them is stopped and left to come back as a replica (fencing).
    #[arg(long, env = ENV_DATA_DIRS, default_value = "")]
    pub data_dirs: String,
    #[arg(long, env = ENV_PROBE_INTERVAL_MS, default_value_t = replication::watch::DEFAULT_INTERVAL.as_millis() as u64)]
    pub probe_interval_ms: u64,
    /// Failed probes of the primary in a row before a failover.
    #[arg(long, env = ENV_FAILOVER_MISSES, default_value_t = replication::failover::DEFAULT_MISSES_BEFORE_FAILOVER)]
    pub failover_misses: u32,
    /// Fail over when the primary is gone (else watch and report only).
    #[arg(long, env = ENV_FAILOVER, default_value_t = true, action = clap::ArgAction::Set)]
    pub failover: bool,
    /// How one region's replica reaches another region's server when not at the address in
    /// `--servers`, `from>to=host:port,...` (the local stack's WAN links).
    #[arg(long, env = ENV_REPLICA_ROUTES, default_value = "")]
    pub replica_routes: String,
}

impl ReplicationArgs {
    pub fn config(&self) -> anyhow::Result<replication::Config> {
        let pairs = |list: &str, what: &str| -> anyhow::Result<Vec<(String, String)>> {
            urls(list)
                .into_iter()
                .map(|item| match item.split_once('=') {
                    Some((region, value))
                        if RegionName::new(region).is_ok() && !value.is_empty() =>
                    {
                        Ok((region.to_string(), value.to_string()))
                    }
                    _ => Err(bad(format!("{what}: {item:?} is not region=value"))),
                })
                .collect()
        };
        let dirs = pairs(&self.data_dirs, "--data-dirs")?;
        let mut servers = Vec::new();
        for (region, url) in pairs(&self.servers, "--servers")? {
            url.parse::<tokio_postgres::Config>()
                .map_err(|e| bad(format!("--servers: {region}: {e}")))?;
            servers.push(replication::Server {
                data_dir: dirs
                    .iter()
                    .find(|(r, _)| *r == region)
                    .map(|(_, d)| d.into()),
                region,
                url,
            });
        }
        if servers.is_empty() {
            return Err(bad("--servers: no PostgreSQL servers given"));
        }
        if self.probe_interval_ms == 0 || self.failover_misses == 0 {
            return Err(bad(
                "--probe-interval-ms and --failover-misses must be greater than zero",
            ));
        }
        Ok(replication::Config {
            servers,
            interval: Duration::from_millis(self.probe_interval_ms),
            misses_before_failover: self.failover_misses,
            failover: self.failover,
            routes: urls(&self.replica_routes)
                .into_iter()
                .map(|item| route(&item))
                .collect::<anyhow::Result<_>>()?,
        })
    }
}

/// `from>to=host:port`.
fn route(item: &str) -> anyhow::Result<replication::Route> {
    let parsed = item.split_once('=').and_then(|(regions, addr)| {
        let (from, to) = regions.split_once('>')?;
        let (host, port) = addr.rsplit_once(':')?;
        RegionName::new(from).ok()?;
        RegionName::new(to).ok()?;
        Some(replication::Route {
            from: from.into(),
            to: to.into(),
            host: host.into(),
            port: port.parse().ok()?,
        })
    });
    parsed.ok_or_else(|| {
        bad(format!(
            "--replica-routes: {item:?} is not from>to=host:port"
        ))
    })
}
