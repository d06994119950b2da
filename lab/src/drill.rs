//! `tally drill <fault>`: one fault under a continuous load, the time the system took to notice
//! and to serve again, the broken part brought back, and the load's own check that every
//! acknowledged vote was counted once. `tally gauntlet` runs every fault in turn.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::load::{self, Live};
use crate::local::{self, Stack};
use crate::report;

/// Votes acknowledged before the fault, so it strikes a plane at work.
const WARM_VOTES: u64 = 2_000;
/// How long the plane gets to notice and route around a fault before the drill fails.
const RECOVER_WITHIN: Duration = Duration::from_secs(30);
/// How long a region stays down once its voters are served elsewhere.
const HOLD_DOWN: Duration = Duration::from_secs(3);
/// How long the edge of a running load takes at most to see a ready region.
const EDGE_NOTICES: Duration = Duration::from_secs(5);

/// How long a part stays broken in the faults that hold one down.
const HOLD_BROKEN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub enum Fault {
    /// kill -9 of every role of a region; its voters go to the next region.
    RegionDown(String),
    /// kill -9 of the primary's postmaster.
    PrimaryFailover,
    /// kill -9 of one process, `times` times at random instants; each time it is started again.
    /// `region` is [`local::GLOBAL`] for the watcher and the WAN links.
    KillRole {
        region: String,
        role: String,
        times: u32,
    },
    /// kill -9 of a region's first Redis shard, its replica and its primary both; their
    /// append-only files have every acknowledged vote.
    RedisKill(String),
    /// A clean shutdown of a region's first Redis shard, replica and primary, then a start.
    RedisRestart(String),
    /// kill -9 of the primary of a region's first Redis shard alone: the sentinels promote its
    /// replica, which has every vote ingest acknowledged (it waited for the replica).
    RedisFailover(String),
    /// kill -9 of one of a region's aggregators, not restarted while another of the region
    /// runs: its lease expires and the other adopts its in-flight lists.
    AggregatorLost(String),
    /// A replica's server stopped for a while; commits keep going on the other one.
    ReplicaStop(String),
    /// Every link to and from a region cut, then healed: it keeps taking votes into its Redis,
    /// and drains them once it can reach the primary again.
    RegionCut(String),
    /// A region's ingest stamping votes with its clock `ms` ahead (behind, when negative). Past
    /// ingest's bound on clock offset, it refuses votes and its voters go elsewhere.
    ClockSkew { region: String, ms: i64 },
    /// Through a poll's close: every link of a region cut a second before it and healed three
    /// after (its ingest's catalog source, its aggregator's writes). The poll is certified final,
    /// exactly.
    CloseCut(String),
    /// Through a poll's close: a region's ingest `ms` ahead, within its bound.
    CloseSkew { region: String, ms: i64 },
    /// Through a poll's close: a region's aggregator killed `times` times at random instants
    /// from two seconds before it to six after.
    CloseKillAggregator { region: String, times: u32 },
}

/// When a close drill's poll closes, counted from the load's start.
const CLOSE_AFTER: Duration = Duration::from_secs(8);

impl Fault {
    pub fn name(&self) -> String {
        match self {
            Fault::RegionDown(_) => "region-down".into(),
            Fault::PrimaryFailover => "primary-failover".into(),
            Fault::KillRole { role, .. } => format!("kill-{role}"),
            Fault::RedisKill(_) => "redis-kill".into(),
            Fault::RedisRestart(_) => "redis-restart".into(),
            Fault::RedisFailover(_) => "redis-failover".into(),
            Fault::AggregatorLost(_) => "aggregator-lost".into(),
            Fault::ReplicaStop(_) => "replica-stop".into(),
            Fault::RegionCut(_) => "region-cut".into(),
            Fault::ClockSkew { .. } => "clock-skew".into(),
            Fault::CloseCut(_) => "close-cut".into(),
            Fault::CloseSkew { .. } => "close-skew".into(),
            Fault::CloseKillAggregator { .. } => "close-kill-aggregator".into(),
        }
    }

    /// A fault that strikes around a poll's close, which the load then waits to see certified.
    fn closes_a_poll(&self) -> bool {
        matches!(
            self,
            Fault::CloseCut(_) | Fault::CloseSkew { .. } | Fault::CloseKillAggregator { .. }
        )
    }

    /// The region it strikes, if it names one.
    fn region(&self) -> Option<&str> {
        match self {
            Fault::PrimaryFailover => None,
            Fault::KillRole { region, .. } if region == local::GLOBAL => None,
            Fault::RegionDown(r)
            | Fault::KillRole { region: r, .. }
            | Fault::RedisKill(r)
            | Fault::RedisRestart(r)
            | Fault::RedisFailover(r)
            | Fault::AggregatorLost(r)
            | Fault::ReplicaStop(r)
            | Fault::RegionCut(r)
            | Fault::ClockSkew { region: r, .. }
            | Fault::CloseCut(r)
            | Fault::CloseSkew { region: r, .. }
            | Fault::CloseKillAggregator { region: r, .. } => Some(r),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub drill: String,
    /// The region cut off, or the region whose primary was killed.
    pub target: String,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long bringing the failed part back took (restarted roles ready, or the old primary
    /// rewound and streaming as a replica).
    pub rejoin_seconds: f64,
    /// The new primary, for a primary failover.
    pub new_primary: Option<String>,
    pub load: report::Report,
}

/// What a drill found: the votes, and how long the plane took.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
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
    /// Answers that were not 202 (503s and refused connections while a region was down are
    /// expected; a 202 later lost would show in `lost`).
    pub errors_seen: u64,
    /// For the faults around a close: the poll was certified final with exactly the votes
    /// acknowledged before its close, and its audit agrees.
    pub certified_exact: Option<bool>,
}

pub async fn run(
    dir: PathBuf,
    fault: Fault,
    mut opts: load::Options,
) -> anyhow::Result<DrillReport> {
    let stack = Stack::require(&dir)?;
    if fault.closes_a_poll() {
        let mut show = load::Show::for_load(opts.duration);
        show.closes_after = CLOSE_AFTER;
        opts.show = Some(show);
        opts.duration = opts.duration.max(CLOSE_AFTER + Duration::from_secs(6));
    }
    if let Some(region) = fault.region() {
        stack.region(region)?;
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

    // Named before the strike: a failover moves the primary.
    let target = fault
        .region()
        .map(str::to_string)
        .unwrap_or_else(|| match &fault {
            Fault::PrimaryFailover => stack.primary().name.clone(),
            Fault::KillRole { role, .. } => role.clone(),
            _ => String::new(),
        });
    live.settled.send_replace(false);
    let struck = match &fault {
        Fault::RegionDown(region) => region_down(&stack, &dir, region, &live).await,
        Fault::PrimaryFailover => primary_failover(&stack, &dir, &target).await,
        Fault::KillRole {
            region,
            role,
            times,
        } => kill_role(&stack, &dir, region, role, *times).await,
        Fault::RedisKill(region) => redis_down(&stack, &dir, region, true).await,
        Fault::RedisRestart(region) => redis_down(&stack, &dir, region, false).await,
        Fault::RedisFailover(region) => redis_failover(&stack, &dir, region).await,
        Fault::AggregatorLost(region) => aggregator_lost(&stack, &dir, region).await,
        Fault::ReplicaStop(region) => replica_stop(&stack, &dir, region).await,
        Fault::RegionCut(region) => region_cut(&stack, region).await,
        Fault::ClockSkew { region, ms } => clock_skew(&stack, &dir, region, *ms, &live).await,
        Fault::CloseCut(region) => close_cut(&stack, region, &live).await,
        Fault::CloseSkew { region, ms } => close_skew(&stack, &dir, region, *ms, &live).await,
        Fault::CloseKillAggregator { region, times } => {
            close_kill_aggregator(&stack, &dir, region, *times, &live).await
        }
    };
    live.settled.send_replace(true);
    let timings = match struck {
        Ok(t) => t,
        Err(e) => {
            // Bring the plane back before the load's own check, which would fail for that reason.
            let _ = heal(&dir).await;
            load.abort();
            return Err(e.context(format!("drill {}", fault.name())));
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
        drill: fault.name(),
        target,
        outcome: Outcome {
            acknowledged: report.acknowledged,
            counted: report.counted,
            lost: report.lost,
            doubled: report.doubled,
            detect_seconds: timings.detect.as_secs_f64(),
            recovery_seconds: timings.recover.as_secs_f64(),
            errors_seen,
            certified_exact: report.show.as_ref().map(|s| {
                s.counts_match_acknowledged && s.audit_matches && s.acknowledged_after_close == 0
            }),
        },
        rejoin_seconds: timings.rejoin.as_secs_f64(),
        new_primary: timings.new_primary,
        load: report,
    })
}

struct Timings {
    detect: Duration,
    recover: Duration,
    rejoin: Duration,
    new_primary: Option<String>,
}

/// The whole region lost at once: its roles, its Redis shards and its PostgreSQL server, kill -9.
/// Its voters are served elsewhere; if it held the primary, `tally replication` promotes the
/// replica with the most WAL and the other regions' aggregators commit there. What its Redis
/// held waits for it (append-only files, as a region's own storage would); brought back, its
/// server rejoins as a replica and its queued votes drain.
async fn region_down(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    live: &Arc<Live>,
) -> anyhow::Result<Timings> {
    let r = stack.region(region)?;
    let held_primary = stack.primary().name == region;
    let postmaster = servers::read_pid(&dir.join("pg").join(region).join("postmaster.pid"));
    let cut = Instant::now();
    for name in r.processes() {
        if let Some(pid) = stack.role_pid(region, &name) {
            servers::signal(pid, "KILL");
        }
    }
    if let Some(pid) = postmaster {
        servers::signal(pid, "KILL");
    }
    // Replicas before primaries, so the sentinels find nothing to promote.
    for shard in 0..r.redis.len() {
        let primary = stack.shard_primary(r, shard);
        let mut servers = stack.shard_servers(r, shard, servers::Fsync::Everysec);
        servers.sort_by_key(|s| s.port == primary);
        for server in &servers {
            server.kill();
        }
    }
    wait_for(
        "the edge to mark the region unhealthy",
        RECOVER_WITHIN,
        || !live.routes_to(region),
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
    let mut new_primary = None;
    if held_primary {
        let new = wait_new_primary(stack, region).await?;
        wait_commit(stack, &new).await?;
        new_primary = Some(new);
    }
    let recover = cut.elapsed();
    tokio::time::sleep(HOLD_DOWN).await;
    let rejoin = heal(dir).await?;
    // Its own readiness, not the edge's view: a server's crash recovery can outlast a short
    // load, and the edge stops probing with the load.
    let ingest = format!("127.0.0.1:{}", r.ingest);
    wait_for(
        "the region's ingest to be ready again",
        RECOVER_WITHIN,
        || servers::http_status(&ingest, "/readyz") == Some(200),
    )
    .await?;
    // While the load runs, its edge routes the region's voters home again: give it a moment.
    let _ = wait_for("the edge to see the region again", EDGE_NOTICES, || {
        live.routes_to(region)
    })
    .await;
    Ok(Timings {
        detect,
        recover,
        rejoin,
        new_primary,
    })
}

/// Until `tally replication` names a primary other than `old`.
async fn wait_new_primary(stack: &Stack, old: &str) -> anyhow::Result<String> {
    let started = Instant::now();
    while started.elapsed() < RECOVER_WITHIN {
        let view = load::get_json(stack.replication, "/status").await.ok();
        if let Some(p) = view.as_ref().and_then(|v| v["primary"].as_str()) {
            if p != old {
                return Ok(p.to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("tally replication chose no new primary within {RECOVER_WITHIN:?}")
}

/// Until the aggregators commit on the new primary: votes are counted again.
async fn wait_commit(stack: &Stack, new: &str) -> anyhow::Result<()> {
    let writer = stack.primary_url();
    let committed = || async {
        let c = db::connect(&writer).await.ok()?;
        let row = c
            .query_one("SELECT COALESCE(sum(count), 0)::int8 FROM tallies", &[])
            .await
            .ok()?;
        Some(row.get::<_, i64>(0))
    };
    let started = Instant::now();
    let mut first = None;
    loop {
        if started.elapsed() > RECOVER_WITHIN {
            bail!("no commit on the new primary {new} within {RECOVER_WITHIN:?}");
        }
        if let Some(n) = committed().await {
            match first {
                None => first = Some(n),
                Some(f) if n > f => return Ok(()),
                Some(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let cut = Instant::now();
    servers::signal(pid, "KILL");
    let new = wait_new_primary(stack, old).await?;
    let detect = cut.elapsed();
    // Votes flow again once the aggregators commit on the new primary.
    wait_commit(stack, &new).await?;
    let recover = cut.elapsed();
    let rejoin = heal(dir).await?;
    Ok(Timings {
        detect,
        recover,
        rejoin,
        new_primary: Some(new),
    })
}

/// kill -9 of one process at random instants, each time started again by `tally local up`.
/// Recovery is the longest any kill kept it away.
async fn kill_role(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    role: &str,
    times: u32,
) -> anyhow::Result<Timings> {
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for _ in 0..times {
        let pause = rand::random_range(100..900);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let pid = stack
            .role_pid(region, role)
            .filter(|&p| servers::pid_alive(p))
            .with_context(|| format!("{region} {role} is not running"))?;
        let cut = Instant::now();
        servers::signal(pid, "KILL");
        wait_for("the process to die", RECOVER_WITHIN, || {
            !servers::pid_alive(pid)
        })
        .await?;
        heal(dir).await?;
        worst = worst.max(cut.elapsed());
    }
    Ok(Timings {
        detect: Duration::ZERO,
        recover: worst,
        rejoin: started.elapsed(),
        new_primary: None,
    })
}

/// A region's first Redis shard killed (or shut down cleanly), held down, started again; its
/// ingest answers 503 for that shard meanwhile. Recovery: until the region's ingest is ready.
async fn redis_down(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    kill: bool,
) -> anyhow::Result<Timings> {
    let r = stack.region(region)?;
    anyhow::ensure!(!r.redis.is_empty(), "the region has no Redis shard");
    // The replica first, so the sentinels have nothing to promote: the whole shard is down.
    let primary = stack.shard_primary(r, 0);
    let mut servers = stack.shard_servers(r, 0, servers::Fsync::Everysec);
    servers.sort_by_key(|s| s.port == primary);
    let ingest = format!("127.0.0.1:{}", r.ingest);
    let cut = Instant::now();
    if kill {
        for server in &servers {
            server.kill();
        }
    } else {
        tokio::task::spawn_blocking(move || servers.iter().try_for_each(|server| server.stop()))
            .await??;
    }
    wait_for("ingest to report its shard down", RECOVER_WITHIN, || {
        servers::http_status(&ingest, "/readyz") != Some(200)
    })
    .await?;
    let detect = cut.elapsed();
    tokio::time::sleep(HOLD_BROKEN).await;
    let rejoin = heal(dir).await?;
    wait_for("ingest to be ready again", RECOVER_WITHIN, || {
        servers::http_status(&ingest, "/readyz") == Some(200)
    })
    .await?;
    Ok(Timings {
        detect,
        recover: cut.elapsed(),
        rejoin,
        new_primary: None,
    })
}

/// kill -9 of the primary of the region's first shard under load. Detected: the sentinels name
/// its replica. Recovered: votes reach the new primary's queue. Brought back: the old primary
/// started again and following the new one as its replica.
async fn redis_failover(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
) -> anyhow::Result<Timings> {
    let r = stack.region(region)?;
    if stack.sentinels.is_empty() || r.redis_replicas.is_empty() {
        bail!(
            "the stack in {} predates Redis replicas; `tally local down`, remove the directory and \
             `tally local up` to make one with them",
            stack.dir.display()
        );
    }
    let old = stack.shard_primary(r, 0);
    let server = stack
        .shard_servers(r, 0, servers::Fsync::Everysec)
        .into_iter()
        .find(|s| s.port == old)
        .context("the shard's primary is not one of its servers")?;
    wait_for("the shard's replica to be in sync", RECOVER_WITHIN, || {
        servers::replicas_in_sync(old, 1 << 20) > 0
    })
    .await?;
    let cut = Instant::now();
    server.kill();
    wait_for(
        "the sentinels to promote the replica",
        RECOVER_WITHIN,
        || stack.shard_primary(r, 0) != old,
    )
    .await?;
    let promoted = stack.shard_primary(r, 0);
    let detect = cut.elapsed();
    let new_primary = Stack::redis_url(promoted);
    let mut queue = harness::redis_connection(&new_primary).await?;
    let first = queue_end(&mut queue).await?;
    let start = Instant::now();
    while queue_end(&mut queue).await? <= first {
        if start.elapsed() > RECOVER_WITHIN {
            bail!("no vote reached the new primary {new_primary} within {RECOVER_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover = cut.elapsed();
    let rejoin_started = Instant::now();
    heal(dir).await?;
    wait_for(
        "the old primary to follow the new one",
        RECOVER_WITHIN,
        || servers::replicas_in_sync(promoted, 1 << 20) > 0,
    )
    .await?;
    Ok(Timings {
        detect,
        recover,
        rejoin: rejoin_started.elapsed(),
        new_primary: Some(new_primary),
    })
}

/// The position of the queue's last element: every vote ever stored on the shard, moved or not.
async fn queue_end(con: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<i64> {
    let (moved, waiting): (Option<i64>, i64) = redis::pipe()
        .cmd("GET")
        .arg(model::queue::MOVED)
        .cmd("LLEN")
        .arg(model::queue::VOTES)
        .query_async(con)
        .await?;
    Ok(moved.unwrap_or(0) + waiting)
}

/// kill -9 of one of the region's aggregators while it holds votes in flight, not restarted.
/// A region running one gets a second for the drill. Detected: its lease expired. Recovered:
/// none of its in-flight lists is left, each adopted by another worker and counted.
async fn aggregator_lost(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
) -> anyhow::Result<Timings> {
    let mut stack = stack.clone();
    let added = stack.region(region)?.aggregators() < 2;
    if added {
        let dir = dir.to_path_buf();
        let region = region.to_string();
        stack = tokio::task::spawn_blocking(move || local::add_aggregator(&dir, &region)).await??;
    }
    let r = stack.region(region)?.clone();
    let k = r.aggregators() - 1;
    let name = local::aggregator_name(k);
    let worker = format!("{region}-{k}");
    let pid = stack
        .role_pid(region, &name)
        .filter(|&p| servers::pid_alive(p))
        .with_context(|| format!("{region} {name} is not running"))?;
    let mut shards = Vec::new();
    for url in stack.primary_redis_urls(&r) {
        shards.push(harness::redis_connection(&url).await?);
    }
    // Stopped until it holds something in flight, so its death strands votes.
    let start = Instant::now();
    let stranded = loop {
        servers::signal(pid, "STOP");
        let held = in_flight_lists(&mut shards, &worker).await?;
        if held > 0 {
            break held;
        }
        servers::signal(pid, "CONT");
        if start.elapsed() > RECOVER_WITHIN {
            bail!("{worker} took no votes within {RECOVER_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    };
    let cut = Instant::now();
    servers::signal(pid, "KILL");
    wait_for("the aggregator to die", RECOVER_WITHIN, || {
        !servers::pid_alive(pid)
    })
    .await?;
    let lease = model::queue::lease_key(&worker);
    loop {
        let mut held = false;
        for con in &mut shards {
            held |= redis::cmd("EXISTS")
                .arg(&lease)
                .query_async::<bool>(con)
                .await?;
        }
        if !held {
            break;
        }
        if cut.elapsed() > RECOVER_WITHIN {
            bail!("{worker}'s lease did not expire within {RECOVER_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detect = cut.elapsed();
    while in_flight_lists(&mut shards, &worker).await? > 0 {
        if cut.elapsed() > RECOVER_WITHIN {
            bail!(
                "{worker}'s {stranded} in-flight lists were not adopted within {RECOVER_WITHIN:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover = cut.elapsed();
    tracing::info!(
        worker,
        stranded,
        "the lost aggregator's in-flight lists were adopted"
    );
    let rejoin_started = Instant::now();
    if added {
        // The worker the drill added is not brought back: the stack is as it was.
        let dir = dir.to_path_buf();
        let region = region.to_string();
        tokio::task::spawn_blocking(move || local::remove_aggregator(&dir, &region)).await??;
    } else {
        heal(dir).await?;
    }
    Ok(Timings {
        detect,
        recover,
        rejoin: rejoin_started.elapsed(),
        new_primary: None,
    })
}

/// `worker`'s in-flight lists on the shards.
async fn in_flight_lists(
    shards: &mut [redis::aio::MultiplexedConnection],
    worker: &str,
) -> anyhow::Result<usize> {
    let mut n = 0;
    for con in shards {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(model::queue::in_flight_pattern(worker))
            .query_async(con)
            .await?;
        n += keys.len();
    }
    Ok(n)
}

/// Is the region's server a replica streaming from the primary?
async fn streaming(stack: &Stack, r: &local::RegionPorts) -> bool {
    match db::connect(&stack.server_url(r)).await {
        Ok(c) => db::freshness(&c)
            .await
            .is_ok_and(|f| !f.in_recovery || f.streaming),
        Err(_) => false,
    }
}

async fn wait_streaming(stack: &Stack, r: &local::RegionPorts) -> anyhow::Result<()> {
    let start = Instant::now();
    while !streaming(stack, r).await {
        if start.elapsed() > RECOVER_WITHIN {
            bail!("{} did not stream again within {RECOVER_WITHIN:?}", r.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A replica's server stopped, held down, started; recovery: until it streams again.
async fn replica_stop(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
) -> anyhow::Result<Timings> {
    let r = stack.region(region)?;
    if stack.primary().name == region {
        bail!("{region} holds the primary; replica-stop needs a replica");
    }
    let server = stack.postgres(&servers::PgBin::find()?, r);
    let cut = Instant::now();
    tokio::task::spawn_blocking(move || server.stop(servers::StopMode::Fast)).await??;
    tokio::time::sleep(HOLD_BROKEN).await;
    let rejoin = heal(dir).await?;
    wait_streaming(stack, r).await?;
    Ok(Timings {
        detect: Duration::ZERO,
        recover: cut.elapsed(),
        rejoin,
        new_primary: None,
    })
}

/// Every link to and from the region cut through `tally wan`, held, healed; recovery: until
/// every replica streams again.
async fn region_cut(stack: &Stack, region: &str) -> anyhow::Result<Timings> {
    if stack.links.is_empty() {
        bail!("this stack has no links between regions to cut (it predates them)");
    }
    let cut = Instant::now();
    wan_control(stack, "cut", region)?;
    tokio::time::sleep(HOLD_BROKEN).await;
    let healed = Instant::now();
    wan_control(stack, "heal", region)?;
    for r in &stack.regions {
        wait_streaming(stack, r).await?;
    }
    Ok(Timings {
        detect: Duration::ZERO,
        recover: cut.elapsed(),
        rejoin: healed.elapsed(),
        new_primary: None,
    })
}

/// The region's ingest restarted with a skewed clock, left to run, then restarted with the right
/// time. Within ingest's bound on clock offset it takes votes; past it, it refuses them and is not
/// ready, and its voters are served elsewhere.
async fn clock_skew(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    ms: i64,
    live: &Arc<Live>,
) -> anyhow::Result<Timings> {
    let cut = Instant::now();
    let within = skewed_ingest(stack, region, ms).await?;
    let detect = cut.elapsed();
    if !within {
        let before = live.acked_from(region);
        wait_for(
            "the skewed region's voters to be acknowledged elsewhere",
            RECOVER_WITHIN,
            || live.acked_from(region) > before,
        )
        .await?;
    }
    let recover = cut.elapsed();
    tokio::time::sleep(HOLD_BROKEN).await;
    let restarted = Instant::now();
    {
        let (stack, name) = (stack.clone(), region.to_string());
        tokio::task::spawn_blocking(move || local::stop_role(&stack, &name, "ingest")).await?;
    }
    heal(dir).await?;
    Ok(Timings {
        detect,
        recover,
        rejoin: restarted.elapsed(),
        new_primary: None,
    })
}

/// Restarts the region's ingest with its clock `ms` off; returns whether that is within its
/// bound (it became ready) or past it (it refuses votes and never becomes ready).
async fn skewed_ingest(stack: &Stack, region: &str, ms: i64) -> anyhow::Result<bool> {
    let r = stack.region(region)?.clone();
    let within = ms.unsigned_abs() < ingest::config::DEFAULT_MAX_CLOCK_OFFSET.as_millis() as u64;
    let (stack, r) = (stack.clone(), r.clone());
    tokio::task::spawn_blocking(move || {
        local::stop_role(&stack, &r.name, "ingest");
        local::start_role_with(
            &stack,
            &r,
            "ingest",
            vec![(ingest::config::ENV_DRILL_CLOCK_SKEW_MS, ms.to_string())],
        )?;
        if within {
            local::wait_ready(&stack, &r.name, "ingest", r.ingest)
        } else {
            local::wait_running(&stack, &r.name, "ingest", r.ingest)
        }
    })
    .await??;
    Ok(within)
}

/// Until the load's poll of the night is `before` away from its close (by this host's clock).
async fn until_close(live: &Arc<Live>, before: Duration) -> anyhow::Result<()> {
    wait_for("the load's poll to be created", RECOVER_WITHIN, || {
        live.show_closes_at.get().is_some()
    })
    .await?;
    let closes = live.show_closes_at.get().expect("set").0;
    let at = closes.saturating_sub(before.as_micros() as u64);
    let now = model::Stamp::now().0;
    if at > now {
        tokio::time::sleep(Duration::from_micros(at - now)).await;
    }
    Ok(())
}

/// The region cut off a second before the close, healed three seconds after it.
async fn close_cut(stack: &Stack, region: &str, live: &Arc<Live>) -> anyhow::Result<Timings> {
    if stack.links.is_empty() {
        bail!("this stack has no links between regions to cut (it predates them)");
    }
    until_close(live, Duration::from_secs(1)).await?;
    let cut = Instant::now();
    wan_control(stack, "cut", region)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let healed = Instant::now();
    wan_control(stack, "heal", region)?;
    for r in &stack.regions {
        wait_streaming(stack, r).await?;
    }
    Ok(Timings {
        detect: Duration::ZERO,
        recover: cut.elapsed(),
        rejoin: healed.elapsed(),
        new_primary: None,
    })
}

/// The region's ingest `ms` off two seconds before the close, put right three after it.
async fn close_skew(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    ms: i64,
    live: &Arc<Live>,
) -> anyhow::Result<Timings> {
    until_close(live, Duration::from_secs(2)).await?;
    let cut = Instant::now();
    skewed_ingest(stack, region, ms).await?;
    let recover = cut.elapsed();
    until_close(live, Duration::ZERO).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    {
        let (stack, name) = (stack.clone(), region.to_string());
        tokio::task::spawn_blocking(move || local::stop_role(&stack, &name, "ingest")).await?;
    }
    heal(dir).await?;
    Ok(Timings {
        detect: Duration::ZERO,
        recover,
        rejoin: restarted.elapsed(),
        new_primary: None,
    })
}

/// The region's aggregator killed at random instants from two seconds before the close to six
/// after, restarted each time.
async fn close_kill_aggregator(
    stack: &Stack,
    dir: &std::path::Path,
    region: &str,
    times: u32,
    live: &Arc<Live>,
) -> anyhow::Result<Timings> {
    until_close(live, Duration::from_secs(2)).await?;
    let started = Instant::now();
    let spread = Duration::from_secs(8) / times.max(1);
    let mut worst = Duration::ZERO;
    for _ in 0..times {
        let pause = rand::random_range(0..spread.as_millis().max(1) as u64);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let pid = stack
            .role_pid(region, "aggregator")
            .filter(|&p| servers::pid_alive(p))
            .with_context(|| format!("{region} aggregator is not running"))?;
        let cut = Instant::now();
        servers::signal(pid, "KILL");
        wait_for("the aggregator to die", RECOVER_WITHIN, || {
            !servers::pid_alive(pid)
        })
        .await?;
        heal(dir).await?;
        worst = worst.max(cut.elapsed());
    }
    Ok(Timings {
        detect: Duration::ZERO,
        recover: worst,
        rejoin: started.elapsed(),
        new_primary: None,
    })
}

fn wan_control(stack: &Stack, action: &str, region: &str) -> anyhow::Result<()> {
    let wan = format!("127.0.0.1:{}", stack.wan);
    match servers::http_call(&wan, "POST", &format!("/{action}?region={region}")) {
        Some(200) => Ok(()),
        other => Err(anyhow::anyhow!(
            "tally wan did not {action} {region} (answer {other:?})"
        )),
    }
}

/// `tally local up` again: restarts what is down, and rewinds a fenced former primary into a
/// replica of the new one.
async fn heal(dir: &std::path::Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || local::up(&dir, &local::UpOptions::default()))
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
    let o = &report.outcome;
    println!("  detected in      {:.2} s", o.detect_seconds);
    println!("  recovered in     {:.2} s", o.recovery_seconds);
    println!("  brought back in  {:.2} s", report.rejoin_seconds);
    println!(
        "  votes            {} acknowledged, {} counted, {} lost, {} doubled",
        o.acknowledged, o.counted, o.lost, o.doubled
    );
    println!(
        "  errors seen      {} (not 202; none of them acknowledged)",
        o.errors_seen
    );
}
