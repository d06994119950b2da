//! The poll catalog, cached in memory and refreshed from PostgreSQL in the background, so no
//! vote ever waits on a database query.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use model::Catalog;

use crate::DbError;

#[derive(Default)]
pub struct CatalogCache {
    /// Read on every vote by every worker: `ArcSwap` reads without writing to a shared cache
    /// line, where a lock and a reference count bounced one between the cores on each read.
    current: ArcSwap<Catalog>,
    loaded: AtomicBool,
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
        self.current.store(Arc::new(catalog));
        self.loaded.store(true, Ordering::Relaxed);
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
                match crate::load_polls(c).await {
                    Ok(polls) => match cache.upgrade() {
                        Some(cache) => cache.replace(Catalog::new(polls)),
                        None => return,
                    },
                    Err(e) => tracing::warn!(error = %e, "catalog: refresh failed"),
                }
            }
            tokio::time::sleep(every).await;
        }
    }
}
