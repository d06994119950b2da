//! `tally gauntlet`: every fault of `tally drill`, one after another on the local stack, each
//! under its own load and with its own count, and a scoreboard that must read zero lost, zero
//! doubled, zero crashes. `--quick` is the CI version (fewer kills, shorter loads).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::drill::{self, Fault, Outcome};
use crate::load;
use crate::local::{self, Stack};

/// Kills of each role: a full run, and `--quick`.
const KILLS: u32 = 20;
const QUICK_KILLS: u32 = 3;
/// Load per fault, on top of what the kills take (each kill and restart is about a second).
const LOAD_SECONDS: u64 = 20;
const QUICK_LOAD_SECONDS: u64 = 12;
/// How far ahead the clock-skew fault sets a region's clock: past ingest's bound, so it refuses.
const SKEW_MS: i64 = 5_000;
/// How far ahead the close's clock-skew fault sets a region's clock: within ingest's bound.
const CLOSE_SKEW_MS: i64 = 300;

#[derive(Debug, Clone)]
pub struct Options {
    pub quick: bool,
    pub rate: f64,
    pub voters: u64,
    pub connections_per_region: usize,
    pub progress: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub fault: String,
    pub target: String,
    pub passed: bool,
    /// All zero when the drill failed.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Why the drill itself failed (a part that did not come back in time), if it did.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Scoreboard {
    pub quick: bool,
    pub rate: f64,
    pub rows: Vec<Row>,
    /// Every fault's load together, as every report has them.
    pub acknowledged: u64,
    pub counted: u64,
    pub lost: u64,
    pub doubled: u64,
    /// Panics in any process's log during the run.
    pub crashes: u64,
    pub failed: usize,
    pub seconds: f64,
}

impl Scoreboard {
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.doubled == 0
            && self.crashes == 0
            && self.failed == 0
            && self.rows.iter().all(|r| r.passed)
    }
}

/// The faults, in the order they strike. The primary failover comes last: it moves the primary,
/// and the faults that need a replica pick theirs from the stack as it is before.
fn faults(stack: &Stack, kills: u32) -> Vec<Fault> {
    let primary = stack.primary().name.clone();
    let others: Vec<String> = stack
        .regions
        .iter()
        .map(|r| r.name.clone())
        .filter(|r| *r != primary)
        .collect();
    let replica = |i: usize| others[i % others.len()].clone();
    let kill = |region: &str, role: &str| Fault::KillRole {
        region: region.into(),
        role: role.into(),
        times: kills,
    };
    let mut list = vec![
        kill(&replica(0), "ingest"),
        kill(&primary, "aggregator"),
        kill(&replica(1), "aggregator"),
        kill(&replica(1), "reader"),
        kill(local::GLOBAL, local::REPLICATION),
    ];
    if !stack.links.is_empty() {
        list.push(kill(local::GLOBAL, local::WAN));
    }
    list.extend([
        Fault::RedisKill(primary.clone()),
        Fault::RedisRestart(replica(0)),
    ]);
    if !stack.sentinels.is_empty() {
        list.push(Fault::RedisFailover(replica(1)));
    }
    list.extend([
        Fault::AggregatorLost(primary.clone()),
        Fault::ReplicaStop(replica(1)),
    ]);
    if !stack.links.is_empty() {
        list.push(Fault::RegionCut(replica(0)));
    }
    list.extend([
        Fault::ClockSkew {
            region: replica(1),
            ms: SKEW_MS,
        },
        Fault::CloseSkew {
            region: replica(0),
            ms: CLOSE_SKEW_MS,
        },
        Fault::CloseKillAggregator {
            region: primary.clone(),
            times: kills,
        },
    ]);
    if !stack.links.is_empty() {
        list.push(Fault::CloseCut(replica(1)));
    }
    list.extend([Fault::RegionDown(replica(0)), Fault::PrimaryFailover]);
    list
}

pub async fn run(dir: PathBuf, opts: Options) -> anyhow::Result<Scoreboard> {
    let started = Instant::now();
    let stack = Stack::require(&dir)?;
    let kills = if opts.quick { QUICK_KILLS } else { KILLS };
    let seconds = if opts.quick {
        QUICK_LOAD_SECONDS
    } else {
        LOAD_SECONDS
    };
    let panics_before = panics(&stack.dir.join("logs"));
    let mut rows = Vec::new();
    for fault in faults(&stack, kills) {
        let extra = match &fault {
            Fault::KillRole { times, .. } => 2 * u64::from(*times),
            _ => 0,
        };
        let load = load::Options {
            rate: opts.rate,
            duration: Duration::from_secs(seconds + extra),
            voters: opts.voters,
            connections_per_region: opts.connections_per_region,
            shape: bench::load::Shape::Steady,
            progress: opts.progress,
            show: None,
        };
        let name = fault.name();
        if opts.progress {
            eprintln!("gauntlet: {name}");
        }
        let row = match drill::run(dir.clone(), fault, load).await {
            Ok(r) => Row {
                passed: r.outcome.lost == 0
                    && r.outcome.doubled == 0
                    && r.outcome.certified_exact != Some(false),
                fault: r.drill,
                target: r.target,
                outcome: r.outcome,
                error: None,
            },
            Err(e) => Row {
                fault: name,
                target: String::new(),
                passed: false,
                outcome: Outcome::default(),
                error: Some(format!("{e:#}")),
            },
        };
        if opts.progress {
            eprintln!("{}", row_line(&row));
        }
        rows.push(row);
    }
    let crashes = panics(&stack.dir.join("logs")).saturating_sub(panics_before);
    Ok(Scoreboard {
        quick: opts.quick,
        rate: opts.rate,
        acknowledged: rows.iter().map(|r| r.outcome.acknowledged).sum(),
        counted: rows.iter().map(|r| r.outcome.counted).sum(),
        lost: rows.iter().map(|r| r.outcome.lost).sum(),
        doubled: rows.iter().map(|r| r.outcome.doubled).sum(),
        failed: rows.iter().filter(|r| r.error.is_some()).count(),
        rows,
        crashes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Panics written to the stack's process logs so far.
fn panics(logs: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(logs) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| text.matches("panicked at").count() as u64)
        .sum()
}

/// Writes the scoreboard as JSON to `path`, or under the stack's `reports/` when none is given.
pub fn save(board: &Scoreboard, dir: &Path, path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match path {
        Some(p) => p,
        None => {
            let reports = dir.join("reports");
            std::fs::create_dir_all(&reports)?;
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            reports.join(format!("gauntlet-{stamp}.json"))
        }
    };
    std::fs::write(&path, serde_json::to_vec_pretty(board)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn row_line(r: &Row) -> String {
    let o = &r.outcome;
    format!(
        "{:<18} {:<16} {:>8} {:>8} {:>5} {:>7} {:>8.2} {:>7}  {}",
        r.fault,
        r.target,
        o.acknowledged,
        o.counted,
        o.lost,
        o.doubled,
        o.recovery_seconds,
        o.errors_seen,
        match &r.error {
            Some(e) => format!("FAILED: {e}"),
            None if r.passed => "ok".into(),
            None if o.certified_exact == Some(false) => "CERTIFIED WRONG".into(),
            None => "LOST OR DOUBLED".into(),
        }
    )
}

pub fn print(board: &Scoreboard) {
    println!(
        "{:<18} {:<16} {:>8} {:>8} {:>5} {:>7} {:>8} {:>7}",
        "fault", "target", "acked", "counted", "lost", "doubled", "recover", "errors"
    );
    for r in &board.rows {
        println!("{}", row_line(r));
    }
    println!(
        "{} faults in {:.0} s: {} lost, {} doubled, {} crashes, {} drills failed",
        board.rows.len(),
        board.seconds,
        board.lost,
        board.doubled,
        board.crashes,
        board.failed
    );
}
