//! `tally load`: simulated voters around the world, each sent where Route53's answer for their
//! continent says (the local edge), at a fixed arrival rate (open loop); live progress; then a
//! check, against PostgreSQL and every region's reader, that every acknowledged vote was counted
//! exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bench::load::{open_loop, MakeRequest, Sample, Schedule};
use bytes::Bytes;
use http_body_util::Full;
use std::net::SocketAddr;

use crate::edge::Edge;
use crate::freshness;
use crate::local::{slot_name, Stack, POLLS};
use crate::report::{RegionRecorder, RegionReport, Report, Series, ShowReport, Timeline};
use regions::VOTER_MIX;

/// The polls a load votes in: (id, options, share of the votes).
pub type Polls = [(&'static str, Vec<&'static str>, f64)];

/// The `h`-th pick of a poll and an option, by popularity (`h` is a uniform hash).
fn pick_vote(polls: &'static Polls, h: u64) -> (&'static str, &'static str) {
    let mut x = (h % 1_000_000) as f64 / 1_000_000.0;
    let (poll, options, _) = polls
        .iter()
        .find(|(_, _, share)| {
            x -= share;
            x < 0.0
        })
        .unwrap_or(&polls[0]);
    let weights: Vec<f64> = (1..=options.len()).map(|i| 1.0 / i as f64).collect();
    let mut y = ((h >> 20) % 1_000_000) as f64 / 1_000_000.0 * weights.iter().sum::<f64>();
    let i = weights
        .iter()
        .position(|w| {
            y -= w;
            y < 0.0
        })
        .unwrap_or(0);
    (poll, options[i])
}

#[derive(Debug, Clone)]
pub struct Options {
    pub rate: f64,
    pub duration: Duration,
    /// Distinct voters; with fewer voters than votes, some vote again (and may change their mind).
    pub voters: u64,
    pub connections_per_region: usize,
    /// How the offered rate moves over the run; `rate` is its mean.
    pub shape: bench::load::Shape,
    pub progress: bool,
    /// A poll of the night voted in alongside the stack's: created with its close, closed while
    /// votes still come, then waited for until it is certified final.
    pub show: Option<Show>,
}

/// A poll with a window the load creates and votes in.
#[derive(Debug, Clone)]
pub struct Show {
    pub poll: String,
    pub options: Vec<String>,
    /// Its share of the votes.
    pub share: f64,
    /// How long after the load starts it closes.
    pub closes_after: Duration,
    /// How long to wait for it to be certified final once the load has drained.
    pub final_within: Duration,
}

impl Show {
    /// A poll of its own for one run: `show-<tag>`, red, green and blue, half the votes, closing
    /// at four fifths of the load (the votes after it get 409).
    pub fn for_load(duration: Duration) -> Self {
        Self {
            poll: format!("show-{:06x}", rand::random::<u32>() & 0xff_ffff),
            options: vec!["red".into(), "green".into(), "blue".into()],
            share: 0.5,
            closes_after: duration.mul_f64(0.8),
            final_within: Duration::from_secs(60),
        }
    }
}

/// Latest acknowledged vote per voter (`poll/voter`: its id and option), and how many votes
/// were acknowledged.
#[derive(Default)]
pub struct Acks {
    pub latest: HashMap<String, (u128, &'static str)>,
    pub count: u64,
    /// Voters (`poll/voter`) one of whose votes has an unknown outcome (no answer, or a 5xx):
    /// each may be counted one vote other than their latest acknowledged one says.
    pub uncertain: std::collections::HashSet<String>,
}

/// The polls voted in: the stack's, and the show's, sharing the votes.
pub fn polls(show: Option<&Show>) -> &'static Polls {
    let mut all: Vec<(&'static str, Vec<&'static str>, f64)> = POLLS
        .iter()
        .map(|(id, options, share)| (*id, options.to_vec(), *share))
        .collect();
    if let Some(s) = show {
        for p in &mut all {
            p.2 *= 1.0 - s.share;
        }
        // One poll a run: leaked, as the rest are static.
        let id: &'static str = Box::leak(s.poll.clone().into_boxed_str());
        let options = s
            .options
            .iter()
            .map(|o| &*Box::leak(o.clone().into_boxed_str()))
            .collect();
        all.insert(0, (id, options, s.share));
    }
    Box::leak(all.into_boxed_slice())
}

/// What a load has done so far, for whoever watches it run (progress, drills).
pub struct Live {
    /// The local edge the voters go through; none against a target, whose DNS routes them.
    pub edge: Option<Arc<Edge>>,
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    /// Acknowledged votes per home region (the region voters go to while all are healthy).
    pub by_home: Vec<(String, AtomicU64)>,
    /// When the load's poll of the night closes, once it is created.
    pub show_closes_at: std::sync::OnceLock<model::Stamp>,
    /// False while a drill's fault is under way: the load's checks, which need every part,
    /// wait for it (a region's servers may take longer to come back than the load to end).
    pub settled: tokio::sync::watch::Sender<bool>,
}

impl Live {
    pub fn new(stack: &Stack, topology: regions::Topology) -> anyhow::Result<Arc<Self>> {
        let mut live = Self::regions(stack.regions.iter().map(|r| r.name.clone()));
        live.edge = Some(Edge::new(stack, topology)?);
        Ok(Arc::new(live))
    }

    /// For voters of these regions, reached without the local edge.
    pub fn regions(names: impl IntoIterator<Item = String>) -> Self {
        Live {
            edge: None,
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            by_home: names.into_iter().map(|r| (r, AtomicU64::new(0))).collect(),
            show_closes_at: std::sync::OnceLock::new(),
            settled: tokio::sync::watch::channel(true).0,
        }
    }

    /// Does the edge send voters to `region` (always, without an edge)?
    pub fn routes_to(&self, region: &str) -> bool {
        self.edge.as_ref().is_none_or(|e| e.healthy(region))
    }

    pub fn acked_from(&self, home: &str) -> u64 {
        self.by_home
            .iter()
            .find(|(r, _)| r == home)
            .map_or(0, |(_, n)| n.load(Ordering::Relaxed))
    }
}

pub async fn run(stack: &Stack, opts: &Options) -> anyhow::Result<Report> {
    run_with(
        stack,
        opts,
        Live::new(stack, regions::Topology::standard())?,
    )
    .await
}

pub async fn run_with(stack: &Stack, opts: &Options, live: Arc<Live>) -> anyhow::Result<Report> {
    let run_tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let started = Instant::now();
    let edge = live
        .edge
        .clone()
        .context("a load on the local stack routes through its edge")?;
    let (stop_edge, edge_stopped) = tokio::sync::watch::channel(false);
    let edge_task = tokio::spawn(edge.clone().watch(edge_stopped));
    let (stop_sampling, sampling_stopped) = tokio::sync::oneshot::channel();
    let sampler = tokio::spawn(sample_every_second(
        stack.clone(),
        started,
        sampling_stopped,
    ));

    // Every simulated voter votes as a real one does: with a token of the identity provider.
    let tokens = Arc::new(stack.tokens()?);
    let bearer: Bearer = Arc::new(move |voter| tokens.bearer(voter));
    let polls = polls(opts.show.as_ref());
    let mut admin = db::connect(&stack.primary_url()).await?;
    if let Some(s) = &opts.show {
        open_show(&mut admin, s).await?;
    }
    let links = |port: fn(&crate::local::RegionPorts) -> u16| -> Vec<freshness::RegionLink> {
        stack
            .regions
            .iter()
            .map(|r| freshness::RegionLink {
                name: r.name.clone(),
                endpoint: SocketAddr::from(([127, 0, 0, 1], port(r))).into(),
                authority: "localhost".into(),
            })
            .collect()
    };
    let (ingests, readers) = (links(|r| r.ingest), links(|r| r.reader));
    if let Some(s) = &opts.show {
        wait_known(&ingests, &s.poll, &bearer).await?;
    }
    let canary_poll = format!("canary-{run_tag}");
    create_canary_poll(&mut admin, &canary_poll).await?;
    wait_known(&ingests, &canary_poll, &bearer).await?;
    // Freshness is measured, not checked: a reader still coming back from an earlier drill
    // costs this load its figure, not its exactly-once check.
    let probe = freshness::Probe::start(
        readers,
        ingests.clone(),
        canary_poll,
        format!("{run_tag}-canary"),
        bearer.clone(),
    )
    .await
    .inspect_err(|e| tracing::warn!(error = %e, "freshness not measured"))
    .ok();
    let show = match &opts.show {
        Some(s) => {
            let closes_at = start_show_clock(&mut admin, s).await?;
            let _ = live.show_closes_at.set(closes_at);
            Some(closes_at)
        }
        None => None,
    };
    let lanes = stack
        .regions
        .iter()
        .filter_map(|r| {
            // The continents whose voters this region serves while every region is healthy.
            // They share one failover chain, so one route serves them all.
            let continents: Vec<(&'static str, f64)> = VOTER_MIX
                .iter()
                .filter(|(c, _)| edge.home_region(c) == r.name)
                .map(|(c, share)| (*c, *share))
                .collect();
            let share: f64 = continents.iter().map(|(_, s)| s).sum();
            let route: bench::load::Route = {
                let (edge, continent) = (edge.clone(), continents.first()?.0);
                Arc::new(move || edge.route(continent).into())
            };
            Some(Lane {
                region: r.name.clone(),
                route,
                share,
                continents,
                authority: "localhost".into(),
            })
        })
        .collect();
    let show_close = show.map(|c| (polls[0].0, c.0 as u128));
    let sent = send_votes(lanes, polls, bearer, opts, &live, &run_tag, show_close).await;
    let _ = stop_edge.send(true);
    let _ = edge_task.await;
    let sent = sent?;
    let freshness_ms = match probe {
        Some(p) => p.finish(Duration::from_secs(5)).await,
        None => Default::default(),
    };
    let summary = sent.outcome.summary();

    let _ = live.settled.subscribe().wait_for(|settled| *settled).await;
    let drain_started = Instant::now();
    wait_drained(stack, Duration::from_secs(120)).await?;
    let drained_in = drain_started.elapsed();
    let _ = stop_sampling.send(());
    let timeline = sampler.await?;
    let acks = &sent.acks;
    let show = match (show, &opts.show) {
        (Some(closes_at), Some(s)) => {
            let mut report = certified(stack, s, closes_at, acks, &summary.statuses).await?;
            report.acknowledged_after_close = sent.after_close;
            Some(report)
        }
        _ => None,
    };
    let (lost, doubled) = verify(stack, &run_tag, acks).await?;
    let regions = compare_readers(stack, &live, polls).await?;
    let route_changes = edge.changes.lock().expect("changes").clone();
    Ok(sent.report(
        opts,
        timeline,
        Checked {
            lost,
            doubled,
            regions,
            drained_in_seconds: drained_in.as_secs_f64(),
            route_changes,
            freshness_ms,
            show,
        },
    ))
}

/// What a load's checks found.
pub struct Checked {
    pub lost: u64,
    pub doubled: u64,
    pub regions: Vec<RegionReport>,
    /// From the last vote until the queues drained (the local stack) or the readers settled.
    pub drained_in_seconds: f64,
    pub route_changes: Vec<crate::edge::RouteChange>,
    pub freshness_ms: std::collections::BTreeMap<String, freshness::Freshness>,
    pub show: Option<ShowReport>,
}

impl Sent {
    /// The report: what was sent and answered, each region's lines added to `timeline`, and
    /// what the checks found.
    pub fn report(self, opts: &Options, mut timeline: Timeline, checked: Checked) -> Report {
        let mut pushback = Vec::new();
        for recorder in self.recorders {
            recorder.finish(&mut timeline, &mut pushback);
        }
        let summary = self.outcome.summary();
        let acks = self.acks;
        Report {
            acknowledged: acks.count,
            counted: acks.count.saturating_sub(checked.lost),
            lost: checked.lost,
            doubled: checked.doubled,
            rate_target: opts.rate,
            // Over the window the votes were due in: an open loop's rate is what it sent on
            // schedule.
            rate_achieved: acks.count as f64 / opts.duration.as_secs_f64(),
            shape: opts.shape,
            seconds: self.outcome.elapsed.as_secs_f64(),
            statuses: summary.statuses,
            transport_errors: summary.transport_errors,
            p50_ms: summary.p50_ms,
            p99_ms: summary.p99_ms,
            p999_ms: summary.p999_ms,
            voters: acks.latest.len(),
            freshness_ms: checked.freshness_ms,
            pushback,
            regions: checked.regions,
            drained_in_seconds: checked.drained_in_seconds,
            route_changes: checked.route_changes,
            timeline,
            final_seconds: checked.show.as_ref().map(|s| s.final_seconds),
            show: checked.show,
        }
    }
}

pub use crate::freshness::Bearer;

/// One share of the voters and where it sends its votes.
pub struct Lane {
    /// The region these voters are served by while every region is healthy.
    pub region: String,
    pub route: bench::load::Route,
    /// Of all votes.
    pub share: f64,
    /// Where its voters are, for their ids: (label, share of all votes).
    pub continents: Vec<(&'static str, f64)>,
    /// The `Host` header (a load balancer routes by it).
    pub authority: String,
}

/// What the voters sent and were answered.
pub struct Sent {
    pub outcome: bench::load::Outcome,
    pub acks: Acks,
    pub recorders: Vec<RegionRecorder>,
    /// The show's votes acknowledged with a stamp at or after its close: there must be none.
    pub after_close: u64,
}

/// Every lane's voters, open loop on `opts`' schedule, with live progress. `show_close`, the
/// show's poll and its close: a vote id's high bits are its stamp, and a vote acknowledged at
/// or after the close is counted in [`Sent::after_close`].
pub async fn send_votes(
    lanes: Vec<Lane>,
    polls: &'static Polls,
    bearer: Bearer,
    opts: &Options,
    live: &Arc<Live>,
    run_tag: &str,
    show_close: Option<(&'static str, u128)>,
) -> anyhow::Result<Sent> {
    let started = Instant::now();
    let acks = Arc::new(Mutex::new(Acks::default()));
    let window = Arc::new(Mutex::new(bench::load::histogram()));
    let after_close = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let mut recorders = Vec::new();
    for lane in lanes.into_iter().filter(|l| l.share > 0.0) {
        let home_index = live
            .by_home
            .iter()
            .position(|(r, _)| *r == lane.region)
            .context("a lane of no region")?;
        let (continents, share) = (lane.continents, lane.share);
        let voters_here = ((opts.voters as f64 * share) as u64).max(1);
        let tag = run_tag.to_string();
        // The `n`th vote of this lane: continent by share, voter within it, poll and option by
        // popularity. A voter who votes again in the same poll may change their mind.
        let vote_n = Arc::new(move |n: u64| -> (String, &'static str, &'static str) {
            let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (n >> 7);
            let mut pick = (h % 10_000) as f64 / 10_000.0 * share;
            let continent = continents
                .iter()
                .find(|(_, s)| {
                    pick -= s;
                    pick < 0.0
                })
                .map_or(continents[0].0, |(c, _)| *c);
            let (poll, option) = pick_vote(polls, h.rotate_left(23));
            (
                format!("{tag}-{continent}-{}", (h >> 16) % voters_here),
                poll,
                option,
            )
        });
        let make: MakeRequest = {
            let (vote_n, bearer, authority) = (vote_n.clone(), bearer.clone(), lane.authority);
            Arc::new(move |n| {
                let (voter, poll, option) = vote_n(n);
                hyper::Request::post(format!("/v1/polls/{poll}/votes"))
                    .header("host", &authority)
                    .header("content-type", "application/json")
                    .header("authorization", &*bearer(&voter))
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"option":"{option}"}}"#
                    ))))
                    .expect("a valid request")
            })
        };
        let recorder = Arc::new(Mutex::new(RegionRecorder::new(&lane.region)));
        recorders.push(recorder.clone());
        let (acks, live, window) = (acks.clone(), live.clone(), window.clone());
        let after_close = after_close.clone();
        let on_answer = Arc::new(move |n: u64, s: Sample, body: &[u8]| {
            let _ = window.lock().expect("histogram").record(s.latency_us);
            let id = (s.status == Some(202))
                .then(|| {
                    serde_json::from_slice::<serde_json::Value>(body).ok()?["vote_id"]
                        .as_str()
                        .and_then(parse_uuid)
                })
                .flatten();
            recorder
                .lock()
                .expect("recorder")
                .record(s.due, s.latency_us, s.status, id.is_some());
            let Some(id) = id else {
                live.failed.fetch_add(1, Ordering::Relaxed);
                // No answer, or a 5xx: the vote may have been stored all the same.
                if s.status.is_none_or(|status| status >= 500) {
                    let (voter, poll, _) = vote_n(n);
                    let mut a = acks.lock().expect("acks");
                    a.uncertain.insert(format!("{poll}/{voter}"));
                }
                return;
            };
            live.acked.fetch_add(1, Ordering::Relaxed);
            live.by_home[home_index].1.fetch_add(1, Ordering::Relaxed);
            let mut a = acks.lock().expect("acks");
            a.count += 1;
            let (voter, poll, option) = vote_n(n);
            if show_close.is_some_and(|(p, close)| p == poll && id >> 64 >= close) {
                after_close.fetch_add(1, Ordering::Relaxed);
            }
            let latest = a
                .latest
                .entry(format!("{poll}/{voter}"))
                .or_insert((0, option));
            if id > latest.0 {
                *latest = (id, option);
            }
        });
        let schedule = Schedule::new(opts.shape, opts.rate * share, opts.duration);
        let (route, connections) = (lane.route, opts.connections_per_region);
        tasks.push(tokio::spawn(async move {
            open_loop(route, schedule, connections, make, on_answer).await
        }));
    }

    let progress = {
        let (live, window) = (live.clone(), window.clone());
        let (show, total) = (opts.progress, opts.duration);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = live.acked.load(Ordering::Relaxed);
                let p99 = {
                    let mut h = window.lock().expect("histogram");
                    let p = h.value_at_quantile(0.99) as f64 / 1000.0;
                    h.reset();
                    p
                };
                if show {
                    let done = (started.elapsed().as_secs_f64() / total.as_secs_f64()).min(1.0);
                    let filled = (done * 20.0).round() as usize;
                    eprintln!(
                        "[{}{}] {:>3.0}s {:>7} votes/s acknowledged, {} total, {} errors, p99 {:.1} ms",
                        "#".repeat(filled),
                        ".".repeat(20 - filled),
                        started.elapsed().as_secs_f64(),
                        now - last,
                        now,
                        live.failed.load(Ordering::Relaxed),
                        p99
                    );
                }
                last = now;
            }
        })
    };
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?.0);
    }
    progress.abort();
    let outcome = bench::load::side_by_side(outcomes).context("no region serves any voter")?;
    let recorders = recorders
        .into_iter()
        .map(|r| {
            Arc::try_unwrap(r)
                .ok()
                .map(|r| r.into_inner().expect("recorder"))
                .context("a load task outlived the load")
        })
        .collect::<anyhow::Result<_>>()?;
    let acks = std::mem::take(&mut *acks.lock().expect("acks"));
    Ok(Sent {
        outcome,
        acks,
        recorders,
        after_close: after_close.load(Ordering::Relaxed),
    })
}

/// The canary poll: [`freshness::OPTIONS`] options, no window.
pub async fn create_canary_poll(admin: &mut db::Client, id: &str) -> anyhow::Result<()> {
    let options = freshness::option_names();
    let options: Vec<&str> = options.iter().map(String::as_str).collect();
    db::create_poll(admin, &model::Poll::new(id, &options)?).await?;
    Ok(())
}

/// Until every region's ingest knows `poll`: an option no poll has gets 422 once it does,
/// 404 until then, and is never stored.
pub async fn wait_known(
    ingests: &[freshness::RegionLink],
    poll: &str,
    bearer: &Bearer,
) -> anyhow::Result<()> {
    let probe = format!("/v1/polls/{poll}/votes");
    let bearer = bearer("known-probe");
    let started = Instant::now();
    for r in ingests {
        loop {
            let answer = post(r, &probe, &bearer, r#"{"option":"no-such-option"}"#).await;
            if answer.is_ok_and(|status| status == 422) {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(15),
                "{}'s ingest did not learn of poll {poll} within 15 s",
                r.name,
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Creates the show's poll, its close an hour away until [`start_show_clock`] sets it.
pub async fn open_show(admin: &mut db::Client, show: &Show) -> anyhow::Result<()> {
    let now = db::poll_row(admin, model::DEFAULT_POLL).await?.now;
    let options: Vec<&str> = show.options.iter().map(String::as_str).collect();
    let mut poll = model::Poll::new(&show.poll, &options)?;
    poll.window.closes_at = Some(model::Stamp(now.0 + 3_600_000_000));
    db::create_poll(admin, &poll).await?;
    Ok(())
}

/// Moves the show's close to `closes_after` from now by the primary's clock, as its votes are
/// about to start (setting up a run takes seconds that would otherwise come off the window);
/// returns the close. Ingest learns of it within its catalog refresh, seconds before it comes.
pub async fn start_show_clock(admin: &mut db::Client, show: &Show) -> anyhow::Result<model::Stamp> {
    let now = db::poll_row(admin, &show.poll).await?.now;
    let closes_at = model::Stamp(now.0 + show.closes_after.as_micros() as u64);
    db::schedule_poll(admin, &show.poll, None, Some(closes_at)).await?;
    Ok(closes_at)
}

/// `POST path` with a bearer and a JSON body to a region's ingest; the status.
async fn post(
    region: &freshness::RegionLink,
    path: &str,
    bearer: &str,
    body: &'static str,
) -> anyhow::Result<u16> {
    let mut sender = bench::load::connect(region.endpoint.clone()).await?;
    let req = hyper::Request::post(path)
        .header("host", &region.authority)
        .header("content-type", "application/json")
        .header("authorization", bearer)
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    Ok(sender.send_request(req).await?.status().as_u16())
}

/// Waits for the show's poll to be certified final, and sets its certified result against what
/// the load was acknowledged: each voter's latest acknowledged vote, the ballots' digest.
async fn certified(
    stack: &Stack,
    show: &Show,
    closes_at: model::Stamp,
    acks: &Acks,
    statuses: &std::collections::BTreeMap<u16, u64>,
) -> anyhow::Result<ShowReport> {
    let client = db::connect(&stack.primary_url()).await?;
    let started = Instant::now();
    let row = loop {
        let row = db::poll_row(&client, &show.poll).await?;
        if row.final_at.is_some() {
            break row;
        }
        anyhow::ensure!(
            started.elapsed() < show.final_within,
            "poll {} was not certified final within {:?} of the load's end",
            show.poll,
            show.final_within
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let final_at = row.final_at.expect("final");
    let audit = db::audit::audit(&client, &show.poll, |_| Ok(())).await?;
    let certified = audit.certified_counts.clone().unwrap_or_default();
    let mut acknowledged: std::collections::BTreeMap<String, i64> =
        show.options.iter().map(|o| (o.clone(), 0)).collect();
    let prefix = format!("{}/", show.poll);
    for (key, (_, option)) in &acks.latest {
        if key.starts_with(&prefix) {
            *acknowledged.entry(option.to_string()).or_default() += 1;
        }
    }
    // Only where every vote was answered 202 or 409 is every stored vote an acknowledged one
    // (a 503 may be a vote stored whose acknowledgement timed out, and counted).
    let all_answered = statuses.keys().all(|s| *s == 202 || *s == 409);
    Ok(ShowReport {
        poll: show.poll.clone(),
        closes_at: closes_at.0,
        final_at: final_at.0,
        final_seconds: final_at.0.saturating_sub(closes_at.0) as f64 / 1e6,
        counts_match_acknowledged: !all_answered || certified == acknowledged,
        certified,
        acknowledged,
        digest: audit.certified_digest.clone().unwrap_or_default(),
        audit_matches: audit.matches,
        refused_late: audit.refused.values().flat_map(|r| r.values()).sum(),
        acknowledged_after_close: 0,
    })
}

/// Every second until stopped: each shard's backlog and each replica's lag, for the report.
/// A sample that fails (a server restarting) is left out rather than failing the load.
async fn sample_every_second(
    stack: Stack,
    started: Instant,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Timeline {
    let mut shards = Vec::new();
    for r in &stack.regions {
        for (i, url) in stack.primary_redis_urls(r).iter().enumerate() {
            if let Ok(con) = harness::redis_connection(url).await {
                shards.push((
                    Series {
                        name: format!("{} shard {i}", r.name),
                        points: Vec::new(),
                    },
                    con,
                ));
            }
        }
    }
    let primary = db::connect(&stack.primary_url()).await.ok();
    let primary_region = stack.primary().name.clone();
    let mut lags: Vec<Series> = stack
        .regions
        .iter()
        .filter(|r| r.name != primary_region)
        .map(|r| Series {
            name: format!("{} replica", r.name),
            points: Vec::new(),
        })
        .collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let at = started.elapsed().as_secs_f64();
        for (series, con) in &mut shards {
            if let Ok(n) = harness::outstanding(con).await {
                series.points.push([at, n as f64]);
            }
        }
        let Some(primary) = &primary else { continue };
        let Ok(now) = db::replica_lags(primary).await else {
            continue;
        };
        for (series, region) in lags
            .iter_mut()
            .zip(stack.regions.iter().filter(|r| r.name != primary_region))
        {
            if let Some(bytes) = now
                .iter()
                .find(|l| l.slot == slot_name(&region.name))
                .and_then(|l| l.lag_bytes)
            {
                series.points.push([at, bytes as f64 / 1024.0]);
            }
        }
    }
    Timeline {
        backlog: shards.into_iter().map(|(s, _)| s).collect(),
        replica_lag_kib: lags,
        ..Timeline::default()
    }
}

fn parse_uuid(s: &str) -> Option<u128> {
    u128::from_str_radix(&s.replace('-', ""), 16).ok()
}

/// Until no shard holds a vote, waiting or in flight, and every replica has replayed the primary.
pub async fn wait_drained(stack: &Stack, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut shards = Vec::new();
    for url in stack
        .regions
        .iter()
        .flat_map(|r| stack.primary_redis_urls(r))
    {
        shards.push(harness::redis_connection(&url).await?);
    }
    loop {
        let mut left = 0u64;
        for con in &mut shards {
            left += harness::outstanding(con).await?;
        }
        if left == 0 {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "{left} votes still queued after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let primary = db::connect(&stack.primary_url()).await?;
    let lsn = db::current_lsn(&primary).await?;
    // Every server is asked, not the ones the data directories call replicas: while a failed
    // primary is rewound its directory looks like a primary's, and the real primary would then be
    // waited on as a replica, for ever.
    for r in &stack.regions {
        // A replica just rewound or restarted refuses connections until it is consistent.
        loop {
            let caught_up = match db::connect(&stack.server_url(r)).await {
                Ok(server) => db::has_replayed(&server, &lsn).await.ok(),
                Err(_) => None,
            };
            if caught_up == Some(true) {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "replica {} did not catch up within {limit:?}",
                r.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Lost: voters whose latest acknowledged vote is not what their ballot holds (nor superseded by
/// a later vote). Doubled: any difference between the tallies and a recount of the ballots.
async fn verify(stack: &Stack, run_tag: &str, acks: &Acks) -> anyhow::Result<(u64, u64)> {
    let client = db::connect(&stack.primary_url()).await?;
    let rows = client
        .query(
            "SELECT poll_id || '/' || voter_id, vote_id::text FROM ballots WHERE voter_id LIKE $1",
            &[&format!("{run_tag}-%")],
        )
        .await?;
    let ballots: HashMap<String, u128> = rows
        .iter()
        .filter_map(|r| Some((r.get::<_, String>(0), parse_uuid(r.get::<_, &str>(1))?)))
        .collect();
    let lost = acks
        .latest
        .iter()
        .filter(|(voter, (id, _))| ballots.get(*voter).is_none_or(|b| b < id))
        .count() as u64;
    let doubled: i64 = client
        .query_one(
            "SELECT COALESCE(sum(abs(t.count - COALESCE(r.n, 0))), 0)::int8
               FROM tallies t
               LEFT JOIN (SELECT poll_id, option, count(*) AS n FROM ballots GROUP BY 1, 2) r USING (poll_id, option)",
            &[],
        )
        .await?
        .get(0);
    Ok((lost, doubled as u64))
}

async fn compare_readers(
    stack: &Stack,
    live: &Live,
    polls: &'static Polls,
) -> anyhow::Result<Vec<RegionReport>> {
    let client = db::connect(&stack.primary_url()).await?;
    let mut primary: HashMap<String, HashMap<String, i64>> = HashMap::new();
    for r in client
        .query("SELECT poll_id, option, count FROM tallies", &[])
        .await?
    {
        primary
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), r.get(2));
    }
    // The reader refreshes every 100 ms; give it two intervals after the replicas caught up.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut out = Vec::new();
    for r in &stack.regions {
        let (mut matches, mut total) = (true, 0);
        for (poll, _, _) in polls {
            let reader = reader_results(r.reader, poll).await?;
            let counts: HashMap<String, i64> =
                serde_json::from_value(reader["counts"].clone()).unwrap_or_default();
            matches &= primary.get(*poll).is_some_and(|p| *p == counts);
            total += reader["total"].as_i64().unwrap_or(0);
        }
        out.push(RegionReport {
            name: r.name.clone(),
            acknowledged: live.acked_from(&r.name),
            results_match_primary: matches,
            reader_total: total,
        });
    }
    Ok(out)
}

/// A reader's results for one poll.
async fn reader_results(port: u16, poll: &str) -> anyhow::Result<serde_json::Value> {
    get_json(port, &format!("/v1/polls/{poll}/results")).await
}

/// `GET path` on a local port, as JSON.
pub async fn get_json(port: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&get(port, path).await?)?)
}

/// `GET path` on a local port: the body, whatever its status.
pub async fn get(port: u16, path: &str) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    Ok(http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_show_takes_its_share_and_the_others_keep_their_proportions() {
        let show = Show::for_load(Duration::from_secs(10));
        let all = super::polls(Some(&show));
        assert_eq!(all[0].0, show.poll);
        let total: f64 = all.iter().map(|p| p.2).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!((all[1].2 - POLLS[0].2 * 0.5).abs() < 1e-9);
    }

    #[test]
    fn polls_and_options_follow_their_popularity() {
        let all = super::polls(None);
        let mut polls: HashMap<&str, u64> = HashMap::new();
        let mut songs: HashMap<&str, u64> = HashMap::new();
        for n in 0..200_000u64 {
            let (poll, option) =
                pick_vote(all, n.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(23));
            *polls.entry(poll).or_default() += 1;
            if poll == "song-contest" {
                *songs.entry(option).or_default() += 1;
            }
        }
        for (poll, _, share) in POLLS {
            let got = polls[*poll] as f64 / 200_000.0;
            assert!(
                (got - share).abs() < 0.01,
                "{poll}: {got} of votes, wanted {share}"
            );
        }
        let ratio = songs["norway"] as f64 / songs["sweden"] as f64;
        assert!(
            (ratio - 2.0).abs() < 0.1,
            "the first option is twice as popular as the second: {ratio}"
        );
        assert!(
            songs["sweden"] > songs["italy"]
                && songs["italy"] > songs["spain"]
                && songs["spain"] > songs["ukraine"]
        );
    }
}
