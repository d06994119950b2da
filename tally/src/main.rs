//! `tally`: one binary for every role of the data plane and the tools around it.
#![forbid(unsafe_code)]

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
enum BenchCmd {
    /// Ingest with real Redis vs a bare hyper server answering 202.
    Ingest {
        /// Seconds per measured round (two rounds each side).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
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

#[derive(Debug, Subcommand)]
enum LocalCmd {
    /// Start every server and role (what is already running is left alone).
    Up(DirArg),
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn execute(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Ingest(args) => {
            let config = args.config()?;
            runtime()?.block_on(async {
                let listener = roles::bind(&args.common.listen).await?;
                ingest::run(listener, config, web::shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Aggregator(args) => {
            let config = args.config()?;
            runtime()?.block_on(async {
                let listener = roles::bind(&args.common.listen).await?;
                aggregator::run(listener, config, web::shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Reader(args) => {
            let config = args.config()?;
            runtime()?.block_on(async {
                let listener = roles::bind(&args.common.listen).await?;
                reader::run(listener, config, web::shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
        Cmd::Local { command } => match command {
            LocalCmd::Up(dir) => {
                let stack = local::up(&dir.path())?;
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
        Cmd::Bench { role, json } => {
            let result = match role {
                BenchCmd::Ingest { seconds, connections } => bench::ingest_bench::run(&bench::ingest_bench::Options {
                    round: std::time::Duration::from_secs(seconds),
                    connections,
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
