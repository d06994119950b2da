//! `tally`: one binary for every role of the data plane and the tools around it.
#![forbid(unsafe_code)]

mod load;
mod local;
mod poll;
mod roles;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for a bad setting or bad arguments (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Multi-region vote ingestion: every acknowledged vote counted exactly once")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args)]
struct DirArg {
    /// The local stack's directory (default: under the user's data dir).
    #[arg(long, env = "TALLY_DIR")]
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
    /// Run the three regions on this machine.
    Local {
        #[command(subcommand)]
        command: LocalCmd,
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

fn print_report(report: &load::Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
        return Ok(());
    }
    println!("acknowledged {}  counted {}  lost {}  doubled {}", report.acknowledged, report.counted, report.lost, report.doubled);
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
            if r.results_match_primary { "same as the primary" } else { "DIFFERENT from the primary" }
        );
    }
    println!("queues drained {:.1}s after the last vote", report.drained_in_seconds);
    Ok(())
}

/// A load that lost or doubled a vote fails the command.
fn check_report(report: &load::Report) -> anyhow::Result<()> {
    anyhow::ensure!(report.lost == 0 && report.doubled == 0, "{} votes lost, {} doubled", report.lost, report.doubled);
    Ok(())
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Ingest with real Redis vs a bare hyper server answering 202.
    Ingest {
        /// Seconds per measured round (two rounds each side).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Redis's fsync policy, as on `tally local up`.
        #[arg(long, default_value = "everysec")]
        redis_fsync: servers::Fsync,
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
    },
    /// Results from a replica vs a bare hyper server with a fixed body; SSE fan-out.
    Reader {
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 1_000)]
        subscribers: usize,
    },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    #[command(flatten)]
    dir: DirArg,
    /// When Redis fsyncs its append-only file: `everysec` (a Redis crash loses nothing
    /// acknowledged, an OS crash may lose a second) or `always` (not even that; slower).
    #[arg(long, env = "TALLY_REDIS_FSYNC", default_value = "everysec")]
    redis_fsync: servers::Fsync,
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
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap spreads one reason over several lines before its usage text; keep it on one.
            let text = e.to_string();
            let reason: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.starts_with("Usage:")).filter(|l| !l.is_empty()).collect();
            eprintln!("{}", reason.join(" "));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
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
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn execute(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        // Each role's configuration is checked (exit 64) before its port is bound.
        Cmd::Ingest(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| ingest::run(l, config, web::shutdown_signal()))
        }
        Cmd::Aggregator(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| aggregator::run(l, config, web::shutdown_signal()))
        }
        Cmd::Reader(args) => {
            let config = args.config()?;
            serve_role(&args.common.listen, |l| reader::run(l, config, web::shutdown_signal()))
        }
        Cmd::Local { command } => match command {
            LocalCmd::Up(args) => {
                let stack = local::up(&args.dir.path(), args.redis_fsync)?;
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
        Cmd::Load { dir, load: args } => {
            let stack = local::Stack::require(&dir.path())?;
            let report = runtime()?.block_on(load::run(&stack, &args.options()))?;
            print_report(&report, args.json)?;
            check_report(&report)
        }
        Cmd::Demo { up, load: args, keep } => {
            let dir = up.dir.path();
            eprintln!("starting three regions in {} ...", dir.display());
            let stack = local::up(&dir, up.redis_fsync)?;
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
            print_report(&report, args.json)?;
            if !args.json {
                println!("live results pages:");
                for r in &stack.regions {
                    println!("  {:<15} http://127.0.0.1:{}/?poll=default", r.name, r.reader);
                }
            }
            if keep {
                eprintln!("the stack keeps running; stop it with `tally local down --dir {}`", dir.display());
            } else {
                local::down(&dir)?;
            }
            check_report(&report)
        }
        Cmd::Bench { role, json } => {
            let result = match role {
                BenchCmd::Ingest { seconds, connections, redis_fsync } => bench::ingest_bench::run(&bench::ingest_bench::Options {
                    round: std::time::Duration::from_secs(seconds),
                    connections,
                    redis_fsync,
                    ..Default::default()
                })?,
                BenchCmd::Aggregator { votes, voters, baseline_votes, writers, max_events } => bench::aggregator_bench::run(
                    &bench::aggregator_bench::Options { votes, voters, baseline_votes, writers, max_events, ..Default::default() },
                )?,
                BenchCmd::Reader { seconds, connections, subscribers } => bench::reader_bench::run(&bench::reader_bench::Options {
                    round: std::time::Duration::from_secs(seconds),
                    connections,
                    subscribers,
                })?,
            };
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&result.details)?);
                println!("{}", result.line());
            }
            Ok(())
        }
        Cmd::Poll { command } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            match command {
                PollCmd::Create { id, options, target } => rt.block_on(poll::create(&target.url()?, &id, &options)),
                PollCmd::Close { id, target } => rt.block_on(poll::set_open(&target.url()?, &id, false)),
                PollCmd::Open { id, target } => rt.block_on(poll::set_open(&target.url()?, &id, true)),
                PollCmd::List { target } => rt.block_on(poll::list(&target.url()?)),
            }
        }
    }
}
