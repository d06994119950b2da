//! How fresh each region's results are: how long after its `202` a vote shows in that region's
//! results. Canary votes, a few a second from voters of their own, go to a poll of their own
//! whose options take turns; each region's event stream of that poll says when an option's
//! count reached the `k`th canary sent to it. Canaries to one option are seconds apart, so
//! counts reach them in the order they were acknowledged.
//!
//! [`Canaries`] is the bookkeeping, free of IO; [`watch`] and [`send`] drive it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use bench::load::{Endpoint, Sender};

/// A voter's `Authorization` header.
pub type Bearer = Arc<dyn Fn(&str) -> Arc<str> + Send + Sync>;

/// The canary poll's options: a canary every 100 ms comes back to an option after 0.8 s.
pub const OPTIONS: usize = 8;
/// How often a canary is sent.
pub const EVERY: Duration = Duration::from_millis(100);

/// One region's freshness over a run, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Freshness {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    /// Canaries seen in this region's results.
    pub samples: u64,
    /// Canaries acknowledged but never seen here before the load gave up waiting.
    pub unseen: u64,
    /// The same by the region whose ingest took the canary: a far region's slow aggregator
    /// shows as its own row in every region's results.
    pub from: BTreeMap<String, Spread>,
}

/// p50, p99 and max of some waits, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(waits_us: &mut [u64]) -> Self {
        waits_us.sort_unstable();
        let at = |q: f64| {
            waits_us
                .get(((waits_us.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |us| *us as f64 / 1000.0)
        };
        Self {
            p50: at(0.5),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

#[derive(Default)]
struct Region {
    /// Per option, the count its results last showed.
    seen: [u64; OPTIONS],
    /// Each canary's wait, and the region it was sent to.
    waits_us: Vec<(u64, usize)>,
}

/// Canaries acknowledged, and when each region's results showed them.
pub struct Canaries {
    /// Per option: when each canary sent to it was acknowledged, in order; `None` for a canary
    /// whose answer was not a `202` (it may yet be counted), after which the option is retired.
    acked: [Vec<(Instant, usize)>; OPTIONS],
    retired: [bool; OPTIONS],
    regions: BTreeMap<String, Region>,
    /// The regions canaries are sent to, by index.
    origins: Vec<String>,
    /// Counts each region's results showed before the load began (a poll named by a target
    /// file may hold earlier canaries).
    baseline: BTreeMap<String, [u64; OPTIONS]>,
}

impl Canaries {
    /// Canaries sent to `regions`' ingests (in this order) and watched in their results.
    pub fn new(regions: impl IntoIterator<Item = String>) -> Self {
        let origins: Vec<String> = regions.into_iter().collect();
        Self {
            acked: Default::default(),
            retired: [false; OPTIONS],
            regions: origins
                .iter()
                .map(|r| (r.clone(), Region::default()))
                .collect(),
            origins,
            baseline: BTreeMap::new(),
        }
    }

    /// The option the `i`th canary votes for, or `None` once every option is retired.
    pub fn option_for(&self, i: u64) -> Option<usize> {
        (0..OPTIONS)
            .map(|k| (i as usize + k) % OPTIONS)
            .find(|o| !self.retired[*o])
    }

    /// A canary for `option`, sent to the `origin`th region, was answered: acknowledged at
    /// `at`, or not (then the option's count can no longer be read as canaries acknowledged).
    pub fn answered(&mut self, option: usize, origin: usize, acknowledged: Option<Instant>) {
        let Some(at) = acknowledged else {
            self.retired[option] = true;
            return;
        };
        if self.retired[option] {
            return;
        }
        let k = self.acked[option].len() as u64;
        self.acked[option].push((at, origin));
        // Results that showed it before its answer came back: as fresh as can be.
        for (name, r) in &mut self.regions {
            let base = self.baseline.get(name).map_or(0, |b| b[option]);
            if r.seen[option] > base + k {
                r.waits_us.push((0, origin));
            }
        }
    }

    /// `region`'s results showed `counts` (per option) at `now`.
    pub fn shown(&mut self, region: &str, counts: [u64; OPTIONS], now: Instant) {
        let Some(r) = self.regions.get_mut(region) else {
            return;
        };
        let base = *self.baseline.entry(region.to_string()).or_insert(counts);
        for o in 0..OPTIONS {
            let (from, to) = (r.seen[o].max(base[o]), counts[o]);
            if to <= from {
                r.seen[o] = r.seen[o].max(to);
                continue;
            }
            for k in (from - base[o])..(to - base[o]) {
                if let Some((at, origin)) = self.acked[o].get(k as usize) {
                    let wait = now.saturating_duration_since(*at).as_micros() as u64;
                    r.waits_us.push((wait, *origin));
                }
            }
            r.seen[o] = to;
        }
    }

    /// Canaries acknowledged that `region` has not shown yet.
    pub fn unseen(&self, region: &str) -> u64 {
        let Some(r) = self.regions.get(region) else {
            return 0;
        };
        let base = self.baseline.get(region).copied().unwrap_or([0; OPTIONS]);
        (0..OPTIONS)
            .map(|o| {
                let acked = self.acked[o].len() as u64;
                acked.saturating_sub(r.seen[o].saturating_sub(base[o]))
            })
            .sum()
    }

    /// Every region's results have been shown once: what they held before any canary.
    pub fn ready(&self) -> bool {
        self.regions.keys().all(|r| self.baseline.contains_key(r))
    }

    pub fn all_seen(&self) -> bool {
        self.regions.keys().all(|r| self.unseen(r) == 0)
    }

    pub fn report(&self) -> BTreeMap<String, Freshness> {
        self.regions
            .iter()
            .map(|(name, r)| {
                let mut all: Vec<u64> = r.waits_us.iter().map(|(w, _)| *w).collect();
                let spread = Spread::of(&mut all);
                let from = self
                    .origins
                    .iter()
                    .enumerate()
                    .filter_map(|(i, origin)| {
                        let mut w: Vec<u64> = r
                            .waits_us
                            .iter()
                            .filter(|(_, o)| *o == i)
                            .map(|(w, _)| *w)
                            .collect();
                        (!w.is_empty()).then(|| (origin.clone(), Spread::of(&mut w)))
                    })
                    .collect();
                let f = Freshness {
                    p50: spread.p50,
                    p99: spread.p99,
                    max: spread.max,
                    samples: all.len() as u64,
                    unseen: self.unseen(name),
                    from,
                };
                (name.clone(), f)
            })
            .collect()
    }
}

/// The canary poll's option names.
pub fn option_names() -> Vec<String> {
    (0..OPTIONS).map(|o| format!("c{o}")).collect()
}

/// Counts per canary option from a results document (`{"counts": {"c0": 3, ...}}`).
pub fn counts(results: &serde_json::Value) -> [u64; OPTIONS] {
    let mut out = [0; OPTIONS];
    for (o, n) in out.iter_mut().enumerate() {
        *n = results["counts"][format!("c{o}")].as_u64().unwrap_or(0);
    }
    out
}

/// Where a region is reached: its reader for the event stream, its ingest for canaries.
#[derive(Clone)]
pub struct RegionLink {
    pub name: String,
    pub endpoint: Endpoint,
    /// The `Host` header (a load balancer routes by it).
    pub authority: String,
}

/// Canaries under way: sent to every region's ingest, watched in every region's results.
pub struct Probe {
    canaries: Arc<Mutex<Canaries>>,
    stop_sending: tokio::sync::watch::Sender<bool>,
    stop_watching: tokio::sync::watch::Sender<bool>,
    sender: tokio::task::JoinHandle<()>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
}

impl Probe {
    /// Watches every reader's stream of `poll` and, once each has shown what it holds, starts
    /// sending canaries to the ingests.
    pub async fn start(
        readers: Vec<RegionLink>,
        ingests: Vec<RegionLink>,
        poll: String,
        voter_prefix: String,
        bearer: Bearer,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            readers
                .iter()
                .map(|r| &r.name)
                .eq(ingests.iter().map(|r| &r.name)),
            "canaries need each region's reader and ingest, in one order"
        );
        let canaries = Arc::new(Mutex::new(Canaries::new(
            readers.iter().map(|r| r.name.clone()),
        )));
        let (stop_watching, watching) = tokio::sync::watch::channel(false);
        let watchers = readers
            .iter()
            .map(|r| {
                tokio::spawn(watch(
                    r.clone(),
                    poll.clone(),
                    canaries.clone(),
                    watching.clone(),
                ))
            })
            .collect();
        let started = Instant::now();
        while !canaries.lock().expect("canaries").ready() {
            if started.elapsed() > Duration::from_secs(15) {
                let _ = stop_watching.send(true);
                let silent: Vec<String> = readers
                    .iter()
                    .filter(|r| {
                        !canaries
                            .lock()
                            .expect("canaries")
                            .baseline
                            .contains_key(&r.name)
                    })
                    .map(|r| r.name.clone())
                    .collect();
                anyhow::bail!(
                    "no results stream of poll {poll} from {} within 15 s",
                    silent.join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (stop_sending, sending) = tokio::sync::watch::channel(false);
        let sender = tokio::spawn(send(
            ingests,
            poll,
            voter_prefix,
            bearer,
            canaries.clone(),
            sending,
        ));
        Ok(Self {
            canaries,
            stop_sending,
            stop_watching,
            sender,
            watchers,
        })
    }

    /// Stops sending, waits up to `within` for every region to show every canary acknowledged,
    /// and reports each region's freshness.
    pub async fn finish(self, within: Duration) -> BTreeMap<String, Freshness> {
        let _ = self.stop_sending.send(true);
        let _ = self.sender.await;
        let started = Instant::now();
        while !self.canaries.lock().expect("canaries").all_seen() && started.elapsed() < within {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.stop_watching.send(true);
        for w in self.watchers {
            let _ = w.await;
        }
        let report = self.canaries.lock().expect("canaries").report();
        report
    }
}

/// Follows `region`'s event stream of the canary poll until `stop`, reconnecting when it drops.
pub async fn watch(
    region: RegionLink,
    poll: String,
    canaries: Arc<Mutex<Canaries>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let path = format!("/v1/polls/{poll}/results/stream");
    loop {
        let stream = async {
            let mut sender = bench::load::connect(region.endpoint.clone()).await?;
            let req = hyper::Request::get(&path)
                .header("host", &region.authority)
                .header("accept", "text/event-stream")
                .body(Full::new(Bytes::new()))?;
            let resp = sender.send_request(req).await?;
            anyhow::ensure!(resp.status() == 200, "stream: {}", resp.status());
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                let now = Instant::now();
                buf.extend_from_slice(&data);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = buf.drain(..end + 2).collect();
                    for line in event.split(|b| *b == b'\n') {
                        if let Some(json) = line.strip_prefix(b"data: ") {
                            if let Ok(v) = serde_json::from_slice(json) {
                                canaries.lock().expect("canaries").shown(
                                    &region.name,
                                    counts(&v),
                                    now,
                                );
                            }
                        }
                    }
                }
            }
            anyhow::Ok(())
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = stream => {}
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Sends a canary every [`EVERY`] until `stop`, to each region's ingest in turn, each from a
/// voter of its own; `bearer` gives a voter's `Authorization` header.
pub async fn send(
    regions: Vec<RegionLink>,
    poll: String,
    voter_prefix: String,
    bearer: Bearer,
    canaries: Arc<Mutex<Canaries>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let path = format!("/v1/polls/{poll}/votes");
    let mut senders: Vec<Option<Sender>> = regions.iter().map(|_| None).collect();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0u64.. {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let Some(option) = canaries.lock().expect("canaries").option_for(i) else {
            return;
        };
        let r = (i % regions.len() as u64) as usize;
        if senders[r].is_none() {
            senders[r] = bench::load::connect(regions[r].endpoint.clone()).await.ok();
        }
        let Some(sender) = senders[r].as_mut() else {
            // Not even connected: nothing was sent, so nothing can be counted.
            continue;
        };
        let voter = format!("{voter_prefix}-{i}");
        let req = hyper::Request::post(&path)
            .header("host", &regions[r].authority)
            .header("content-type", "application/json")
            .header("authorization", &*bearer(&voter))
            .body(Full::new(Bytes::from(format!(
                r#"{{"option":"c{option}"}}"#
            ))))
            .expect("a valid request");
        let answer = match sender.ready().await {
            Ok(()) => sender.send_request(req).await.ok(),
            Err(_) => None,
        };
        let status = match answer {
            Some(resp) => {
                let status = resp.status().as_u16();
                let _ = resp.into_body().collect().await;
                Some(status)
            }
            None => {
                senders[r] = None;
                None
            }
        };
        let acked = (status == Some(202)).then(Instant::now);
        canaries
            .lock()
            .expect("canaries")
            .answered(option, r, acked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts_of(pairs: &[(usize, u64)]) -> [u64; OPTIONS] {
        let mut c = [0; OPTIONS];
        for (o, n) in pairs {
            c[*o] = *n;
        }
        c
    }

    #[test]
    fn a_canary_is_as_fresh_as_the_time_from_its_ack_to_its_count() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = Canaries::new(["eu".to_string(), "us".to_string()]);
        c.shown("eu", counts_of(&[(0, 5)]), ms(0)); // earlier canaries: the baseline
        c.shown("us", counts_of(&[(0, 5)]), ms(0));
        c.answered(0, 0, Some(ms(100)));
        c.answered(1, 1, Some(ms(200)));
        c.shown("eu", counts_of(&[(0, 6), (1, 1)]), ms(350));
        c.shown("us", counts_of(&[(0, 6)]), ms(400));
        assert_eq!(c.unseen("us"), 1);
        assert!(!c.all_seen());
        c.shown("us", counts_of(&[(0, 6), (1, 1)]), ms(900));
        assert!(c.all_seen());
        let r = c.report();
        assert_eq!(r["eu"].samples, 2);
        assert_eq!(r["eu"].max, 250.0);
        assert_eq!(r["eu"].p50, 150.0);
        assert_eq!(r["us"].max, 700.0);
        assert_eq!(r["us"].p50, 300.0);
        // By where each canary was sent: eu's to eu's ingest, us's to us's.
        assert_eq!(r["us"].from["eu"].max, 300.0);
        assert_eq!(r["us"].from["us"].max, 700.0);
        assert_eq!(r["eu"].from["us"].p99, 150.0);
    }

    #[test]
    fn results_that_show_a_canary_before_its_answer_arrives_count_as_zero() {
        let t0 = Instant::now();
        let mut c = Canaries::new(["eu".to_string()]);
        c.shown("eu", [0; OPTIONS], t0);
        c.shown("eu", counts_of(&[(3, 1)]), t0 + Duration::from_millis(5));
        c.answered(3, 0, Some(t0 + Duration::from_millis(9)));
        assert_eq!(c.report()["eu"].samples, 1);
        assert_eq!(c.report()["eu"].max, 0.0);
        assert!(c.all_seen());
    }

    #[test]
    fn an_unacknowledged_canary_retires_its_option() {
        let mut c = Canaries::new(["eu".to_string()]);
        assert_eq!(c.option_for(2), Some(2));
        c.answered(2, 0, None);
        assert_eq!(c.option_for(2), Some(3));
        for o in 0..OPTIONS {
            c.answered(o, 0, None);
        }
        assert_eq!(c.option_for(0), None);
    }
}
