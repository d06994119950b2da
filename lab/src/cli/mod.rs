//! The lab's subcommands of `tally`: the local stack, loads, the demo, drills, the gauntlet, the
//! hostile-input suite, benchmarks and the WAN proxy. `tally`'s `main.rs` flattens [`Command`]
//! beside the plane's commands, so a user types `tally demo` as before.

mod bench;
mod load;

use std::path::PathBuf;

use clap::Subcommand;

pub use bench::BenchCmd;
pub use load::{LoadArgs, UpArgs};

use crate::{bad_input, drill, gauntlet, local};

/// Where a command finds the local stack.
#[derive(Debug, clap::Args)]
pub struct DirArg {
    /// The local stack's directory (default: under the user's data dir).
    #[arg(long, env = "TALLY_DIR", global = true)]
    pub dir: Option<PathBuf>,
}

impl DirArg {
    pub fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(local::default_dir)
    }
}

/// A rate or a share: a finite number above zero.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a number above 0, not {s:?}")),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Distance between regions on one machine: a TCP proxy per cross-region link that holds
    /// each chunk for a one-way delay, and can cut a region off. `tally local up` runs it.
    Wan(WanArgs),
    /// The local stack's identity provider: serves the public keys of the key files in a
    /// directory as a JWKS document, as Auth0 serves a tenant's. `tally local up` runs it.
    Idp(IdpArgs),
    /// Run the three regions on this machine.
    Local {
        #[command(subcommand)]
        command: LocalCmd,
    },
    /// Failover drills on the local stack, under load, with a report.
    Drill {
        #[command(subcommand)]
        drill: DrillCmd,
        #[command(flatten)]
        dir: DirArg,
        #[command(flatten)]
        load: DrillLoad,
    },
    /// Every fault of `tally drill` in turn on the local stack, each under load, and a
    /// scoreboard (printed, and saved as JSON) that must read zero lost, doubled and crashes.
    Gauntlet {
        #[command(flatten)]
        dir: DirArg,
        /// The CI version: 3 kills of each process instead of 20, shorter loads.
        #[arg(long)]
        quick: bool,
        /// Votes per second during each fault.
        #[arg(long, default_value_t = 5_000.0)]
        rate: f64,
        /// Where to save the scoreboard (default: the stack's `reports/gauntlet-<time>.json`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the scoreboard as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Hostile requests against every HTTP endpoint of every region (malformed, huge, slow,
    /// mistyped, traversing, injecting) while well-formed votes run alongside as fast as ingest
    /// takes them: each must get its 4xx, none may be stored, and the well-formed votes must keep
    /// 80% of their rate alone. Every region's aggregator is paused (SIGSTOP) during each round of
    /// well-formed votes and continued after it.
    BadInput {
        #[command(flatten)]
        dir: DirArg,
        /// Seconds of well-formed votes under attack, in 7 rounds; 8 rounds alone as long take
        /// turns with them, one before and one after each.
        #[arg(long, default_value_t = 35)]
        seconds: u64,
        /// Connections per region sending well-formed votes back to back.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Hostile requests a second, as a share of the well-formed votes a second in the round
        /// alone before each round under attack.
        #[arg(long, default_value_t = bad_input::DEFAULT_ATTACK_SHARE, value_parser = positive)]
        attack_share: f64,
        /// Hostile requests a second, fixed (instead of `--attack-share`).
        #[arg(long, conflicts_with = "attack_share", value_parser = positive)]
        attack_rate: Option<f64>,
        /// Connections that trickle their headers and never finish them.
        #[arg(long, default_value_t = 100)]
        slow_connections: usize,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Votes from simulated voters around the world against the local stack, or any
    /// deployment a target file names, then a check that every acknowledged vote was counted
    /// exactly once.
    Load {
        #[command(flatten)]
        dir: DirArg,
        /// A target file (see `tally local status --target-file`): load that deployment instead
        /// of the local stack, and check it through its readers.
        #[arg(long)]
        target: Option<PathBuf>,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The night, rehearsed against a target file's deployment: a poll of its own closing as
    /// the load ends, the `show` shape (surge, calm, rush), the wait for the certified result,
    /// and one report: acknowledged, counted, lost, doubled, freshness per region, time to
    /// final, pushback.
    Rehearse {
        /// The target file (see `tally local status --target-file`).
        #[arg(long)]
        target: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// The whole plane at work: local stack up, a load from global voters, live progress, a report.
    Demo {
        #[command(flatten)]
        up: UpArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// Leave the stack running afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Benchmark a role against its baseline in one run, on real servers of its own.
    Bench {
        #[command(subcommand)]
        role: BenchCmd,
        /// Print one JSON object instead of text.
        #[arg(long, global = true)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LocalCmd {
    /// Start every server and role (what is already running is left alone).
    Up(UpArgs),
    /// Where everything is, and replica lag.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Also write the stack as a target file for `tally load --target` and `tally rehearse`.
        #[arg(long)]
        target_file: Option<PathBuf>,
    },
    /// Stop everything; queued votes stay in Redis for the next `up`.
    Down(DirArg),
    /// Print a token the local stack's ingest accepts for voter ID (its identity provider
    /// signs it), for trying votes by hand: `curl -H "Authorization: Bearer $(tally local token --voter alice)"`.
    Token {
        #[command(flatten)]
        dir: DirArg,
        #[arg(long)]
        voter: String,
        /// Seconds the token is good for.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrillCmd {
    /// Lose a whole region (kill -9 its roles, Redis and PostgreSQL): its voters go to the next
    /// region in its failover order, a new primary is promoted if it held the primary; then
    /// bring it back and drain what its Redis had queued.
    RegionDown { region: String },
    /// Kill the PostgreSQL primary: `tally replication` promotes the replica with the most WAL,
    /// writers follow it, and the old primary rejoins as a replica.
    PrimaryFailover,
    /// kill -9 one process at random instants, restarting it each time: a role of a region
    /// (`ingest`, `aggregator`, `reader`), or with `--region global` `replication` or `wan`.
    Kill {
        role: String,
        #[arg(long, default_value = "us-east-1")]
        region: String,
        #[arg(long, default_value_t = 5)]
        times: u32,
    },
    /// kill -9 a region's first Redis shard, replica and primary, then start them again (their
    /// append-only files replay).
    RedisKill { region: String },
    /// Shut a region's first Redis shard (replica and primary) down cleanly, then start it again.
    RedisRestart { region: String },
    /// kill -9 the primary of a region's first Redis shard: the sentinels promote its replica,
    /// ingest and the aggregators follow; the old primary rejoins as the new one's replica.
    RedisFailover {
        #[arg(long, default_value = "us-east-1")]
        region: String,
    },
    /// kill -9 one of a region's aggregators while it holds votes in flight, and leave it dead:
    /// another of the region adopts its lists once its lease expires (a region with one gets a
    /// second for the drill).
    AggregatorLost {
        #[arg(long, default_value = "us-east-1")]
        region: String,
    },
    /// Stop a replica's PostgreSQL for a while; commits go on with the other replica.
    ReplicaStop { region: String },
    /// Cut every link to and from a region (`tally wan`), then heal them.
    RegionCut { region: String },
    /// Run a region's ingest with its clock ahead (`--ms`, negative: behind) for a while: past
    /// ingest's bound (500 ms) it refuses votes and its voters go elsewhere.
    ClockSkew {
        region: String,
        #[arg(long, default_value_t = 5_000, allow_negative_numbers = true)]
        ms: i64,
    },
    /// Cut a region off through a poll's close, then heal it: the poll is certified final with
    /// exactly the votes acknowledged before the close.
    CloseCut { region: String },
    /// A region's ingest `--ms` ahead (within its bound) through a poll's close.
    CloseSkew {
        region: String,
        #[arg(long, default_value_t = 300, allow_negative_numbers = true)]
        ms: i64,
    },
    /// kill -9 of a region's aggregator at random instants around a poll's close.
    CloseKillAggregator {
        region: String,
        #[arg(long, default_value_t = 3)]
        times: u32,
    },
}

impl DrillCmd {
    fn fault(self) -> drill::Fault {
        match self {
            DrillCmd::RegionDown { region } => drill::Fault::RegionDown(region),
            DrillCmd::PrimaryFailover => drill::Fault::PrimaryFailover,
            DrillCmd::Kill {
                role,
                region,
                times,
            } => drill::Fault::KillRole {
                region,
                role,
                times,
            },
            DrillCmd::RedisKill { region } => drill::Fault::RedisKill(region),
            DrillCmd::RedisRestart { region } => drill::Fault::RedisRestart(region),
            DrillCmd::RedisFailover { region } => drill::Fault::RedisFailover(region),
            DrillCmd::AggregatorLost { region } => drill::Fault::AggregatorLost(region),
            DrillCmd::ReplicaStop { region } => drill::Fault::ReplicaStop(region),
            DrillCmd::RegionCut { region } => drill::Fault::RegionCut(region),
            DrillCmd::ClockSkew { region, ms } => drill::Fault::ClockSkew { region, ms },
            DrillCmd::CloseCut { region } => drill::Fault::CloseCut(region),
            DrillCmd::CloseSkew { region, ms } => drill::Fault::CloseSkew { region, ms },
            DrillCmd::CloseKillAggregator { region, times } => {
                drill::Fault::CloseKillAggregator { region, times }
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct DrillLoad {
    /// Votes per second during the drill, all regions together.
    #[arg(long, global = true, default_value_t = 5_000.0)]
    rate: f64,
    /// How long the load runs; the fault strikes once it is warm.
    #[arg(long, global = true, default_value_t = 20)]
    seconds: u64,
    #[arg(long, global = true, default_value_t = 20_000)]
    voters: u64,
    #[arg(long, global = true, default_value_t = 64)]
    connections: usize,
    /// Print the report as one JSON object.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub struct WanArgs {
    /// Address to serve `/status`, `/metrics` and the controls (`POST /delay`, `/cut`, `/heal`) on.
    #[arg(long, env = web::ENV_LISTEN, default_value = "127.0.0.1:8084")]
    pub listen: String,
    /// The links, comma-separated `from>to@listen=upstream`.
    #[arg(long, env = wan::ENV_WAN_LINKS)]
    pub links: String,
    /// One-way delay on every link, in milliseconds.
    #[arg(long, env = wan::ENV_WAN_DELAY_MS, default_value_t = 0)]
    pub delay_ms: u64,
}

#[derive(Debug, clap::Args)]
pub struct IdpArgs {
    /// Address to serve the key set (`/.well-known/jwks.json`) and the probes on.
    #[arg(long, env = web::ENV_LISTEN, default_value = "127.0.0.1:8085")]
    pub listen: String,
    /// The directory of signing keys, one file each.
    #[arg(long, env = crate::idp::ENV_IDP_KEYS)]
    pub keys: PathBuf,
}

/// A usage error of a lab command: `tally` reports it on one line and exits 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArgs(pub String);

impl WanArgs {
    fn config(&self) -> Result<wan::Config, BadArgs> {
        let config =
            wan::Config::parse(&self.links, self.delay_ms).map_err(|e| BadArgs(e.to_string()))?;
        if config.links.is_empty() {
            return Err(BadArgs("--links: no links given".into()));
        }
        Ok(config)
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Runs one lab command to its end.
pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Wan(args) => {
            // Checked (exit 64) before the port is bound.
            let config = args.config()?;
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(&args.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
                wan::run(listener, config, web::shutdown_signal()).await?;
                Ok(())
            })
        }
        Command::Idp(args) => {
            crate::idp::jwks(&args.keys).map_err(|e| BadArgs(format!("--keys: {e:#}")))?;
            runtime()?.block_on(async {
                let listener = tokio::net::TcpListener::bind(&args.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
                tokio::select! {
                    () = crate::idp::serve(listener, args.keys) => {}
                    () = web::shutdown_signal() => {}
                }
                Ok(())
            })
        }
        Command::Local { command } => load::local(command),
        Command::Load {
            dir,
            target: None,
            load: args,
        } => load::load(&dir, &args),
        Command::Load {
            target: Some(target),
            load: args,
            ..
        } => load::load_target(&target, &args, false),
        Command::Rehearse { target, load: args } => load::load_target(&target, &args, true),
        Command::Demo {
            up,
            load: args,
            keep,
        } => load::demo(&up, &args, keep),
        Command::Drill {
            drill: which,
            dir,
            load,
        } => {
            let opts = crate::load::Options {
                rate: load.rate,
                duration: std::time::Duration::from_secs(load.seconds),
                voters: load.voters,
                connections_per_region: load.connections,
                shape: ::bench::load::Shape::Steady,
                progress: !load.json,
                show: None,
            };
            let report = runtime()?.block_on(drill::run(dir.path(), which.fault(), opts))?;
            if load.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                drill::print(&report);
            }
            load::check(&report.load)
        }
        Command::Gauntlet {
            dir,
            quick,
            rate,
            out,
            json,
        } => {
            let opts = gauntlet::Options {
                quick,
                rate,
                voters: 20_000,
                connections_per_region: 64,
                progress: !json,
            };
            let board = runtime()?.block_on(gauntlet::run(dir.path(), opts))?;
            let saved = gauntlet::save(&board, &dir.path(), out)?;
            if json {
                println!("{}", serde_json::to_string(&board)?);
            } else {
                gauntlet::print(&board);
                println!("scoreboard: {}", saved.display());
            }
            if !board.passed() {
                anyhow::bail!("the gauntlet found lost or doubled votes, crashes or failed drills");
            }
            Ok(())
        }
        Command::BadInput {
            dir,
            seconds,
            connections,
            attack_share,
            attack_rate,
            slow_connections,
            json,
        } => {
            let stack = local::Stack::require(&dir.path())?;
            let opts = bad_input::Options {
                seconds,
                connections_per_region: connections,
                attack: attack_rate.map_or(
                    bad_input::Attack::Share(attack_share),
                    bad_input::Attack::Rate,
                ),
                slow_connections,
                progress: !json,
            };
            let report = runtime()?.block_on(async {
                tokio::select! {
                    // The signal first: its handlers are in place before anything is paused.
                    biased;
                    () = web::shutdown_signal() => anyhow::bail!("interrupted"),
                    // Dropped on a signal, the suite continues the aggregators it has paused.
                    report = bad_input::run(&stack, &opts) => report,
                }
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                bad_input::print(&report);
            }
            if !report.passed {
                anyhow::bail!("the bad-input suite failed: see the rows with wrong answers, stored votes or the rate");
            }
            Ok(())
        }
        Command::Bench { role, json } => bench::run(role, json),
    }
}
