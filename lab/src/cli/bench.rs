//! `tally bench`: each role against its baseline in one run, on real servers of its own, and the
//! criterion regression gate.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
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
        /// Each shard with a replica that ingest waits for before it answers (`WAIT 1`), as the
        /// local stack and the deployment run.
        #[arg(long)]
        redis_replica: bool,
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
        /// Voters hold RS256 tokens of an identity provider, as from Auth0, and ingest verifies
        /// them (a JWKS fetched over HTTP, verified tokens remembered).
        #[arg(long)]
        auth: bool,
        /// With `--auth`: votes each voter casts with one token (1: every vote a new voter).
        #[arg(long, default_value_t = 1, requires = "auth",
              value_parser = clap::value_parser!(u64).range(1..))]
        votes_per_voter: u64,
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
        /// Run PostgreSQL with a replica and drain again, acknowledging each batch only once the
        /// replica replayed it (the deployment's `TALLY_WAIT_REPLICAS=1`): the wait's cost.
        #[arg(long)]
        replay: bool,
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
pub struct RoundArgs {
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

/// Runs one benchmark, or the gate, and prints its results.
pub fn run(role: BenchCmd, json: bool) -> anyhow::Result<()> {
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
            redis_replica,
            shards,
            group_max_votes,
            group_target_votes,
            group_max_in_flight,
            group_linger_us,
            without_voter_limit,
            auth,
            votes_per_voter,
        } => vec![bench::ingest_bench::run(&bench::ingest_bench::Options {
            round: rounds.round(),
            pairs: rounds.pairs()?,
            connections,
            redis_fsync,
            redis_replica,
            shards: shards.into(),
            group: ingest::GroupCommit {
                max_votes: group_max_votes as usize,
                target_votes: group_target_votes as usize,
                max_in_flight: group_max_in_flight.into(),
                linger: std::time::Duration::from_micros(group_linger_us),
            },
            voter_limit: !without_voter_limit,
            auth_votes_per_voter: auth.then_some(votes_per_voter),
            ..Default::default()
        })?],
        BenchCmd::Aggregator {
            votes,
            voters,
            baseline_votes,
            writers,
            max_events,
            wan_ms,
            replay,
        } => vec![bench::aggregator_bench::run(
            &bench::aggregator_bench::Options {
                votes,
                voters,
                baseline_votes,
                writers,
                max_events,
                wan_ms,
                replay,
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
