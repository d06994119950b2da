//! `tally`: one command for the plane (every role and the operator's commands) and, in a build
//! with the `lab` feature, the lab (local stack, loads, drills, benchmarks). This file parses
//! and dispatches; each command lives in a module of its own, or in the `lab` crate.
#![forbid(unsafe_code)]

mod capacity;
mod migrate;
mod poll;
mod roles;
mod stack;
mod topology;
mod usage;

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

#[derive(Debug, Subcommand)]
enum Cmd {
    #[command(flatten)]
    Role(Box<roles::Role>),
    /// The regions' topology (`regions/topology/`) and the Route53 zone that routes voters by it.
    Regions {
        #[command(subcommand)]
        command: topology::RegionsCmd,
    },
    /// Apply the schema's migrations on the primary as its owner, and set the roles' passwords.
    Migrate(migrate::MigrateArgs),
    /// Create, close and list polls.
    Poll {
        #[command(subcommand)]
        command: poll::PollCmd,
    },
    /// How many pods of each role, Redis shards and PostgreSQL vCPUs three regions need for a
    /// vote rate, from the per-core rates the benchmarks measured.
    Capacity(capacity::CapacityArgs),
    #[cfg(feature = "lab")]
    #[command(flatten)]
    Lab(lab::Command),
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
            eprintln!("{}", clap_reason(&e));
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
        Err(e) if is_usage(&e) => {
            eprintln!("tally: invalid configuration: {e}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(e) => {
            eprintln!("tally: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn execute(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Role(role) => role.run(),
        Cmd::Regions { command } => command.run(),
        Cmd::Poll { command } => command.run(),
        Cmd::Migrate(args) => args.run(),
        Cmd::Capacity(args) => args.run(),
        #[cfg(feature = "lab")]
        Cmd::Lab(command) => lab::cli::run(command),
    }
}

fn is_usage(e: &anyhow::Error) -> bool {
    #[cfg(feature = "lab")]
    if e.is::<lab::BadArgs>() {
        return true;
    }
    e.is::<usage::BadConfig>()
}

/// clap spreads one reason over several lines before its usage text; keep it on one.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let reason: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty())
        .collect();
    reason.join(" ")
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
