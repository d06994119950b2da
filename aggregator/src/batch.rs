//! Batch assembly, without IO: chunks of votes (one Redis move each) go in, batches come out
//! when they reach `max_events` or `max_bytes`, or when their first chunk has waited `timeout`.
//! The driver passes the clock in, so every rule here is checked by property tests.

use std::time::Instant;

use crate::config::BatchConfig;

/// Anything with a size in events and bytes.
pub trait Weighed {
    fn events(&self) -> usize;
    fn bytes(&self) -> usize;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushReason {
    Events,
    Bytes,
    Timeout,
    Shutdown,
}

impl FlushReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FlushReason::Events => "events",
            FlushReason::Bytes => "bytes",
            FlushReason::Timeout => "timeout",
            FlushReason::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug)]
pub struct Batch<T> {
    pub items: Vec<T>,
    pub events: usize,
    pub bytes: usize,
    pub reason: FlushReason,
}

#[derive(Debug)]
pub struct Batcher<T> {
    config: BatchConfig,
    items: Vec<T>,
    events: usize,
    bytes: usize,
    opened: Option<Instant>,
}

impl<T: Weighed> Batcher<T> {
    pub fn new(config: BatchConfig) -> Self {
        Self {
            config,
            items: Vec::new(),
            events: 0,
            bytes: 0,
            opened: None,
        }
    }

    /// Adds a chunk; returns the batch if this chunk filled it. A chunk is never split, so one
    /// larger than the limits leaves as a batch of its own.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Batch<T>> {
        if self.items.is_empty() {
            self.opened = Some(now);
        }
        self.events += item.events();
        self.bytes += item.bytes();
        self.items.push(item);
        if self.events >= self.config.max_events {
            self.take(FlushReason::Events)
        } else if self.bytes >= self.config.max_bytes {
            self.take(FlushReason::Bytes)
        } else {
            None
        }
    }

    /// The batch, if its first chunk has waited `timeout` by `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch<T>> {
        match self.opened {
            Some(t) if now.duration_since(t) >= self.config.timeout => {
                self.take(FlushReason::Timeout)
            }
            _ => None,
        }
    }

    /// When [`Batcher::poll`] will next return a batch, if anything is pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened.map(|t| t + self.config.timeout)
    }

    /// Whatever is pending, for shutdown.
    pub fn flush(&mut self) -> Option<Batch<T>> {
        if self.items.is_empty() {
            None
        } else {
            self.take(FlushReason::Shutdown)
        }
    }

    fn take(&mut self, reason: FlushReason) -> Option<Batch<T>> {
        let batch = Batch {
            items: std::mem::take(&mut self.items),
            events: self.events,
            bytes: self.bytes,
            reason,
        };
        self.events = 0;
        self.bytes = 0;
        self.opened = None;
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[derive(Debug, Clone, PartialEq)]
    struct C(usize, usize, u32);
    impl Weighed for C {
        fn events(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> usize {
            self.1
        }
    }

    fn cfg() -> BatchConfig {
        BatchConfig {
            max_events: 100,
            max_bytes: 1_000,
            timeout: Duration::from_millis(10),
        }
    }

    #[test]
    fn flushes_by_events_bytes_and_time() {
        let t0 = Instant::now();
        let mut b = Batcher::new(cfg());
        assert!(b.push(C(60, 10, 0), t0).is_none());
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(10)));
        let full = b.push(C(40, 10, 1), t0).unwrap();
        assert_eq!((full.events, full.reason), (100, FlushReason::Events));
        assert!(b.deadline().is_none());
        let big = b.push(C(1, 5_000, 2), t0).unwrap();
        assert_eq!(big.reason, FlushReason::Bytes);
        b.push(C(1, 1, 3), t0);
        assert!(b.poll(t0 + Duration::from_millis(9)).is_none());
        assert_eq!(
            b.poll(t0 + Duration::from_millis(10)).unwrap().reason,
            FlushReason::Timeout
        );
        assert!(b.flush().is_none());
    }

    proptest! {
        /// Every chunk comes out exactly once, in order; no batch exceeds a limit by more than its
        /// last chunk; only the last batch of a stream may be under the limits without a timeout.
        #[test]
        fn every_chunk_exactly_once_in_order_within_limits(
            chunks in proptest::collection::vec((1usize..150, 1usize..1_500, 0u64..15), 0..200)
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Batcher::new(cfg());
            let mut out: Vec<Batch<C>> = Vec::new();
            for (i, (events, bytes, wait)) in chunks.iter().copied().enumerate() {
                now += Duration::from_millis(wait);
                if let Some(batch) = b.poll(now) { out.push(batch); }
                if let Some(batch) = b.push(C(events, bytes, i as u32), now) { out.push(batch); }
            }
            if let Some(batch) = b.flush() { out.push(batch); }
            let seen: Vec<u32> = out.iter().flat_map(|x| x.items.iter().map(|c| c.2)).collect();
            prop_assert_eq!(seen, (0..chunks.len() as u32).collect::<Vec<_>>());
            for batch in &out {
                let last = batch.items.last().unwrap();
                prop_assert_eq!(batch.events, batch.items.iter().map(|c| c.0).sum::<usize>());
                prop_assert!(batch.events - last.0 < cfg().max_events);
                prop_assert!(batch.bytes - last.1 < cfg().max_bytes);
                match batch.reason {
                    FlushReason::Events => prop_assert!(batch.events >= cfg().max_events),
                    FlushReason::Bytes => prop_assert!(batch.bytes >= cfg().max_bytes),
                    FlushReason::Timeout | FlushReason::Shutdown => {
                        prop_assert!(batch.events < cfg().max_events && batch.bytes < cfg().max_bytes)
                    }
                }
            }
        }
    }
}
