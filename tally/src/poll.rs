//! `tally poll`: polls on the night. Create one with its window, close it (now, by the primary's
//! clock), move a window that has not ended, reveal a hidden one, wait for the certified result,
//! and audit it. Everything is written to and read from the primary.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use model::{Poll, Stamp};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::stack;
use crate::usage::bad;

#[derive(Debug, clap::Args)]
pub struct PollTarget {
    #[command(flatten)]
    dir: stack::Dir,
    /// The primary's URL (default: the local stack's primary).
    #[arg(long, env = ingest::config::ENV_POSTGRES_URL)]
    postgres_url: Option<String>,
}

impl PollTarget {
    fn url(&self) -> anyhow::Result<String> {
        match &self.postgres_url {
            Some(u) => Ok(u.clone()),
            None => stack::primary_url(&self.dir),
        }
    }
}

/// An RFC 3339 instant (`2026-12-24T21:42:00Z`, `2026-12-24T22:42:00+01:00`).
fn instant(s: &str) -> Result<Stamp, String> {
    let t = OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 instant: {e}"))?;
    let micros = t.unix_timestamp_nanos() / 1000;
    u64::try_from(micros)
        .map(Stamp)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// An instant as RFC 3339, UTC, to the millisecond.
pub fn rfc3339(s: Stamp) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(s.0 as i128 * 1000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

#[derive(Debug, Subcommand)]
pub enum PollCmd {
    /// Create a poll with the given options, and its window if it has one.
    Create {
        id: String,
        /// Comma-separated options, at least two.
        #[arg(long, value_delimiter = ',', required = true)]
        options: Vec<String>,
        /// Votes stamped before this instant (RFC 3339) get 409 `poll_not_open`.
        #[arg(long, value_parser = instant)]
        opens_at: Option<Stamp>,
        /// Votes stamped at or after this instant (RFC 3339) get 409 `poll_closed`.
        #[arg(long, value_parser = instant)]
        closes_at: Option<Stamp>,
        /// Keep the results from the public until `tally poll reveal`.
        #[arg(long)]
        hidden: bool,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Close a poll now, by the primary's clock: votes stamped from now on get 409.
    Close {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Move the window of a poll that has not ended.
    Schedule {
        id: String,
        #[arg(long, value_parser = instant)]
        opens_at: Option<Stamp>,
        #[arg(long, value_parser = instant)]
        closes_at: Option<Stamp>,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Accept votes again: a closed poll that is not final loses its close.
    Open {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Serve a hidden poll's results to the public from now on.
    Reveal {
        id: String,
        #[command(flatten)]
        target: PollTarget,
    },
    /// A poll's counts and state; with `--wait-final`, once it is certified final.
    Results {
        id: String,
        /// Wait until the poll is certified final.
        #[arg(long)]
        wait_final: bool,
        /// How long to wait, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: PollTarget,
    },
    /// Recount a poll from its ballots, independently of the tallies, and check it against them
    /// and against the certified result; exits 1 when they disagree.
    Audit {
        id: String,
        #[arg(long)]
        json: bool,
        /// Write the counted ballots, one `voter<TAB>option` line each in the canonical order,
        /// to FILE: its SHA-256 is the digest, and its lines are the counts.
        #[arg(long)]
        export: Option<PathBuf>,
        #[command(flatten)]
        target: PollTarget,
    },
    /// List polls.
    List {
        #[command(flatten)]
        target: PollTarget,
    },
}

impl PollCmd {
    pub fn run(self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match self {
            PollCmd::Create {
                id,
                options,
                opens_at,
                closes_at,
                hidden,
                target,
            } => {
                let options: Vec<&str> = options.iter().map(String::as_str).collect();
                let mut poll = Poll::new(&id, &options).map_err(bad)?;
                poll.window = model::Window {
                    opens_at,
                    closes_at,
                };
                poll.hidden = hidden;
                if let (Some(o), Some(c)) = (opens_at, closes_at) {
                    if o >= c {
                        return Err(bad("--opens-at must be before --closes-at"));
                    }
                }
                rt.block_on(async {
                    let mut client = connect(&target).await?;
                    db::create_poll(&mut client, &poll).await?;
                    println!(
                        "created poll {id} with options {}{}",
                        options.join(", "),
                        window(&poll.window)
                    );
                    anyhow::Ok(())
                })
            }
            PollCmd::Close { id, target } => rt.block_on(async {
                let closes_at = db::close_poll(&connect(&target).await?, &id).await?;
                println!("poll {id} closed at {}", rfc3339(closes_at));
                Ok(())
            }),
            PollCmd::Schedule {
                id,
                opens_at,
                closes_at,
                target,
            } => {
                if opens_at.is_none() && closes_at.is_none() {
                    return Err(bad("give --opens-at, --closes-at or both"));
                }
                rt.block_on(async {
                    let mut client = connect(&target).await?;
                    let w = db::schedule_poll(&mut client, &id, opens_at, closes_at)
                        .await
                        .map_err(refusal)?;
                    println!("poll {id}{}", window(&w));
                    Ok(())
                })
            }
            PollCmd::Open { id, target } => rt.block_on(async {
                db::reopen_poll(&connect(&target).await?, &id)
                    .await
                    .map_err(refusal)?;
                println!("poll {id} is open");
                Ok(())
            }),
            PollCmd::Reveal { id, target } => rt.block_on(async {
                db::reveal_poll(&connect(&target).await?, &id).await?;
                println!("poll {id}'s results are public");
                Ok(())
            }),
            PollCmd::Results {
                id,
                wait_final,
                timeout,
                json,
                target,
            } => rt.block_on(results(&target, &id, wait_final, timeout, json)),
            PollCmd::Audit {
                id,
                json,
                export,
                target,
            } => rt.block_on(audit(&target, &id, json, export)),
            PollCmd::List { target } => rt.block_on(list(&target)),
        }
    }
}

async fn connect(target: &PollTarget) -> anyhow::Result<db::Client> {
    db::connect(&target.url()?)
        .await
        .context("connecting to the primary")
}

/// A window the command cannot apply is the user's to fix: exit 64.
fn refusal(e: db::DbError) -> anyhow::Error {
    match e {
        db::DbError::BadWindow(_) => bad(e),
        e => e.into(),
    }
}

fn window(w: &model::Window) -> String {
    let mut out = String::new();
    if let Some(o) = w.opens_at {
        out += &format!(", opens at {}", rfc3339(o));
    }
    if let Some(c) = w.closes_at {
        out += &format!(", closes at {}", rfc3339(c));
    }
    out
}

/// The poll as the primary has it: state, window, counts (certified ones once final).
async fn results(
    target: &PollTarget,
    id: &str,
    wait_final: bool,
    timeout: u64,
    json: bool,
) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let row = loop {
        let row = db::poll_row(&client, id).await?;
        if !wait_final || row.final_at.is_some() {
            break row;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "poll {id} was not certified final within {timeout} s (state: {})",
            row.window.state(row.now).as_str()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let certified = client
        .query_one(
            "SELECT final_counts::text, digest FROM polls WHERE id = $1",
            &[&id],
        )
        .await?;
    let counts: BTreeMap<String, i64> = match certified.get::<_, Option<String>>(0) {
        Some(text) => serde_json::from_str(&text)?,
        None => client
            .query(
                "SELECT option, count FROM tallies WHERE poll_id = $1",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    };
    let digest: Option<String> = certified.get(1);
    let state = match row.final_at {
        Some(_) => model::PollState::Final,
        None => row.window.state(row.now),
    };
    let final_seconds = row
        .final_at
        .zip(row.window.closes_at)
        .map(|(f, c)| f.0.saturating_sub(c.0) as f64 / 1e6);
    let total: i64 = counts.values().sum();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "poll": id,
                "state": state.as_str(),
                "counts": counts,
                "total": total,
                "opens_at": row.window.opens_at.map(rfc3339),
                "closes_at": row.window.closes_at.map(rfc3339),
                "final_at": row.final_at.map(rfc3339),
                "digest": digest,
                "final_seconds": final_seconds,
                "hidden": row.hidden && !row.revealed,
            })
        );
        return Ok(());
    }
    println!("poll {id}: {}{}", state.as_str(), window(&row.window));
    for (option, n) in &counts {
        println!("  {option:<20} {n:>10}");
    }
    println!("  {:<20} {total:>10}", "total");
    if let (Some(f), Some(d)) = (row.final_at, digest) {
        println!(
            "certified final at {} ({:.1} s after the close); digest {d}",
            rfc3339(f),
            final_seconds.unwrap_or(0.0)
        );
    }
    Ok(())
}

async fn audit(
    target: &PollTarget,
    id: &str,
    json: bool,
    export: Option<PathBuf>,
) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let mut file = match &export {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let report = db::audit::audit(&client, id, |chunk| match file.as_mut() {
        Some(f) => f.write_all(chunk),
        None => Ok(()),
    })
    .await?;
    if let Some(mut f) = file {
        f.flush()?;
    }
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "poll {id} ({}): {} ballots, recount {} the tallies{}",
            report.state,
            report.ballots,
            if report.matches {
                "matches"
            } else {
                "DOES NOT MATCH"
            },
            if report.certified_digest.is_some() {
                " and the certified result"
            } else {
                ""
            }
        );
        for (option, n) in &report.counts {
            println!(
                "  {option:<20} {n:>10}  (tallies: {})",
                report.tallied.get(option).unwrap_or(&0)
            );
        }
        for (region, counts) in &report.by_region {
            println!(
                "  {region:<20} {:>10} ballots",
                counts.values().sum::<i64>()
            );
        }
        for (region, reasons) in &report.refused {
            for (reason, n) in reasons {
                println!("  {region:<20} {n:>10} refused: {reason}");
            }
        }
        println!("digest {}", report.digest);
        if let Some(path) = &export {
            println!(
                "ballots written to {} (sha256sum of it is the digest)",
                path.display()
            );
        }
    }
    anyhow::ensure!(report.matches, "the recount of poll {id} does not match");
    Ok(())
}

async fn list(target: &PollTarget) -> anyhow::Result<()> {
    let client = connect(target).await?;
    for p in db::load_polls(&client).await? {
        let options: Vec<&str> = p.options.iter().map(|o| o.as_str()).collect();
        let row = db::poll_row(&client, p.id.as_str()).await?;
        let state = match row.final_at {
            Some(_) => model::PollState::Final,
            None => row.window.state(row.now),
        };
        println!(
            "{}\t{}\t{}{}{}",
            p.id,
            state.as_str(),
            options.join(","),
            window(&p.window),
            if p.hidden { ", hidden" } else { "" }
        );
    }
    Ok(())
}
