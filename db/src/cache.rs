//! The poll catalog, cached in memory and refreshed from PostgreSQL in the background, so no
//! vote ever waits on a database query.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use model::Catalog;

use crate::DbError;

pub struct CatalogCache {
    /// Read on every vote by every worker: `ArcSwap` reads without writing to a shared cache
    /// line, where a lock and a reference count bounced one between the cores on each read.
    current: ArcSwap<Catalog>,
    loaded: AtomicBool,
    /// When the catalog was last read, in milliseconds since `epoch`.
    refreshed_ms: AtomicU64,
    epoch: Instant,
    /// The database's clock less this host's, in microseconds, from the last read that came back
    /// quickly enough to tell; `i64::MIN` until one has.
    clock_offset_us: AtomicI64,
}

impl Default for CatalogCache {
    fn default() -> Self {
        Self {
            current: ArcSwap::default(),
            loaded: AtomicBool::new(false),
            refreshed_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            clock_offset_us: AtomicI64::new(i64::MIN),
        }
    }
}

/// A clock reading whose round trip took longer than this says too little about the offset.
const CLOCK_READING_MAX_ROUND_TRIP: Duration = Duration::from_millis(200);

fn system_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

impl CatalogCache {
    /// The catalog, to keep (across an `.await`, say).
    pub fn get(&self) -> Arc<Catalog> {
        self.current.load_full()
    }

    /// The catalog for a look on the spot, not to be held across an `.await`.
    pub fn load(&self) -> Guard<Arc<Catalog>> {
        self.current.load()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Reads the catalog now (for a poll created a moment ago that a vote already names).
    pub async fn reload(&self, url: &str) -> Result<(), DbError> {
        let client = crate::connect(url).await?;
        self.replace(Catalog::new(crate::load_polls(&client).await?));
        Ok(())
    }

    pub fn replace(&self, catalog: Catalog) {
        self.replace_as_of(catalog, Duration::ZERO);
    }

    /// Replaces the catalog with one that was already `stale` when read (a replica's lag).
    fn replace_as_of(&self, catalog: Catalog, stale: Duration) {
        self.current.store(Arc::new(catalog));
        self.loaded.store(true, Ordering::Relaxed);
        let as_of = self.epoch.elapsed().saturating_sub(stale);
        self.refreshed_ms
            .fetch_max(as_of.as_millis() as u64, Ordering::Relaxed);
    }

    /// How long before `now` the catalog was last read (`None`: never). Takes the caller's
    /// clock reading: one is dear on a vote's path.
    pub fn age_at(&self, now: Instant) -> Option<Duration> {
        self.is_loaded().then(|| {
            let now = now.saturating_duration_since(self.epoch).as_millis() as u64;
            Duration::from_millis(now.saturating_sub(self.refreshed_ms.load(Ordering::Relaxed)))
        })
    }

    /// The database's clock less this host's, in microseconds (`None`: not measured yet).
    pub fn clock_offset_us(&self) -> Option<i64> {
        Some(self.clock_offset_us.load(Ordering::Relaxed)).filter(|&o| o != i64::MIN)
    }

    /// Reads the database's clock between two readings of ours and keeps the offset, when the
    /// round trip was short enough to tell.
    async fn measure_clock(&self, client: &crate::Client) -> Result<(), DbError> {
        let (sent, before) = (Instant::now(), system_micros());
        let row = client
            .query_one(
                "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8",
                &[],
            )
            .await?;
        let round_trip = sent.elapsed();
        let after = system_micros();
        if round_trip <= CLOCK_READING_MAX_ROUND_TRIP {
            let theirs: i64 = row.get(0);
            self.clock_offset_us
                .store(theirs - (before + after) / 2, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Re-reads the catalog every `every`, reconnecting as needed; keeps the last good catalog
    /// while PostgreSQL is unreachable. Returns when the cache is dropped.
    pub async fn refresh_loop(cache: std::sync::Weak<CatalogCache>, url: String, every: Duration) {
        let mut client: Option<crate::Client> = None;
        loop {
            if cache.strong_count() == 0 {
                return;
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                client = crate::connect(&url)
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "catalog: cannot connect"))
                    .ok();
            }
            if let Some(c) = &client {
                // A replica answers with what it has replayed: its lag is the catalog's age
                // when read, and a replica that cannot tell (cut off) makes the catalog no fresher.
                let read = tokio::try_join!(crate::load_polls(c), async {
                    crate::freshness(c).await.map(|f| f.lag_ms)
                });
                match read {
                    Ok((polls, lag_ms)) => match cache.upgrade() {
                        Some(cache) => {
                            match lag_ms {
                                Some(ms) => cache.replace_as_of(
                                    Catalog::new(polls),
                                    Duration::from_secs_f64(ms.max(0.0) / 1000.0),
                                ),
                                None => {
                                    cache.current.store(Arc::new(Catalog::new(polls)));
                                    cache.loaded.store(true, Ordering::Relaxed);
                                }
                            }
                            if let Err(e) = cache.measure_clock(c).await {
                                tracing::warn!(error = %e, "catalog: reading the clock failed");
                            }
                        }
                        None => return,
                    },
                    Err(e) => tracing::warn!(error = %e, "catalog: refresh failed"),
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}
