//! The results snapshot: refreshed from the chosen source once per interval, with every poll's
//! answer rendered to JSON bytes up front, so serving a request is a lookup and a clone.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use model::PollState;
use serde::Serialize;
use tokio::sync::watch;

use crate::config::{Config, RECONNECT_AFTER};
use crate::source::{choose, Probe};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub struct Snapshot {
    pub polls: HashMap<String, PollView>,
    /// `GET /v1/polls`, rendered: every poll, hidden ones too (their counts are what is hidden).
    pub poll_list: Bytes,
    /// When a source last answered; `None` before the first answer.
    pub refreshed: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct PollView {
    pub json: Bytes,
    /// A hash of the counts and, past `open`, the state: the same answer gives the same id in
    /// every reader instance, so an event stream resumes on any of them.
    pub etag: String,
    /// Kept from the public until revealed.
    pub hidden: bool,
    pub state: PollState,
}

#[derive(Serialize)]
struct Results<'a> {
    poll: &'a str,
    counts: &'a BTreeMap<String, i64>,
    total: i64,
    state: &'static str,
    opens_at: Option<String>,
    closes_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    final_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<String>,
    as_of: Option<&'a str>,
    region: &'a str,
    replica_lag_ms: Option<f64>,
    source: &'a str,
    fallback: bool,
    lsn: &'a str,
}

struct Conn {
    url: String,
    client: Option<db::Client>,
    failed_at: Option<Instant>,
}

impl Conn {
    async fn client(&mut self) -> Option<&db::Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            if self
                .failed_at
                .is_some_and(|t| t.elapsed() < RECONNECT_AFTER)
            {
                return None;
            }
            match tokio::time::timeout(CONNECT_TIMEOUT, db::connect(&self.url)).await {
                Ok(Ok(c)) => {
                    self.client = Some(c);
                    self.failed_at = None;
                }
                _ => {
                    self.failed_at = Some(Instant::now());
                    return None;
                }
            }
        }
        self.client.as_ref()
    }
}

/// Refreshes the snapshot every `cache_ttl` until `stop`. One loop per reader, however many
/// requests and subscribers it has.
pub async fn refresh_loop(
    config: Config,
    tx: watch::Sender<Arc<Snapshot>>,
    mut stop: watch::Receiver<bool>,
) {
    let region = config.region.to_string();
    let mut conns: Vec<Conn> = config
        .sources
        .iter()
        .map(|s| Conn {
            url: s.url.clone(),
            client: None,
            failed_at: None,
        })
        .collect();
    let fallback_gauge = metrics::gauge!("tally_reader_fallback", "region" => region.clone());
    let fallbacks = metrics::counter!("tally_reader_fallbacks_total", "region" => region.clone());
    let mut last_source: Option<usize> = None;
    let mut tick = tokio::time::interval(config.cache_ttl);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let mut probes = vec![Probe::Down; conns.len()];
        let mut found = vec![None; conns.len()];
        for (i, conn) in conns.iter_mut().enumerate() {
            let Some(client) = conn.client().await else {
                continue;
            };
            match tokio::time::timeout(QUERY_TIMEOUT, db::freshness(client)).await {
                Ok(Ok(f)) => {
                    let lag = f.lag_ms;
                    metrics::gauge!("tally_reader_replica_lag_seconds", "region" => region.clone(), "source" => config.sources[i].name.clone())
                        .set(lag.unwrap_or(f64::NAN) / 1000.0);
                    probes[i] = Probe::Up { lag_ms: lag };
                    found[i] = Some(f);
                    if lag.is_some_and(|l| l <= config.max_lag.as_secs_f64() * 1000.0) {
                        break;
                    }
                }
                _ => conn.client = None,
            }
        }
        let Some(chosen) = choose(&probes, config.max_lag) else {
            tracing::warn!("no results source answers");
            continue;
        };
        let freshness = found[chosen].take().expect("chosen sources answered");
        let Some(client) = conns[chosen].client.as_ref() else {
            continue;
        };
        let snapshot = match tokio::time::timeout(
            QUERY_TIMEOUT,
            load(client, &config, chosen, &freshness, &region),
        )
        .await
        {
            Ok(Ok(s)) => s,
            _ => {
                conns[chosen].client = None;
                continue;
            }
        };
        if last_source != Some(chosen) {
            if chosen != 0 {
                fallbacks.increment(1);
                tracing::warn!(source = %config.sources[chosen].name, "serving results from a fallback source");
            } else if last_source.is_some() {
                tracing::info!(source = %config.sources[0].name, "back on the preferred source");
            }
            last_source = Some(chosen);
        }
        fallback_gauge.set(if chosen == 0 { 0.0 } else { 1.0 });
        tx.send_replace(Arc::new(snapshot));
    }
}

/// Every poll's window, visibility and certified result, with the source's own clock.
const POLLS: &str = "
SELECT id, options,
       to_char(opens_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
       to_char(closes_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
       to_char(final_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
       CASE WHEN final_at IS NOT NULL THEN 'final'
            WHEN closes_at <= clock_timestamp() THEN 'closed'
            WHEN opens_at > clock_timestamp() THEN 'scheduled'
            ELSE 'open' END,
       hidden AND revealed_at IS NULL,
       final_counts::text, digest
  FROM polls ORDER BY id";

async fn load(
    client: &db::Client,
    config: &Config,
    chosen: usize,
    f: &db::Freshness,
    region: &str,
) -> Result<Snapshot, tokio_postgres::Error> {
    let (polls, tallies) = tokio::try_join!(
        client.query(POLLS, &[]),
        client.query("SELECT poll_id, option, count FROM tallies", &[]),
    )?;
    let mut counts: HashMap<String, BTreeMap<String, i64>> = HashMap::new();
    for r in &tallies {
        counts
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), r.get(2));
    }
    let mut views = HashMap::with_capacity(polls.len());
    let mut list = Vec::new();
    for r in &polls {
        let id: String = r.get(0);
        let options: Vec<String> = r.get(1);
        let state = match r.get::<_, &str>(5) {
            "final" => PollState::Final,
            "closed" => PollState::Closed,
            "scheduled" => PollState::Scheduled,
            _ => PollState::Open,
        };
        let hidden: bool = r.get(6);
        // A final poll's result is what was certified: exactly the frozen counts.
        let certified: Option<BTreeMap<String, i64>> = r
            .get::<_, Option<String>>(7)
            .and_then(|t| serde_json::from_str(&t).ok());
        let mut c = match certified {
            Some(c) => c,
            None => counts.remove(&id).unwrap_or_default(),
        };
        for o in &options {
            c.entry(o.clone()).or_insert(0);
        }
        let total = c.values().sum();
        let json = serde_json::to_vec(&Results {
            poll: &id,
            counts: &c,
            total,
            state: state.as_str(),
            opens_at: r.get(2),
            closes_at: r.get(3),
            final_at: r.get(4),
            digest: r.get(8),
            as_of: f.as_of.as_deref(),
            region,
            replica_lag_ms: f.lag_ms,
            source: &config.sources[chosen].name,
            fallback: chosen != 0,
            lsn: &f.lsn,
        })
        .expect("results serialize");
        let etag = match state {
            PollState::Open | PollState::Scheduled => etag(&c),
            other => format!("{}-{}", etag(&c), other.as_str()),
        };
        views.insert(
            id.clone(),
            PollView {
                json: json.into(),
                etag,
                hidden,
                state,
            },
        );
        list.push(serde_json::json!({
            "id": id, "options": options, "state": state.as_str(), "hidden": hidden,
        }));
    }
    Ok(Snapshot {
        polls: views,
        poll_list: serde_json::to_vec(&serde_json::json!({"polls": list}))
            .expect("serializes")
            .into(),
        refreshed: Some(Instant::now()),
    })
}

fn etag(counts: &BTreeMap<String, i64>) -> String {
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    for (k, v) in counts {
        h.write(k.as_bytes());
        h.write(&[0xff]);
        h.write(&v.to_be_bytes());
    }
    format!("{:016x}", h.finish())
}

struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_follow_counts_only() {
        let a: BTreeMap<String, i64> = [("a".into(), 1), ("b".into(), 2)].into();
        let b: BTreeMap<String, i64> = [("a".into(), 2), ("b".into(), 1)].into();
        assert_eq!(etag(&a), etag(&a.clone()));
        assert_ne!(etag(&a), etag(&b));
        // Pinned: readers of different versions must agree, or resumed streams would repeat events.
        assert_eq!(etag(&a), "bf32458caf08b033");
    }
}
