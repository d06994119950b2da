//! The capacity model: from per-core rates measured on this project's benchmarks, how many pods
//! of each role each region needs for a global vote rate, and how big Redis and PostgreSQL must
//! be. Pure arithmetic; `tally capacity` prints it and the k8s HPA bounds are checked against it.

use serde::Serialize;

use regions::{home_region, VOTER_MIX};

/// Votes/s one ingest core takes: `tally bench ingest --connections 256` answered 32,255 votes/s
/// with two server threads on a 2-core machine that also ran Redis and the load generator.
pub const INGEST_VOTES_PER_CORE: f64 = 16_000.0;
/// Votes/s one aggregator core drains: `tally bench aggregator` drained 125,320 votes/s with the
/// aggregator *and* PostgreSQL sharing two cores; counted as if the aggregator had one of them.
pub const AGGREGATOR_VOTES_PER_CORE: f64 = 60_000.0;
/// Votes/s one PostgreSQL vCPU upserts, from the same run (the primary's other core).
pub const POSTGRES_VOTES_PER_VCPU: f64 = 60_000.0;
/// Results requests/s one reader core serves: `tally bench reader`, 49,930/s on two threads.
pub const READER_REQUESTS_PER_CORE: f64 = 25_000.0;
/// Votes/s one Redis shard carries (push, move, ack: three commands per vote, pipelined), a
/// planning figure: a shard's single thread stays well under its ~1M pipelined commands/s.
pub const REDIS_VOTES_PER_SHARD: f64 = 100_000.0;

/// Each pod's CPU request (and limit) in the k8s manifests.
pub const INGEST_POD_CORES: f64 = 2.0;
pub const AGGREGATOR_POD_CORES: f64 = 2.0;
pub const READER_POD_CORES: f64 = 1.0;

/// Pods never go below this, so one pod's loss or a rolling update leaves one serving.
pub const MIN_PODS: u32 = 2;

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    /// Peak votes/s, all regions together.
    pub votes_per_second: f64,
    /// Peak results requests/s, all regions together.
    pub reads_per_second: f64,
    /// The share of capacity planned to be busy at peak (the rest is headroom).
    pub utilisation: f64,
    /// The quiet hours' load as a share of the peak: the HPA's lower bound.
    pub quiet_fraction: f64,
}

impl Default for Inputs {
    fn default() -> Self {
        Self {
            votes_per_second: 250_000.0,
            reads_per_second: 50_000.0,
            utilisation: 0.6,
            quiet_fraction: 0.1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InputError {
    #[error("the vote rate must be positive, not {0}")]
    Rate(f64),
    #[error("the read rate must be zero or more, not {0}")]
    Reads(f64),
    #[error("utilisation must be above 0 and at most 1, not {0}")]
    Utilisation(f64),
    #[error("the quiet fraction must be above 0 and at most 1, not {0}")]
    Quiet(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bounds {
    pub min: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionPlan {
    pub region: String,
    /// The share of voters Route53 sends here.
    pub share: f64,
    /// Its own peak plus the largest other region's, which it takes over when that one fails.
    pub planned_votes_per_second: f64,
    pub ingest: Bounds,
    pub aggregator: Bounds,
    pub reader: Bounds,
    pub redis_shards: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub inputs: Inputs,
    pub regions: Vec<RegionPlan>,
    /// The primary's vCPUs (and every replica's, so any can be promoted).
    pub postgres_vcpus: u32,
    pub postgres_instance: &'static str,
    pub redis_node: &'static str,
}

/// Each region's share of voters, from the load's voter mix (Route53's geolocation answer).
pub fn shares() -> Vec<(String, f64)> {
    let topology = regions::Topology::standard();
    let records = regions::records(&topology);
    let mut out: Vec<(String, f64)> = Vec::new();
    for (continent, share) in VOTER_MIX {
        let region = home_region(&topology, &records, continent);
        match out.iter_mut().find(|(r, _)| *r == region) {
            Some((_, s)) => *s += share,
            None => out.push((region, *share)),
        }
    }
    out
}

fn pods(rate: f64, per_core: f64, pod_cores: f64, utilisation: f64) -> u32 {
    ((rate / (per_core * pod_cores * utilisation)).ceil() as u32).max(MIN_PODS)
}

pub fn plan(inputs: &Inputs) -> Result<Plan, InputError> {
    let i = inputs;
    if !(i.votes_per_second > 0.0 && i.votes_per_second.is_finite()) {
        return Err(InputError::Rate(i.votes_per_second));
    }
    if !(i.reads_per_second >= 0.0 && i.reads_per_second.is_finite()) {
        return Err(InputError::Reads(i.reads_per_second));
    }
    if !(i.utilisation > 0.0 && i.utilisation <= 1.0) {
        return Err(InputError::Utilisation(i.utilisation));
    }
    if !(i.quiet_fraction > 0.0 && i.quiet_fraction <= 1.0) {
        return Err(InputError::Quiet(i.quiet_fraction));
    }
    let shares = shares();
    let regions = shares
        .iter()
        .map(|(region, share)| {
            let share = *share;
            let largest_other = shares
                .iter()
                .filter(|(r, _)| r != region)
                .map(|(_, s)| *s)
                .fold(0.0, f64::max);
            let planned = (share + largest_other).min(1.0);
            let bounds = |total: f64, per_core: f64, pod_cores: f64| Bounds {
                min: pods(
                    total * share * i.quiet_fraction,
                    per_core,
                    pod_cores,
                    i.utilisation,
                ),
                max: pods(total * planned, per_core, pod_cores, i.utilisation),
            };
            RegionPlan {
                region: region.to_owned(),
                share,
                planned_votes_per_second: i.votes_per_second * planned,
                ingest: bounds(i.votes_per_second, INGEST_VOTES_PER_CORE, INGEST_POD_CORES),
                aggregator: bounds(
                    i.votes_per_second,
                    AGGREGATOR_VOTES_PER_CORE,
                    AGGREGATOR_POD_CORES,
                ),
                reader: bounds(
                    i.reads_per_second,
                    READER_REQUESTS_PER_CORE,
                    READER_POD_CORES,
                ),
                redis_shards: (i.votes_per_second * planned
                    / (REDIS_VOTES_PER_SHARD * i.utilisation))
                    .ceil()
                    .max(1.0) as u32,
            }
        })
        .collect();
    let vcpus = (i.votes_per_second / (POSTGRES_VOTES_PER_VCPU * i.utilisation))
        .ceil()
        .max(2.0) as u32;
    let vcpus = vcpus.next_power_of_two();
    Ok(Plan {
        inputs: i.clone(),
        regions,
        postgres_vcpus: vcpus,
        postgres_instance: postgres_instance(vcpus),
        redis_node: "cache.r7g.large",
    })
}

/// The smallest memory-optimised RDS class with at least `vcpus`.
fn postgres_instance(vcpus: u32) -> &'static str {
    match vcpus {
        0..=2 => "db.r6g.large",
        3..=4 => "db.r6g.xlarge",
        5..=8 => "db.r6g.2xlarge",
        9..=16 => "db.r6g.4xlarge",
        17..=32 => "db.r6g.8xlarge",
        33..=48 => "db.r6g.12xlarge",
        _ => "db.r6g.16xlarge",
    }
}

pub fn print(plan: &Plan) {
    let i = &plan.inputs;
    println!(
        "capacity for {:.0} votes/s and {:.0} results requests/s at {:.0}% utilisation (quiet hours: {:.0}% of peak)",
        i.votes_per_second,
        i.reads_per_second,
        i.utilisation * 100.0,
        i.quiet_fraction * 100.0
    );
    println!(
        "{:<16} {:>6} {:>12} {:>10} {:>12} {:>10} {:>7}",
        "region", "share", "planned/s", "ingest", "aggregator", "reader", "shards"
    );
    for r in &plan.regions {
        println!(
            "{:<16} {:>5.0}% {:>12.0} {:>10} {:>12} {:>10} {:>7}",
            r.region,
            r.share * 100.0,
            r.planned_votes_per_second,
            format!("{}-{}", r.ingest.min, r.ingest.max),
            format!("{}-{}", r.aggregator.min, r.aggregator.max),
            format!("{}-{}", r.reader.min, r.reader.max),
            r.redis_shards
        );
    }
    println!("pods: min-max of each role's HorizontalPodAutoscaler; a region's max also carries the largest other region's voters");
    println!(
        "postgresql: {} vCPUs ({}) for the primary and each replica; redis: {} nodes, one per shard",
        plan.postgres_vcpus, plan.postgres_instance, plan.redis_node
    );
}

/// `tally capacity`'s inputs.
#[derive(Debug, clap::Args)]
pub struct CapacityArgs {
    /// Peak votes per second, all regions together.
    #[arg(long, default_value_t = 250_000.0)]
    rate: f64,
    /// Peak results requests per second, all regions together.
    #[arg(long, default_value_t = 50_000.0)]
    reads: f64,
    /// Share of capacity busy at peak; the rest is headroom.
    #[arg(long, default_value_t = 0.6)]
    utilisation: f64,
    /// Quiet hours' load as a share of the peak (the autoscalers' lower bound).
    #[arg(long, default_value_t = 0.1)]
    quiet: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl CapacityArgs {
    pub fn run(&self) -> anyhow::Result<()> {
        let inputs = Inputs {
            votes_per_second: self.rate,
            reads_per_second: self.reads,
            utilisation: self.utilisation,
            quiet_fraction: self.quiet,
        };
        let plan = plan(&inputs).map_err(crate::usage::bad)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print(&plan);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_voter_once() {
        let total: f64 = shares().iter().map(|(_, s)| s).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(shares().len(), 3);
    }

    #[test]
    fn every_region_can_take_its_peak_and_its_largest_neighbours_at_the_planned_utilisation() {
        let inputs = Inputs::default();
        let plan = plan(&inputs).unwrap();
        for r in &plan.regions {
            let ingest_capacity =
                r.ingest.max as f64 * INGEST_POD_CORES * INGEST_VOTES_PER_CORE * inputs.utilisation;
            assert!(ingest_capacity >= r.planned_votes_per_second, "{r:?}");
            let drain = r.aggregator.max as f64
                * AGGREGATOR_POD_CORES
                * AGGREGATOR_VOTES_PER_CORE
                * inputs.utilisation;
            assert!(drain >= r.planned_votes_per_second, "{r:?}");
            assert!(
                r.redis_shards as f64 * REDIS_VOTES_PER_SHARD * inputs.utilisation
                    >= r.planned_votes_per_second
            );
            assert!(r.ingest.min >= MIN_PODS && r.ingest.min <= r.ingest.max);
            assert!(r.planned_votes_per_second > r.share * inputs.votes_per_second);
        }
        assert!(
            plan.postgres_vcpus as f64 * POSTGRES_VOTES_PER_VCPU * inputs.utilisation
                >= inputs.votes_per_second
        );
    }

    #[test]
    fn more_load_never_means_fewer_pods() {
        let mut last = plan(&Inputs {
            votes_per_second: 1_000.0,
            ..Inputs::default()
        })
        .unwrap();
        for rate in [10_000.0, 100_000.0, 250_000.0, 1_000_000.0] {
            let next = plan(&Inputs {
                votes_per_second: rate,
                ..Inputs::default()
            })
            .unwrap();
            for (a, b) in last.regions.iter().zip(&next.regions) {
                assert!(
                    b.ingest.max >= a.ingest.max
                        && b.aggregator.max >= a.aggregator.max
                        && b.redis_shards >= a.redis_shards
                );
            }
            assert!(next.postgres_vcpus >= last.postgres_vcpus);
            last = next;
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert_eq!(
            plan(&Inputs {
                votes_per_second: 0.0,
                ..Inputs::default()
            })
            .unwrap_err(),
            InputError::Rate(0.0)
        );
        assert_eq!(
            plan(&Inputs {
                utilisation: 1.5,
                ..Inputs::default()
            })
            .unwrap_err(),
            InputError::Utilisation(1.5)
        );
        assert_eq!(
            plan(&Inputs {
                reads_per_second: -1.0,
                ..Inputs::default()
            })
            .unwrap_err(),
            InputError::Reads(-1.0)
        );
        assert_eq!(
            plan(&Inputs {
                quiet_fraction: 0.0,
                ..Inputs::default()
            })
            .unwrap_err(),
            InputError::Quiet(0.0)
        );
    }
}
