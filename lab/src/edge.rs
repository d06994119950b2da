//! The local edge: what Route53 does for real voters, done for simulated ones. It health-checks
//! every region's ingest as Route53's health checks would (faster: a local stack is watched in
//! fractions of a second, not the 10 s x 3 of `regions/topology/zone.toml`), and sends each
//! group of voters where Route53's answer for their location says, over the records `tally
//! regions sync` writes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use model::RegionName;
use regions::{home_region, Location, Record, Topology, VOTER_MIX};

use crate::local::Stack;

/// How often each region's ingest is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Failed probes in a row before a region is unhealthy (one success makes it healthy again).
pub const FAILURE_THRESHOLD: u32 = 2;

/// A change of route: at `at` seconds after the edge started, `continent`'s voters went to `region`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteChange {
    pub at: f64,
    pub continent: String,
    pub region: String,
}

pub struct Edge {
    topology: Topology,
    records: Vec<Record>,
    /// Each region's ingest address and health, in the stack's order.
    ingest: Vec<(RegionName, SocketAddr, AtomicBool)>,
    /// The continents routed, and where each goes now.
    routes: RwLock<Vec<(String, SocketAddr)>>,
    started: Instant,
    pub changes: Mutex<Vec<RouteChange>>,
}

impl Edge {
    pub fn new(stack: &Stack, topology: Topology) -> anyhow::Result<Arc<Self>> {
        let records = regions::records(&topology);
        let mut ingest = Vec::new();
        for r in &stack.regions {
            ingest.push((
                RegionName::new(&r.name)?,
                SocketAddr::from(([127, 0, 0, 1], r.ingest)),
                AtomicBool::new(true),
            ));
        }
        let edge = Arc::new(Edge {
            topology,
            records,
            ingest,
            routes: RwLock::new(Vec::new()),
            started: Instant::now(),
            changes: Mutex::new(Vec::new()),
        });
        let routes = VOTER_MIX
            .iter()
            .map(|(c, _)| Ok((c.to_string(), edge.answer(c)?)))
            .collect::<anyhow::Result<_>>()?;
        *edge.routes.write().expect("routes") = routes;
        Ok(edge)
    }

    fn answer(&self, continent: &str) -> anyhow::Result<SocketAddr> {
        let healthy = |r: &RegionName| {
            self.ingest
                .iter()
                .find(|(n, _, _)| n == r)
                .is_none_or(|(_, _, h)| h.load(Ordering::Relaxed))
        };
        let region = regions::route(
            &self.topology,
            &self.records,
            &healthy,
            &Location::continent(continent),
        )
        .ok_or_else(|| anyhow::anyhow!("Route53 has no answer for voters in {continent}"))?;
        self.ingest
            .iter()
            .find(|(n, _, _)| *n == region.name)
            .map(|(_, a, _)| *a)
            .ok_or_else(|| anyhow::anyhow!("region {} is not in the local stack", region.name))
    }

    /// The region voters of `continent` go to while every region is healthy.
    pub fn home_region(&self, continent: &str) -> String {
        home_region(&self.topology, &self.records, continent)
    }

    /// Where voters of `continent` are sent now.
    pub fn route(&self, continent: &str) -> SocketAddr {
        let routes = self.routes.read().expect("routes");
        routes
            .iter()
            .find(|(c, _)| c == continent)
            .map(|(_, a)| *a)
            .unwrap_or(routes[0].1)
    }

    pub fn healthy(&self, region: &str) -> bool {
        self.ingest
            .iter()
            .any(|(n, _, h)| n.as_str() == region && h.load(Ordering::Relaxed))
    }

    /// Probes every region until `stop`, re-routing when a region's health changes.
    pub async fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut failures = vec![0u32; self.ingest.len()];
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let mut changed = false;
            for (i, (_, addr, healthy)) in self.ingest.iter().enumerate() {
                let addr = addr.to_string();
                let up = tokio::task::spawn_blocking(move || {
                    servers::http_status(&addr, "/readyz") == Some(200)
                })
                .await
                .unwrap_or(false);
                failures[i] = if up { 0 } else { failures[i] + 1 };
                let now = failures[i] < FAILURE_THRESHOLD;
                changed |= healthy.swap(now, Ordering::Relaxed) != now;
            }
            if changed {
                self.reroute();
            }
        }
    }

    fn reroute(&self) {
        let at = self.started.elapsed().as_secs_f64();
        let mut routes = self.routes.write().expect("routes");
        for (continent, addr) in routes.iter_mut() {
            let Ok(new) = self.answer(continent) else {
                continue;
            };
            if new != *addr {
                *addr = new;
                let region = self
                    .ingest
                    .iter()
                    .find(|(_, a, _)| *a == new)
                    .map(|(n, _, _)| n.to_string())
                    .unwrap_or_default();
                self.changes.lock().expect("changes").push(RouteChange {
                    at,
                    continent: continent.clone(),
                    region,
                });
            }
        }
    }
}
