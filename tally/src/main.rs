//! `tally`: one binary for every role of the data plane and the tools around it.
#![forbid(unsafe_code)]

mod bad_input;
mod capacity;
mod drill;
mod edge;
mod gauntlet;
mod load;
mod local;
mod poll;
mod report;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for a bad setting or bad arguments (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Multi-region vote ingestion: every acknowledged vote counted exactly once"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// A rate or a share: a finite number above zero.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("expected a number above 0, not {s:?}")),
    }
}

#[derive(Debug, clap::Args)]
struct DirArg {
    /// The local stack's directory (default: under the user's data dir).
    #[arg(long, env = "TALLY_DIR", global = true)]
    dir: Option<PathBuf>,
}

impl DirArg {
    fn path(&self) -> PathBuf {
        self.dir.clone().unwrap_or_else(local::default_dir)
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the vote API: validate, stamp, shard and store votes in Redis.
    Ingest(roles::IngestArgs),
    /// Drain Redis shards into PostgreSQL in batches, exactly once.
    Aggregator(roles::AggregatorArgs),
    /// Serve results from the local read replica.
    Reader(roles::ReaderArgs),
    /// Watch every PostgreSQL server (role, lag) and fail over when the primary is gone.
    Replication(roles::ReplicationArgs),
    /// Distance between regions on one machine: a TCP proxy per cross-region link that holds
    /// each chunk for a one-way delay, and can cut a region off. `tally local up` runs it.
    Wan(roles::WanArgs),
    /// Run the three regions on this machine.
    Local {
        #[command(subcommand)]
        command: LocalCmd,
    },
    /// The regions' topology (`regions/topology/`) and the Route53 zone that routes voters by it.
    Regions {
        #[command(subcommand)]
        command: RegionsCmd,
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
    /// Create, close and list polls.
    Poll {
        #[command(subcommand)]
        command: PollCmd,
    },
    /// Votes from simulated voters around the world against the local stack, then a check that
    /// every acknowledged vote was counted exactly once.
    Load {
        #[command(flatten)]
        dir: DirArg,
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
    /// How many pods of each role, Redis shards and PostgreSQL vCPUs three regions need for a
    /// vote rate, from the per-core rates the benchmarks measured.
    Capacity {
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

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// Votes per second, all regions together (open loop: sent on schedule, answered or not).
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// How long to send votes.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Distinct voters; fewer voters than votes means some vote again and may change their vote.
    #[arg(long, default_value_t = 20_000)]
    voters: u64,
    /// Keep-alive connections per region.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Where to write report.json and report.html (default: a new folder under the stack's `reports/`).
    #[arg(long)]
    report: Option<PathBuf>,
}

impl LoadArgs {
    fn options(&self) -> load::Options {
        load::Options {
            rate: self.rate,
            duration: std::time::Duration::from_secs(self.seconds),
            voters: self.voters,
            connections_per_region: self.connections,
            progress: true,
        }
    }
}

/// Saves the JSON and HTML reports, then prints the summary (or the whole report as JSON).
fn print_report(
    report: &load::Report,
    args: &LoadArgs,
    stack: &local::Stack,
) -> anyhow::Result<()> {
    let dir = args.report.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        stack
            .dir
            .join("reports")
            .join(format!("load-{}", now.as_secs()))
    });
    let page = report::save(report, &dir)?;
    if args.json {
        eprintln!("report: {}", page.display());
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!(
        "acknowledged {}  counted {}  lost {}  doubled {}",
        report.acknowledged, report.counted, report.lost, report.doubled
    );
    println!(
        "rate {:.0}/s (target {:.0}/s) over {:.1}s; latency p50 {:.1} ms, p99 {:.1} ms, p99.9 {:.1} ms; statuses {:?}",
        report.rate_achieved, report.rate_target, report.seconds, report.p50_ms, report.p99_ms, report.p999_ms, report.statuses
    );
    for r in &report.regions {
        println!(
            "  {:<15} {:>8} acknowledged; its reader shows {} votes ({})",
            r.name,
            r.acknowledged,
            r.reader_total,
            if r.results_match_primary {
                "same as the primary"
            } else {
                "DIFFERENT from the primary"
            }
        );
    }
    println!(
        "queues drained {:.1}s after the last vote",
        report.drained_in_seconds
    );
    println!("report: {} (and report.json beside it)", page.display());
    Ok(())
}

/// A load that lost or doubled a vote fails the command.
fn check_report(report: &load::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.lost == 0 && report.doubled == 0,
        "{} votes lost, {} doubled",
        report.lost,
        report.doubled
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Ingest with real Redis vs a bare hyper server answering 202.
    Ingest {
        #[command(flatten)]
        rounds: RoundArgs,
        /// Keep-alive connections of the load generator. Enough to keep two cores busy: with
        /// few, each connection waits out Redis's round trip and the rate measures latency.
        #[arg(long, default_value_t = bench::ingest_bench::DEFAULT_CONNECTIONS)]
        connections: usize,
        /// Redis's fsync policy, as on `tally local up`.
        #[arg(long, default_value = "everysec")]
        redis_fsync: servers::Fsync,
        /// Redis shards behind ingest, each a `redis-server` on this machine.
        #[arg(long, default_value_t = bench::ingest_bench::DEFAULT_SHARDS as u16,
              value_parser = clap::value_parser!(u16).range(1..=64))]
        shards: u16,
        /// Most votes in one group-commit write, as on `tally ingest`.
        #[arg(long, default_value_t = ingest::config::DEFAULT_GROUP_MAX_VOTES as u32,
              value_parser = clap::value_parser!(u32).range(1..))]
        group_max_votes: u32,
        /// Votes that end a batch's linger, as on `tally ingest`.
        #[arg(long, default_value_t = ingest::config::DEFAULT_GROUP_TARGET_VOTES as u32,
              value_parser = clap::value_parser!(u32).range(1..))]
        group_target_votes: u32,
        /// Group-commit writes one shard may have outstanding at once.
        #[arg(long, default_value_t = ingest::config::DEFAULT_GROUP_MAX_IN_FLIGHT as u16,
              value_parser = clap::value_parser!(u16).range(1..))]
        group_max_in_flight: u16,
        /// Microseconds a batch's first vote may wait for others while a write slot is free,
        /// as on `tally ingest`.
        #[arg(long, default_value_t = ingest::config::DEFAULT_GROUP_LINGER.as_micros() as u64,
              value_parser = clap::value_parser!(u64).range(..1_000_000))]
        group_linger_us: u64,
        /// Run ingest without its per-voter rate limit, as the benchmark did before 2026-12-02.
        #[arg(long)]
        without_voter_limit: bool,
    },
    /// Drain a pre-filled backlog into PostgreSQL vs the original one-row-per-vote worker.
    Aggregator {
        #[arg(long, default_value_t = 2_000_000)]
        votes: usize,
        #[arg(long, default_value_t = 1_000_000)]
        voters: usize,
        #[arg(long, default_value_t = 10_000)]
        baseline_votes: usize,
        #[arg(long, default_value_t = aggregator::config::DEFAULT_WRITERS)]
        writers: usize,
        #[arg(long, default_value_t = aggregator::config::DEFAULT_MAX_EVENTS)]
        max_events: usize,
        /// Then drain the backlog again through a link with this one-way delay (an aggregator
        /// in another region than the primary) and report that rate against the direct one.
        #[arg(long)]
        wan_ms: Option<u64>,
    },
    /// The regression gate: the latest `cargo bench -p bench` run against a saved criterion
    /// baseline; fails when a hot path got slower than the threshold.
    Gate {
        /// The baseline saved with `cargo bench -p bench -- --save-baseline NAME`.
        #[arg(long, default_value = "main")]
        baseline: String,
        /// Slowdown (percent of the baseline's median) that fails the gate.
        #[arg(long, default_value_t = bench::gate::DEFAULT_THRESHOLD_PERCENT)]
        threshold: f64,
        /// Criterion's results.
        #[arg(long, env = "CRITERION_HOME", default_value = "target/criterion")]
        criterion_dir: PathBuf,
    },
    /// Tally against the original app's design, in one run: its vote service (a new Redis
    /// connection and one RPUSH per request) against ingest, its worker (one INSERT, then UPDATE
    /// on conflict, per vote) against the aggregator.
    Original {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 400_000)]
        votes: usize,
        #[arg(long, default_value_t = 200_000)]
        voters: usize,
        #[arg(long, default_value_t = 10_000)]
        baseline_votes: usize,
    },
    /// Results from a replica vs a bare hyper server with a fixed body; SSE fan-out.
    Reader {
        #[command(flatten)]
        rounds: RoundArgs,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 1_000)]
        subscribers: usize,
    },
}

/// How the alternating benches (ingest, reader) split their time.
#[derive(Debug, clap::Args)]
struct RoundArgs {
    /// Seconds per measured round.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Rounds each side, alternating; the ratio is the median of the pairs' ratios.
    #[arg(long, default_value_t = bench::load::DEFAULT_PAIRS as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
}

impl RoundArgs {
    fn round(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.seconds)
    }

    fn pairs(&self) -> anyhow::Result<usize> {
        Ok(usize::try_from(self.rounds)?)
    }
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    #[command(flatten)]
    dir: DirArg,
    /// When Redis fsyncs its append-only file: `everysec` (a Redis crash loses nothing
    /// acknowledged, an OS crash may lose a second) or `always` (not even that; slower).
    #[arg(long, env = "TALLY_REDIS_FSYNC", default_value = "everysec")]
    redis_fsync: servers::Fsync,
    /// One-way delay, in milliseconds, on every connection between regions (replication
    /// streams, cross-region writes and reads), as real distance would add. Kept for later
    /// runs; given to a running stack, it applies at once. Default: the stack's (0 when new).
    #[arg(long, env = "TALLY_WAN_MS")]
    wan_ms: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct TopologyArg {
    /// A directory of topology files (`zone.toml` and one `<region>.toml` each); default: the
    /// topology built into this binary, `regions/topology/` of its source.
    #[arg(long = "regions", env = "TALLY_REGIONS")]
    regions: Option<PathBuf>,
}

impl TopologyArg {
    fn load(&self) -> anyhow::Result<regions::Topology> {
        match &self.regions {
            Some(dir) => {
                regions::Topology::load(dir).map_err(|e| roles::BadConfig(e.to_string()).into())
            }
            None => Ok(regions::Topology::standard()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum RegionsCmd {
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
        dir: DirArg,
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

#[derive(Debug, Subcommand)]
enum DrillCmd {
    /// Cut a region off (kill its ingest, aggregator and reader): its voters go to the next
    /// region in its failover order; then bring it back and drain what it had queued.
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
    /// kill -9 a region's first Redis shard, then start it again (its append-only file replays).
    RedisKill { region: String },
    /// Shut a region's first Redis shard down cleanly, then start it again.
    RedisRestart { region: String },
    /// Stop a replica's PostgreSQL for a while; commits go on with the other replica.
    ReplicaStop { region: String },
    /// Cut every link to and from a region (`tally wan`), then heal them.
    RegionCut { region: String },
    /// Run a region's ingest with its clock ahead (`--ms`, negative: behind) for a while.
    ClockSkew {
        region: String,
        #[arg(long, default_value_t = 5_000, allow_negative_numbers = true)]
        ms: i64,
    },
}

#[derive(Debug, clap::Args)]
struct DrillLoad {
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

#[derive(Debug, Subcommand)]
enum LocalCmd {
    /// Start every server and role (what is already running is left alone).
    Up(UpArgs),
    /// Where everything is, and replica lag.
    Status {
        #[command(flatten)]
        dir: DirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop everything; queued votes stay in Redis for the next `up`.
    Down(DirArg),
}

#[derive(Debug, clap::Args)]
struct PollTarget {
    #[command(flatten)]
    dir: DirArg,
    /// The primary's URL (default: the local stack's primary).
    #[arg(long, env = roles::ENV_POSTGRES_URL)]
    postgres_url: Option<String>,
}

impl PollTarget {
    fn url(&self) -> anyhow::Result<String> {
        match &self.postgres_url {
            Some(u) => Ok(u.clone()),
            None => Ok(local::Stack::require(&self.dir.path())?.primary_url()),
        }
    }
}

#[derive(Debug, Subcommand)]
enum PollCmd {
    /// Create a poll with the given options.
    Create {
        id: String,
        /// Comma-separated options, at least two.
        #[arg(long, value_delimiter = ',', required = true)]
        options: Vec<String>,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Stop accepting votes for a poll (409 from then on).
    Close {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Accept votes for a poll again.
    Open {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// List polls.
    List {
        #[command(flatten)]
        target: PollTarget,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap spreads one reason over several lines before its usage text; keep it on one.
            let text = e.to_string();
            let reason: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", reason.join(" "));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // One trust for every connection the process makes, checked before any port is bound.
    if let Err(e) = tls::trust_from_env() {
        eprintln!("tally: invalid configuration: {}: {e}", tls::ENV_CA_FILE);
        return ExitCode::from(EXIT_USAGE);
    }
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<roles::BadConfig>() => {
            eprintln!("tally: invalid configuration: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("tally: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Binds `listen` and runs a role on it until SIGINT/SIGTERM.
fn serve_role<F, Fut, E>(listen: &str, run: F) -> anyhow::Result<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    runtime()?.block_on(async {
        let listener = roles::bind(listen).await?;
        run(listener).await?;
        Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn execute(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        // Each role's configuration is checked (exit 64) before its port is bound.
        Cmd::Ingest(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| {
                ingest::run(l, config, web::shutdown_signal())
            })
        }
        Cmd::Aggregator(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| {
                aggregator::run(l, config, web::shutdown_signal())
            })
        }
        Cmd::Reader(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| {
                reader::run(l, config, web::shutdown_signal())
            })
        }
        Cmd::Replication(args) => {
            let config = args.config()?;
            serve_role(&args.listen, |l| {
                replication::run(l, config, web::shutdown_signal())
            })
        }
        Cmd::Wan(args) => {
            let config = args.config()?;
            serve_role(&args.listen, |l| {
                wan::run(l, config, web::shutdown_signal())
            })
        }
        Cmd::Local { command } => match command {
            LocalCmd::Up(args) => {
                let stack = local::up(&args.dir.path(), args.redis_fsync, args.wan_ms)?;
                local::print_status(&local::status(&stack.dir)?);
                Ok(())
            }
            LocalCmd::Status { dir, json } => {
                let status = local::status(&dir.path())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    local::print_status(&status);
                }
                Ok(())
            }
            LocalCmd::Down(dir) => {
                local::down(&dir.path())?;
                println!("local stack in {} stopped", dir.path().display());
                Ok(())
            }
        },
        Cmd::Regions { command } => match command {
            RegionsCmd::Sync {
                topology,
                dry_run,
                endpoint_url,
                dir,
                json,
            } => {
                let topology = topology.load()?;
                let local = local::Stack::load(&dir.path())?
                    .map(|s| s.moto())
                    .filter(|m| m.is_running());
                let (endpoint, local_creds) = match (endpoint_url, local) {
                    (Some(url), _) => (Some(url), false),
                    (None, Some(moto)) => (Some(moto.url()), true),
                    (None, None) => (None, false),
                };
                eprintln!(
                    "route53 at {}",
                    endpoint
                        .as_deref()
                        .unwrap_or("AWS (from the usual AWS settings)")
                );
                let changes = runtime()?.block_on(async {
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
        },
        Cmd::Drill {
            drill: which,
            dir,
            load,
        } => {
            let fault = match which {
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
                DrillCmd::ReplicaStop { region } => drill::Fault::ReplicaStop(region),
                DrillCmd::RegionCut { region } => drill::Fault::RegionCut(region),
                DrillCmd::ClockSkew { region, ms } => drill::Fault::ClockSkew { region, ms },
            };
            let opts = load::Options {
                rate: load.rate,
                duration: std::time::Duration::from_secs(load.seconds),
                voters: load.voters,
                connections_per_region: load.connections,
                progress: !load.json,
            };
            let report = runtime()?.block_on(drill::run(dir.path(), fault, opts))?;
            if load.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                drill::print(&report);
            }
            check_report(&report.load)
        }
        Cmd::Gauntlet {
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
        Cmd::BadInput {
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
        Cmd::Load { dir, load: args } => {
            let stack = local::Stack::require(&dir.path())?;
            let report = runtime()?.block_on(load::run(&stack, &args.options()))?;
            print_report(&report, &args, &stack)?;
            check_report(&report)
        }
        Cmd::Demo {
            up,
            load: args,
            keep,
        } => {
            let dir = up.dir.path();
            eprintln!("starting three regions in {} ...", dir.display());
            let stack = local::up(&dir, up.redis_fsync, up.wan_ms)?;
            let report = runtime()?.block_on(load::run(&stack, &args.options()));
            let report = match report {
                Ok(r) => r,
                Err(e) => {
                    if !keep {
                        local::down(&dir)?;
                    }
                    return Err(e);
                }
            };
            print_report(&report, &args, &stack)?;
            if !args.json {
                println!("live results pages:");
                for r in &stack.regions {
                    println!(
                        "  {:<15} http://127.0.0.1:{}/?poll=default",
                        r.name, r.reader
                    );
                }
            }
            if keep {
                eprintln!(
                    "the stack keeps running; stop it with `tally local down --dir {}`",
                    dir.display()
                );
            } else {
                local::down(&dir)?;
            }
            check_report(&report)
        }
        Cmd::Capacity {
            rate,
            reads,
            utilisation,
            quiet,
            json,
        } => {
            let inputs = capacity::Inputs {
                votes_per_second: rate,
                reads_per_second: reads,
                utilisation,
                quiet_fraction: quiet,
            };
            let plan = capacity::plan(&inputs).map_err(|e| roles::BadConfig(e.to_string()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                capacity::print(&plan);
            }
            Ok(())
        }
        Cmd::Bench { role, json } => {
            let results = match role {
                BenchCmd::Gate {
                    baseline,
                    threshold,
                    criterion_dir,
                } => return gate(&criterion_dir, &baseline, threshold, json),
                BenchCmd::Ingest {
                    rounds,
                    connections,
                    redis_fsync,
                    shards,
                    group_max_votes,
                    group_target_votes,
                    group_max_in_flight,
                    group_linger_us,
                    without_voter_limit,
                } => vec![bench::ingest_bench::run(&bench::ingest_bench::Options {
                    round: rounds.round(),
                    pairs: rounds.pairs()?,
                    connections,
                    redis_fsync,
                    shards: shards.into(),
                    group: ingest::GroupCommit {
                        max_votes: group_max_votes as usize,
                        target_votes: group_target_votes as usize,
                        max_in_flight: group_max_in_flight.into(),
                        linger: std::time::Duration::from_micros(group_linger_us),
                    },
                    voter_limit: !without_voter_limit,
                    ..Default::default()
                })?],
                BenchCmd::Aggregator {
                    votes,
                    voters,
                    baseline_votes,
                    writers,
                    max_events,
                    wan_ms,
                } => vec![bench::aggregator_bench::run(
                    &bench::aggregator_bench::Options {
                        votes,
                        voters,
                        baseline_votes,
                        writers,
                        max_events,
                        wan_ms,
                        ..Default::default()
                    },
                )?],
                BenchCmd::Original {
                    seconds,
                    connections,
                    votes,
                    voters,
                    baseline_votes,
                } => vec![
                    bench::ingest_bench::run(&bench::ingest_bench::Options {
                        round: std::time::Duration::from_secs(seconds),
                        connections,
                        baseline: bench::ingest_bench::Baseline::OriginalVoteService,
                        ..Default::default()
                    })?,
                    bench::aggregator_bench::run(&bench::aggregator_bench::Options {
                        votes,
                        voters,
                        baseline_votes,
                        ..Default::default()
                    })?,
                ],
                BenchCmd::Reader {
                    rounds,
                    connections,
                    subscribers,
                } => vec![bench::reader_bench::run(&bench::reader_bench::Options {
                    round: rounds.round(),
                    pairs: rounds.pairs()?,
                    connections,
                    subscribers,
                })?],
            };
            for result in &results {
                if json {
                    println!("{}", serde_json::to_string(result)?);
                } else {
                    println!("{}", serde_json::to_string_pretty(&result.details)?);
                }
            }
            if !json {
                for result in &results {
                    println!("{}", result.line());
                }
            }
            Ok(())
        }
        Cmd::Poll { command } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match command {
                PollCmd::Create {
                    id,
                    options,
                    target,
                } => rt.block_on(poll::create(&target.url()?, &id, &options)),
                PollCmd::Close { id, target } => {
                    rt.block_on(poll::set_open(&target.url()?, &id, false))
                }
                PollCmd::Open { id, target } => {
                    rt.block_on(poll::set_open(&target.url()?, &id, true))
                }
                PollCmd::List { target } => rt.block_on(poll::list(&target.url()?)),
            }
        }
    }
}

/// `tally bench gate`: fails when a hot path got slower than `threshold` percent.
fn gate(
    criterion_dir: &std::path::Path,
    baseline: &str,
    threshold: f64,
    json: bool,
) -> anyhow::Result<()> {
    let changes = bench::gate::run(criterion_dir, baseline, threshold)?;
    if json {
        println!("{}", serde_json::to_string(&changes)?);
    } else {
        for c in &changes {
            println!(
                "{:<40} {:>12.1} ns -> {:>12.1} ns  {:>+7.1}%{}",
                c.bench,
                c.baseline_ns,
                c.latest_ns,
                c.percent,
                if c.regressed { "  SLOWER" } else { "" }
            );
        }
    }
    let slower: Vec<&str> = changes
        .iter()
        .filter(|c| c.regressed)
        .map(|c| c.bench.as_str())
        .collect();
    anyhow::ensure!(
        slower.is_empty(),
        "{} of {} benches are more than {threshold}% slower than baseline {baseline:?}: {}",
        slower.len(),
        changes.len(),
        slower.join(", ")
    );
    println!("gate passed: no bench more than {threshold}% slower than baseline {baseline:?}");
    Ok(())
}
