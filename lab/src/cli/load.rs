//! `tally local`, `tally load` and `tally demo`: the local stack, a load against it, and both
//! together with the report.

use std::path::{Path, PathBuf};

use super::{DirArg, LocalCmd};
use crate::{load, local, report};

#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Votes per second, all regions together (open loop: sent on schedule, answered or not).
    #[arg(long, default_value_t = 2_000.0)]
    rate: f64,
    /// How long to send votes.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// How the offered rate moves: `steady`; `ramp` (nothing to twice the mean); `surge` (the
    /// first tenth at 4x the mean, as when lines open); `show` (a 3.5x surge, a steady middle, a
    /// rush building to the close). `--rate` is the mean. Default: steady (`show` to rehearse).
    #[arg(long, value_enum)]
    shape: Option<::bench::load::Shape>,
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
    /// Also vote in a poll of the night of its own, closing at four fifths of the load, and wait
    /// for its certified result (the demo always does).
    #[arg(long)]
    show: bool,
}

impl LoadArgs {
    fn options(&self) -> load::Options {
        let duration = std::time::Duration::from_secs(self.seconds);
        load::Options {
            rate: self.rate,
            duration,
            voters: self.voters,
            connections_per_region: self.connections,
            shape: self.shape.unwrap_or_default(),
            progress: true,
            show: self.show.then(|| load::Show::for_load(duration)),
        }
    }
}

/// Saves the JSON and HTML reports (under `reports`, unless `--report` says where), then prints
/// the summary (or the whole report as JSON).
fn print_report(
    report: &report::Report,
    args: &LoadArgs,
    reports: &Path,
    remote: bool,
) -> anyhow::Result<()> {
    let dir = args.report.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        reports.join(format!("load-{}", now.as_secs()))
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
            match (r.results_match_primary, remote) {
                (true, false) => "same as the primary",
                (false, false) => "DIFFERENT from the primary",
                (true, true) => "as acknowledged",
                (false, true) => "NOT as acknowledged",
            }
        );
    }
    println!(
        "{} {:.1}s after the last vote",
        if remote {
            "readers settled"
        } else {
            "queues drained"
        },
        report.drained_in_seconds
    );
    for (region, f) in &report.freshness_ms {
        println!(
            "  {region:<15} votes showed in its results {:.0} ms after their 202 (p50), {:.0} ms (p99), {:.0} ms (max){}",
            f.p50,
            f.p99,
            f.max,
            if f.unseen > 0 {
                format!("; {} canaries never showed", f.unseen)
            } else {
                String::new()
            }
        );
    }
    for p in &report.pushback {
        println!(
            "  pushback: {} answers {} in {} seconds, from {:.0} s to {:.0} s",
            p.answers, p.status, p.seconds, p.first_s, p.last_s
        );
    }
    if let Some(s) = &report.show {
        println!(
            "poll {} closed and was certified final {:.1} s later: {} (digest {}){}",
            s.poll,
            s.final_seconds,
            s.certified
                .iter()
                .map(|(o, n)| format!("{o} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            s.digest,
            if s.counts_match_acknowledged && s.audit_matches {
                ""
            } else {
                "; it DOES NOT MATCH what was acknowledged"
            }
        );
    }
    println!("report: {} (and report.json beside it)", page.display());
    Ok(())
}

/// A load that lost or doubled a vote, or whose poll of the night was certified other than as
/// acknowledged, fails the command.
pub fn check(report: &report::Report) -> anyhow::Result<()> {
    anyhow::ensure!(
        report.lost == 0 && report.doubled == 0,
        "{} votes lost, {} doubled",
        report.lost,
        report.doubled
    );
    if let Some(s) = &report.show {
        anyhow::ensure!(
            s.counts_match_acknowledged && s.audit_matches && s.acknowledged_after_close == 0,
            "poll {} was certified {:?} but {:?} was acknowledged (audit matches: {}; {} acknowledged after the close)",
            s.poll,
            s.certified,
            s.acknowledged,
            s.audit_matches,
            s.acknowledged_after_close
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
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
    /// Aggregators per region, draining its shards together (each adopts what another left
    /// when that one is gone). Kept for later runs; default: the stack's (1 when new).
    #[arg(long, env = "TALLY_AGGREGATORS", value_parser = clap::value_parser!(u16).range(1..=8))]
    aggregators: Option<u16>,
}

impl UpArgs {
    fn options(&self) -> local::UpOptions {
        local::UpOptions {
            fsync: self.redis_fsync,
            wan_ms: self.wan_ms,
            aggregators: self.aggregators.map(usize::from),
        }
    }
}

/// `tally local up|status|down`.
pub fn local(command: LocalCmd) -> anyhow::Result<()> {
    match command {
        LocalCmd::Up(args) => {
            let stack = local::up(&args.dir.path(), &args.options())?;
            local::print_status(&local::status(&stack.dir)?);
        }
        LocalCmd::Status {
            dir,
            json,
            target_file,
        } => {
            let status = local::status(&dir.path())?;
            if let Some(path) = target_file {
                let stack = local::Stack::require(&dir.path())?;
                crate::target::for_stack(&stack)?.save(&path)?;
                eprintln!("target file: {}", path.display());
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                local::print_status(&status);
            }
        }
        LocalCmd::Down(dir) => {
            local::down(&dir.path())?;
            println!("local stack in {} stopped", dir.path().display());
        }
        LocalCmd::Token { dir, voter, ttl } => {
            model::VoterId::validate(&voter)
                .map_err(|e| super::BadArgs(format!("--voter: {e}")))?;
            let stack = local::Stack::require(&dir.path())?;
            let key = crate::idp::signing_key(&stack.idp_dir())?;
            println!("{}", key.token(&voter, ttl));
        }
    }
    Ok(())
}

/// `tally load`: against the running local stack.
pub fn load(dir: &DirArg, args: &LoadArgs) -> anyhow::Result<()> {
    let stack = local::Stack::require(&dir.path())?;
    let report = super::runtime()?.block_on(load::run(&stack, &args.options()))?;
    print_report(&report, args, &stack.dir.join("reports"), false)?;
    check(&report)
}

/// `tally load --target` and `tally rehearse`: against whatever the file names. A rehearsal
/// votes in a poll of its own, closing as the load ends, in the `show` shape unless told.
pub fn load_target(file: &Path, args: &LoadArgs, rehearse: bool) -> anyhow::Result<()> {
    let target =
        crate::target::TargetFile::load(file).map_err(|e| super::BadArgs(e.to_string()))?;
    let mut options = args.options();
    if (rehearse || args.show) && target.polls.admin_url.is_none() {
        return Err(super::BadArgs(format!(
            "{}: a poll that closes needs [polls] admin_url to be made and closed",
            file.display()
        ))
        .into());
    }
    if rehearse {
        options.show = Some(crate::rehearsal::show_for(options.duration));
        if args.shape.is_none() {
            options.shape = ::bench::load::Shape::Show;
        }
    }
    let report = super::runtime()?.block_on(crate::rehearsal::run(&target, &options))?;
    let reports = std::env::current_dir()?.join("reports");
    print_report(&report, args, &reports, true)?;
    check(&report)
}

/// `tally demo`: the stack up, a load, the report; the stack stopped unless `keep`.
pub fn demo(up: &UpArgs, args: &LoadArgs, keep: bool) -> anyhow::Result<()> {
    let dir = up.dir.path();
    eprintln!("starting three regions in {} ...", dir.display());
    let stack = local::up(&dir, &up.options())?;
    let mut options = args.options();
    // The demo ends as the night does: a poll closed, and its result certified.
    options.show = Some(load::Show::for_load(options.duration));
    let report = match super::runtime()?.block_on(load::run(&stack, &options)) {
        Ok(r) => r,
        Err(e) => {
            if !keep {
                local::down(&dir)?;
            }
            return Err(e);
        }
    };
    print_report(&report, args, &stack.dir.join("reports"), false)?;
    if keep {
        if !args.json {
            println!("live results pages:");
            for r in &stack.regions {
                println!(
                    "  {:<15} http://127.0.0.1:{}/?poll=default",
                    r.name, r.reader
                );
            }
        }
        eprintln!(
            "the stack keeps running; stop it with `tally local down --dir {}`",
            dir.display()
        );
    } else {
        local::down(&dir)?;
        if !args.json {
            println!("the stack is stopped; `tally demo --keep` leaves it and its live results pages running");
        }
    }
    check(&report)
}
