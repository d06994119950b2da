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
    #[arg(long, env = ENV_POSTGRES_SERVERS, default_value = "")]
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
    #[command(subcommand)]
    pub action: Option<ReplicationCmd>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReplicationCmd {
    /// Promote a managed platform's read replica: the available one with the most WAL received,
    /// then the order given. Reports what it did and what is left to do.
    Promote(PromoteArgs),
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Platform {
    /// Amazon RDS: `PromoteReadReplica` on the chosen cross-region replica.
    Rds,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[arg(long, value_enum)]
    pub platform: Platform,
    /// A replica to consider, `region=instance` or `region=instance=postgres-url` (the URL lets
    /// its received WAL be read); repeat it, in order of preference.
    #[arg(long = "replica", required = true)]
    pub replicas: Vec<String>,
    /// The platform's API endpoint (default: AWS's for each region).
    #[arg(long)]
    pub endpoint_url: Option<String>,
    /// Choose, report, and promote nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
}

impl PromoteArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let mut replicas = Vec::new();
        for item in &self.replicas {
            let mut parts = item.splitn(3, '=');
            let (Some(region), Some(instance)) = (parts.next(), parts.next()) else {
                return Err(bad(format!(
                    "--replica {item:?} is not region=instance[=url]"
                )));
            };
            if RegionName::new(region).is_err() || instance.is_empty() {
                return Err(bad(format!(
                    "--replica {item:?} is not region=instance[=url]"
                )));
            }
            let url = parts.next().map(str::to_string);
            if let Some(u) = &url {
                u.parse::<tokio_postgres::Config>()
                    .map_err(|e| bad(format!("--replica {region}: {e}")))?;
            }
            replicas.push((region.to_string(), instance.to_string(), url));
        }
        match self.platform {
            Platform::Rds => self.rds(replicas),
        }
    }

    #[cfg(feature = "rds")]
    fn rds(&self, replicas: Vec<(String, String, Option<String>)>) -> anyhow::Result<()> {
        use ::replication::rds;
        let replicas: Vec<rds::Replica> = replicas
            .into_iter()
            .map(|(region, instance, url)| rds::Replica {
                region,
                instance,
                url,
            })
            .collect();
        let report = crate::runtime()?.block_on(rds::promote(
            &replicas,
            self.endpoint_url.as_deref(),
            self.dry_run,
        ))?;
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
            return Ok(());
        }
        for c in &report.candidates {
            println!(
                "{:<16} {:<24} {:<12} received {}",
                c.candidate.region,
                c.candidate.instance,
                c.status,
                c.candidate
                    .received_lsn
                    .map_or("unknown".to_string(), |l| format!(
                        "{:X}/{:X}",
                        l >> 32,
                        l & 0xFFFF_FFFF
                    ))
            );
        }
        if let Some(p) = &report.promoted {
            let verb = if report.dry_run {
                "would promote"
            } else {
                "promoted"
            };
            println!("{verb} {} in {}", p.instance, p.region);
        }
        for step in &report.next {
            println!("next: {step}");
        }
        Ok(())
    }

    #[cfg(not(feature = "rds"))]
    fn rds(&self, _: Vec<(String, String, Option<String>)>) -> anyhow::Result<()> {
        anyhow::bail!(
            "this build of tally has no RDS driver (the `rds` feature); run the operator's build"
        )
    }
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
