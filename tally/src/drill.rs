//! `tally drill region-down <region>` and `tally drill primary-failover`: a fault under a
//! continuous load, the time the system took to notice and to serve again, the broken part
//! brought back, and the load's own check that every acknowledged vote was counted once.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::load::{self, Live};
use crate::local::{self, Stack};

/// Votes acknowledged before the fault, so it strikes a plane at work.
const WARM_VOTES: u64 = 2_000;
/// How long the plane gets to notice and route around a fault before the drill fails.
const RECOVER_WITHIN: Duration = Duration::from_secs(30);
/// How long a region stays down once its voters are served elsewhere.
const HOLD_DOWN: Duration = Duration::from_secs(3);

#[derive(Debug, Clone)]
pub enum Fault {
    RegionDown(String),
    PrimaryFailover,
}

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub drill: String,
    /// The region cut off, or the region whose primary was killed.
    pub target: String,
    pub acknowledged: u64,
    pub counted: u64,
    pub lost: u64,
    pub doubled: u64,
    /// From the fault until the plane noticed: the edge marked the region unhealthy, or
    /// `tally replication` chose a new primary.
    pub detect_seconds: f64,
    /// From the fault until votes flowed again: the cut region's voters acknowledged by another
    /// region, or the aggregators committing on the new primary.
    pub recovery_seconds: f64,
    /// How long bringing the failed part back took (restarted roles ready, or the old primary
    /// rewound and streaming as a replica).
    pub rejoin_seconds: f64,
    /// The new primary, for a primary failover.
    pub new_primary: Option<String>,
    /// Answers that were not 202 (503s and refused connections while a region was down are
    /// expected; a 202 later lost would show in `lost`).
    pub errors_seen: u64,
    pub load: load::Report,
}

pub async fn run(dir: PathBuf, fault: Fault, opts: load::Options) -> anyhow::Result<DrillReport> {
    let stack = Stack::require(&dir)?;
    if let Fault::RegionDown(region) = &fault {
        if !stack.regions.iter().any(|r| &r.name == region) {
            bail!(
                "no region {region} in the local stack (it has {})",
                stack
                    .regions
                    .iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if opts.duration < Duration::from_secs(10) {
        bail!("a drill needs a load of at least 10 seconds to strike and recover within");
    }
    let live = Live::new(&stack, regions::Topology::standard())?;
    let load = {
        let (stack, opts, live) = (stack.clone(), opts.clone(), live.clone());
        tokio::spawn(async move { load::run_with(&stack, &opts, live).await })
    };
    wait_for("the load to warm up", Duration::from_secs(20), || {
        live.acked.load(std::sync::atomic::Ordering::Relaxed) >= WARM_VOTES
    })
    .await?;

    let (target, timings) = match &fault {
        Fault::RegionDown(region) => (
            region.clone(),
            region_down(&stack, &dir, region, &live).await?,
        ),
        Fault::PrimaryFailover => {
            let old = stack.primary().name.clone();
            (old.clone(), primary_failover(&stack, &dir, &old).await?)
        }
    };
    let report = load.await??;
    let errors_seen = report
        .statuses
        .iter()
        .filter(|(s, _)| **s != 202)
        .map(|(_, n)| n)
        .sum::<u64>()
        + report.transport_errors;
    Ok(DrillReport {
        drill: match fault {
            Fault::RegionDown(_) => "region-down".into(),
            Fault::PrimaryFailover => "primary-failover".into(),
        },
        target,
        acknowledged: report.acknowledged,
        counted: report.counted,
        lost: report.lost,
        doubled: report.doubled,
        detect_seconds: timings.detect.as_secs_f64(),
        recovery_seconds: timings.recover.as_secs_f64(),
        rejoin_seconds: timings.rejoin.as_secs_f64(),
        new_primary: timings.new_primary,
        errors_seen,
        load: report,
    })
}

struct Timings {
    detect: Duration,
    recover: Duration,
    rejoin: Duration,
    new_primary: Option<String>,
}

/// Kills the region's roles (its Redis keeps what it holds, as ElastiCache would), waits for its
/// voters to be served elsewhere, then brings the region back; its queued votes drain then.
async fn region_down(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    live: &Arc<Live>,
) -> anyhow::Result<Timings> {
    let cut = Instant::now();
    for role in local::ROLES {
        if let Some(pid) = stack.role_pid(region, role) {
            servers::signal(pid, "KILL");
        }
    }
    wait_for(
        "the edge to mark the region unhealthy",
        RECOVER_WITHIN,
        || !live.edge.healthy(region),
    )
    .await?;
    let detect = cut.elapsed();
    let before = live.acked_from(region);
    wait_for(
        "the region's voters to be acknowledged elsewhere",
        RECOVER_WITHIN,
        || live.acked_from(region) > before,
    )
    .await?;
    let recover = cut.elapsed();
    tokio::time::sleep(HOLD_DOWN).await;
    let rejoin = heal(dir).await?;
    wait_for("the edge to see the region again", RECOVER_WITHIN, || {
        live.edge.healthy(region)
    })
    .await?;
    Ok(Timings {
        detect,
        recover,
        rejoin,
        new_primary: None,
    })
}

/// Kills the primary's postmaster; `tally replication` fences it and promotes a replica, the
/// aggregators find the new primary; then the old one is rewound and rejoins as a replica.
async fn primary_failover(
    stack: &Stack,
    dir: &std::path::Path,
    old: &str,
) -> anyhow::Result<Timings> {
    if !stack.role_running(local::GLOBAL, local::REPLICATION) {
        bail!("tally replication is not running; `tally local up` starts it");
    }
    let pidfile = dir.join("pg").join(old).join("postmaster.pid");
    let pid = servers::read_pid(&pidfile)
        .with_context(|| format!("no pid in {}: is the primary running?", pidfile.display()))?;
    let writer = stack.primary_url();
    let committed = || async {
        let c = db::connect(&writer).await.ok()?;
        let row = c
            .query_one("SELECT COALESCE(sum(count), 0)::int8 FROM tallies", &[])
            .await
            .ok()?;
        Some(row.get::<_, i64>(0))
    };

    let cut = Instant::now();
    servers::signal(pid, "KILL");
    let status_port = stack.replication;
    let mut new_primary = None;
    while cut.elapsed() < RECOVER_WITHIN {
        let view = load::get_json(status_port, "/status").await.ok();
        if let Some(p) = view.as_ref().and_then(|v| v["primary"].as_str()) {
            if p != old {
                new_primary = Some(p.to_string());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(new) = new_primary else {
        bail!("tally replication chose no new primary within {RECOVER_WITHIN:?}");
    };
    let detect = cut.elapsed();
    // Votes flow again once the aggregators commit on the new primary.
    let mut first = None;
    let recover = loop {
        if cut.elapsed() > RECOVER_WITHIN {
            bail!("no commit on the new primary {new} within {RECOVER_WITHIN:?}");
        }
        if let Some(n) = committed().await {
            match first {
                None => first = Some(n),
                Some(f) if n > f => break cut.elapsed(),
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rejoin = heal(dir).await?;
    Ok(Timings {
        detect,
        recover,
        rejoin,
        new_primary: Some(new),
    })
}

/// `tally local up` again: restarts what is down, and rewinds a fenced former primary into a
/// replica of the new one.
async fn heal(dir: &std::path::Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || local::up(&dir, servers::Fsync::Everysec, None))
        .await?
        .context("bringing the failed part back")?;
    Ok(started.elapsed())
}

async fn wait_for(what: &str, limit: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn print(report: &DrillReport) {
    println!("drill {} ({})", report.drill, report.target);
    if let Some(p) = &report.new_primary {
        println!("  new primary      {p}");
    }
    println!("  detected in      {:.2} s", report.detect_seconds);
    println!("  recovered in     {:.2} s", report.recovery_seconds);
    println!("  brought back in  {:.2} s", report.rejoin_seconds);
    println!(
        "  votes            {} acknowledged, {} counted, {} lost, {} doubled",
        report.acknowledged, report.counted, report.lost, report.doubled
    );
    println!(
        "  errors seen      {} (not 202; none of them acknowledged)",
        report.errors_seen
    );
}
