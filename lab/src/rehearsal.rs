//! A load against any deployment a target file names (`tally load --target`, `tally rehearse`).
//! Every region is checked before any vote is sent; voters vote in the run's own poll through
//! each region's ingest; canaries measure each region's freshness; and, with no database to
//! recount, the check is made through the readers: each region's counts against each voter's
//! latest acknowledged vote, once the poll is certified final (a run with a close) or once the
//! counts stop moving.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::freshness::{self, Probe, RegionLink};
use crate::load::{self, Acks, Checked, Lane, Live, Options, Show};
use crate::report::{RegionReport, Report, ShowReport, Timeline};
use crate::target::{self, Target, TargetFile};

/// How long counts must stay still, after the load, to be taken as settled (no close).
const SETTLED_FOR: Duration = Duration::from_secs(5);
/// How long to wait for them to settle at all.
const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// The options voted for in a run's own poll.
const OPTIONS: [&str; 3] = ["red", "green", "blue"];

pub async fn run(file: &TargetFile, opts: &Options) -> anyhow::Result<Report> {
    let target = file.check().await?;
    let run_tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ingests: Vec<RegionLink> = target.regions.iter().map(|r| r.ingest.clone()).collect();
    let readers: Vec<RegionLink> = target.regions.iter().map(|r| r.reader.clone()).collect();

    let mut polls = make_polls(&target, opts, &run_tag).await?;
    let share = 1.0 / target.regions.len() as f64;
    let voters_here = ((opts.voters as f64 * share) as u64).max(1);
    let canaries_at_most =
        (opts.duration.as_secs_f64() / freshness::EVERY.as_secs_f64()) as u64 + 50;
    let canary_prefix = format!("{run_tag}-canary");
    let mut ids: Vec<String> = target
        .regions
        .iter()
        .flat_map(|r| {
            let tag = &run_tag;
            (0..voters_here).map(move |i| format!("{tag}-{}-{i}", r.name))
        })
        .chain((0..canaries_at_most).map(|i| format!("{canary_prefix}-{i}")))
        .collect();
    ids.push("known-probe".into());
    let bearer = file.bearer(&ids)?;

    load::wait_known(&ingests, &polls.vote, &bearer).await?;
    load::wait_known(&ingests, &polls.canary, &bearer).await?;
    let mut baseline = BTreeMap::new();
    for r in &readers {
        baseline.insert(
            r.name.clone(),
            reader_counts(r, &polls.vote, Duration::from_secs(15))
                .await?
                .0,
        );
    }
    let probe = Probe::start(
        readers.clone(),
        ingests.clone(),
        polls.canary.clone(),
        canary_prefix,
        bearer.clone(),
    )
    .await?;

    let lanes = target
        .regions
        .iter()
        .map(|r| {
            let label: &'static str = Box::leak(r.name.clone().into_boxed_str());
            Lane {
                region: r.name.clone(),
                route: bench::load::fixed(r.ingest.endpoint.clone()),
                share,
                continents: vec![(label, share)],
                authority: r.ingest.authority.clone(),
            }
        })
        .collect();
    let live = Arc::new(Live::regions(target.regions.iter().map(|r| r.name.clone())));
    let vote_poll: &'static str = Box::leak(polls.vote.clone().into_boxed_str());
    let options: Vec<&'static str> = polls
        .options
        .iter()
        .map(|o| &*Box::leak(o.clone().into_boxed_str()))
        .collect();
    let voted: &'static load::Polls = Box::leak(Box::new([(vote_poll, options, 1.0)]));
    let closes_at = match (&opts.show, polls.admin.as_mut()) {
        (Some(show), Some(admin)) => Some(load::start_show_clock(admin, show).await?),
        _ => None,
    };
    let show_close = closes_at.map(|c| (vote_poll, c.0 as u128));
    let sent = load::send_votes(lanes, voted, bearer, opts, &live, &run_tag, show_close).await?;
    let freshness_ms = probe.finish(Duration::from_secs(10)).await;
    let summary = sent.outcome.summary();

    let acknowledged = by_option(&sent.acks, vote_poll, &polls.options);
    let settle_started = Instant::now();
    let mut regions = Vec::new();
    let (mut lost, mut doubled) = (0u64, 0u64);
    // Each voter with a vote of unknown outcome may move one count from the option their
    // latest acknowledged vote says to another, or add one: a difference that many explain.
    let prefix = format!("{vote_poll}/");
    let uncertain = sent
        .acks
        .uncertain
        .iter()
        .filter(|k| k.starts_with(&prefix))
        .count() as u64;
    let mut finals = Vec::new();
    for r in &target.regions {
        let base = &baseline[&r.name];
        let expected: BTreeMap<String, i64> = polls
            .options
            .iter()
            .map(|o| {
                (
                    o.clone(),
                    base.get(o).copied().unwrap_or(0) + acknowledged.get(o).copied().unwrap_or(0),
                )
            })
            .collect();
        let shown = match (closes_at, &opts.show) {
            (Some(_), Some(show)) => {
                let results = wait_final(&r.reader, vote_poll, show.final_within).await?;
                finals.push(results.clone());
                counts_of(&results)
            }
            _ => settle(&r.reader, vote_poll, &expected).await?,
        };
        let (short, over) = difference(&expected, &shown);
        lost = lost.max(short.saturating_sub(uncertain));
        doubled = doubled.max(over.saturating_sub(uncertain));
        regions.push(RegionReport {
            name: r.name.clone(),
            acknowledged: live.acked_from(&r.name),
            results_match_primary: shown == expected,
            reader_total: shown.values().sum(),
        });
    }
    let show = match (closes_at, finals.first()) {
        (Some(closes_at), Some(first)) => Some(certified(
            vote_poll,
            closes_at,
            first,
            &finals,
            acknowledged.clone(),
            // 409 and 429 are refusals before anything is stored.
            uncertain == 0
                && summary
                    .statuses
                    .keys()
                    .all(|s| matches!(*s, 202 | 409 | 429)),
            sent.after_close,
        )?),
        _ => None,
    };
    let drained_in_seconds = settle_started.elapsed().as_secs_f64();
    Ok(sent.report(
        opts,
        Timeline::default(),
        Checked {
            lost,
            doubled,
            regions,
            drained_in_seconds,
            route_changes: Vec::new(),
            freshness_ms,
            show,
        },
    ))
}

/// The polls of one run.
struct RunPolls {
    vote: String,
    options: Vec<String>,
    canary: String,
    /// Where they were made, when the run made them: the show's clock starts there.
    admin: Option<db::Client>,
}

/// The run's own polls, through the file's `admin_url`; or the ones it names.
async fn make_polls(target: &Target, opts: &Options, run_tag: &str) -> anyhow::Result<RunPolls> {
    let Some(url) = &target.polls.admin_url else {
        let vote = target.polls.vote.clone().context("no vote poll")?;
        let reader = &target.regions[0].reader;
        let (counts, _) = reader_counts(reader, &vote, Duration::from_secs(5)).await?;
        anyhow::ensure!(
            counts.len() >= 2,
            "poll {vote} has {} options in {}'s results",
            counts.len(),
            reader.name
        );
        return Ok(RunPolls {
            vote,
            options: counts.into_keys().collect(),
            canary: target.polls.canary.clone().context("no canary poll")?,
            admin: None,
        });
    };
    let mut admin = db::connect(url).await.map_err(|e| {
        anyhow::anyhow!(
            "polls.admin_url {}: {}",
            tls::redact(url),
            target::one_line(&e)
        )
    })?;
    let canary = format!("canary-{run_tag}");
    load::create_canary_poll(&mut admin, &canary).await?;
    let (vote, options) = match &opts.show {
        Some(show) => {
            load::open_show(&mut admin, show).await?;
            (show.poll.clone(), show.options.clone())
        }
        None => {
            let vote = format!("load-{run_tag}");
            db::create_poll(&mut admin, &model::Poll::new(&vote, &OPTIONS)?).await?;
            (vote, OPTIONS.map(String::from).to_vec())
        }
    };
    Ok(RunPolls {
        vote,
        options,
        canary,
        admin: Some(admin),
    })
}

/// A poll's counts and results document from a reader, once it knows the poll (within `limit`).
async fn reader_counts(
    reader: &RegionLink,
    poll: &str,
    limit: Duration,
) -> anyhow::Result<(BTreeMap<String, i64>, serde_json::Value)> {
    let started = Instant::now();
    let path = format!("/v1/polls/{poll}/results");
    loop {
        let last = match target::get(reader, &path).await {
            Ok((200, body)) => {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .with_context(|| format!("{}'s reader: results of {poll}", reader.name))?;
                return Ok((counts_of(&v), v));
            }
            Ok((status, _)) => format!("answered {status}"),
            Err(e) => target::one_line(&*e),
        };
        anyhow::ensure!(
            started.elapsed() < limit,
            "{}'s reader has no results of poll {poll} within {limit:?}: {last}",
            reader.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn counts_of(results: &serde_json::Value) -> BTreeMap<String, i64> {
    serde_json::from_value(results["counts"].clone()).unwrap_or_default()
}

/// Each voter's latest acknowledged vote in `poll`, counted by option.
fn by_option(acks: &Acks, poll: &str, options: &[String]) -> BTreeMap<String, i64> {
    let mut out: BTreeMap<String, i64> = options.iter().map(|o| (o.clone(), 0)).collect();
    let prefix = format!("{poll}/");
    for (key, (_, option)) in &acks.latest {
        if key.starts_with(&prefix) {
            *out.entry(option.to_string()).or_default() += 1;
        }
    }
    out
}

/// Votes short of what was expected, and votes over it, option by option.
fn difference(expected: &BTreeMap<String, i64>, shown: &BTreeMap<String, i64>) -> (u64, u64) {
    let options: std::collections::BTreeSet<&String> =
        expected.keys().chain(shown.keys()).collect();
    let (mut short, mut over) = (0, 0);
    for o in options {
        let d = shown.get(o).copied().unwrap_or(0) - expected.get(o).copied().unwrap_or(0);
        if d < 0 {
            short += d.unsigned_abs();
        } else {
            over += d as u64;
        }
    }
    (short, over)
}

/// A reader's counts once they equal `expected`, or have not moved for [`SETTLED_FOR`].
async fn settle(
    reader: &RegionLink,
    poll: &str,
    expected: &BTreeMap<String, i64>,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let started = Instant::now();
    let (mut last, _) = reader_counts(reader, poll, Duration::from_secs(15)).await?;
    let mut since = Instant::now();
    loop {
        if last == *expected || since.elapsed() >= SETTLED_FOR || started.elapsed() > SETTLE_WITHIN
        {
            return Ok(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (now, _) = reader_counts(reader, poll, Duration::from_secs(15)).await?;
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// A reader's results of `poll` once they are certified final.
async fn wait_final(
    reader: &RegionLink,
    poll: &str,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    loop {
        let (_, results) = reader_counts(reader, poll, Duration::from_secs(15)).await?;
        if results["state"] == "final" {
            return Ok(results);
        }
        anyhow::ensure!(
            started.elapsed() < within,
            "{}'s reader did not show poll {poll} final within {within:?} of the load's end (it shows {})",
            reader.name,
            results["state"]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The close as every reader showed it: its certified counts against what was acknowledged.
fn certified(
    poll: &str,
    closes_at: model::Stamp,
    first: &serde_json::Value,
    finals: &[serde_json::Value],
    acknowledged: BTreeMap<String, i64>,
    all_answered: bool,
    after_close: u64,
) -> anyhow::Result<ShowReport> {
    let final_at = first["final_at"]
        .as_str()
        .and_then(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|t| (t.unix_timestamp_nanos() / 1000) as u64)
        .context("a final poll's results carry no final_at")?;
    let certified = counts_of(first);
    Ok(ShowReport {
        poll: poll.to_string(),
        closes_at: closes_at.0,
        final_at,
        final_seconds: final_at.saturating_sub(closes_at.0) as f64 / 1e6,
        counts_match_acknowledged: !all_answered || certified == acknowledged,
        certified,
        acknowledged,
        digest: first["digest"].as_str().unwrap_or_default().to_string(),
        // No ballots to recount from here: every region's reader shows the same certified
        // counts and digest instead.
        audit_matches: finals
            .iter()
            .all(|f| f["counts"] == first["counts"] && f["digest"] == first["digest"]),
        refused_late: 0,
        acknowledged_after_close: after_close,
    })
}

/// The rehearsal's show: a poll of its own, closing as the load ends.
pub fn show_for(duration: Duration) -> Show {
    Show {
        closes_after: duration,
        final_within: Duration::from_secs(120),
        share: 1.0,
        ..Show::for_load(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_count_votes_short_and_over() {
        let m = |pairs: &[(&str, i64)]| -> BTreeMap<String, i64> {
            pairs.iter().map(|(o, n)| (o.to_string(), *n)).collect()
        };
        assert_eq!(
            difference(&m(&[("a", 3), ("b", 2)]), &m(&[("a", 3), ("b", 2)])),
            (0, 0)
        );
        assert_eq!(
            difference(&m(&[("a", 3), ("b", 2)]), &m(&[("a", 1), ("b", 4)])),
            (2, 2)
        );
        assert_eq!(
            difference(&m(&[("a", 3)]), &m(&[("a", 3), ("z", 1)])),
            (0, 1)
        );
    }
}
