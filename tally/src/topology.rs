//! `tally regions sync|route`: the regions' topology (`regions/topology/`) and the Route53
//! zone that routes voters by it. The sync needs the AWS SDK, so only a build with the
//! `route53` feature has it; the container image has not.

use std::path::PathBuf;

use clap::Subcommand;

#[cfg(feature = "route53")]
use crate::stack;
use crate::usage::bad;

#[derive(Debug, clap::Args)]
pub struct TopologyArg {
    /// A directory of topology files (`zone.toml` and one `<region>.toml` each); default: the
    /// topology built into this binary, `regions/topology/` of its source.
    #[arg(long = "regions", env = "TALLY_REGIONS")]
    regions: Option<PathBuf>,
}

impl TopologyArg {
    fn load(&self) -> anyhow::Result<regions::Topology> {
        match &self.regions {
            Some(dir) => regions::Topology::load(dir).map_err(bad),
            None => Ok(regions::Topology::standard()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum RegionsCmd {
    #[cfg(feature = "route53")]
    /// Make Route53 match the topology: the hosted zone, one health check per region, the
    /// geolocation and failover records; sends only the difference and ends with `<N> changes`.
    Sync {
        #[command(flatten)]
        topology: TopologyArg,
        /// Print the change set without sending it.
        #[arg(long)]
        dry_run: bool,
        /// Route53's endpoint (default: the local stack's moto when it runs, else AWS).
        #[arg(long, env = "AWS_ENDPOINT_URL")]
        endpoint_url: Option<String>,
        #[command(flatten)]
        dir: stack::Dir,
        /// Print the change set as JSON (the last line is still `<N> changes`).
        #[arg(long)]
        json: bool,
    },
    /// Where Route53 sends the voters of each continent, with the given regions unhealthy.
    Route {
        #[command(flatten)]
        topology: TopologyArg,
        /// Regions whose health checks fail, comma-separated.
        #[arg(long, value_delimiter = ',')]
        unhealthy: Vec<String>,
    },
}

impl RegionsCmd {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            #[cfg(feature = "route53")]
            RegionsCmd::Sync {
                topology,
                dry_run,
                endpoint_url,
                dir,
                json,
            } => {
                let topology = topology.load()?;
                let (endpoint, local_creds) = match (endpoint_url, stack::moto_url(&dir)?) {
                    (Some(url), _) => (Some(url), false),
                    (None, Some(moto)) => (Some(moto), true),
                    (None, None) => (None, false),
                };
                eprintln!(
                    "route53 at {}",
                    endpoint
                        .as_deref()
                        .unwrap_or("AWS (from the usual AWS settings)")
                );
                let changes = crate::runtime()?.block_on(async {
                    let client = regions::sync::client(endpoint.as_deref(), local_creds).await;
                    regions::sync::sync(&client, &topology, dry_run).await
                })?;
                if json {
                    println!("{}", serde_json::to_string(&changes)?);
                } else {
                    for c in &changes {
                        println!("{}", regions::plan::describe(c));
                    }
                }
                if dry_run && !changes.is_empty() {
                    eprintln!("dry run: nothing was sent");
                }
                println!("{} changes", changes.len());
                Ok(())
            }
            RegionsCmd::Route {
                topology,
                unhealthy,
            } => {
                let topology = topology.load()?;
                let records = regions::records(&topology);
                let healthy = |r: &model::RegionName| !unhealthy.iter().any(|u| u == r.as_str());
                for continent in regions::topology::CONTINENTS {
                    let to = regions::route(
                        &topology,
                        &records,
                        &healthy,
                        &regions::Location::continent(continent),
                    )
                    .map_or("(no answer)".to_string(), |r| r.name.to_string());
                    println!("{continent} -> {to}");
                }
                Ok(())
            }
        }
    }
}
