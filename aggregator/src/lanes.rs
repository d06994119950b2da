//! From chunks to lanes: each chunk a reader hands on is split by voter over the writer lanes
//! (one voter's votes always go to one lane, so concurrent batches never wait on each other's
//! ballot rows), and each lane's batcher decides when its batch goes to its writer.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_queue::ArrayQueue;
use model::Vote;
use tokio::sync::mpsc;

use crate::ack::{self, Pending};
use crate::batch::{Batch, Batcher, Weighed};
use crate::pop::Chunk;

/// The votes of one chunk that belong to one writer lane.
pub struct Part {
    pub chunk: Arc<Pending>,
    pub votes: Vec<Vote>,
    pub bytes: usize,
}

impl Weighed for Part {
    fn events(&self) -> usize {
        self.votes.len()
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Chunk {
    /// Splits the chunk by voter over `lanes` writers: one voter's votes always go to one lane,
    /// so concurrent batches never wait on each other's ballot rows. Returns the parts (empty
    /// lanes left out) and, when no lane got a vote, the chunk to acknowledge at once.
    pub fn split(self, lanes: usize) -> (Vec<(usize, Part)>, Option<Arc<Pending>>) {
        let mut by_lane: Vec<Vec<Vote>> = (0..lanes).map(|_| Vec::new()).collect();
        for v in self.votes {
            by_lane[model::shard_of(v.poll.as_str(), v.voter.as_str(), lanes as u32) as usize]
                .push(v);
        }
        let used = by_lane.iter().filter(|v| !v.is_empty()).count();
        let per_vote = self.bytes / (by_lane.iter().map(Vec::len).sum::<usize>().max(1));
        let pending = Arc::new(Pending {
            shard: self.shard,
            key: self.key,
            held: self.held,
            dead: self.dead,
            remaining: AtomicUsize::new(used),
            committed: Default::default(),
            _claim: self._claim,
        });
        if used == 0 {
            return (Vec::new(), Some(pending));
        }
        let parts = by_lane
            .into_iter()
            .enumerate()
            .filter(|(_, v)| !v.is_empty())
            .map(|(lane, votes)| {
                (
                    lane,
                    Part {
                        chunk: pending.clone(),
                        bytes: votes.len() * per_vote,
                        votes,
                    },
                )
            })
            .collect();
        (parts, None)
    }
}

/// Each writer lane's batcher and the channel to its writer.
pub struct Lanes {
    batchers: Vec<Batcher<Part>>,
    writers: Vec<mpsc::Sender<Batch<Part>>>,
}

impl Lanes {
    pub fn new(config: crate::BatchConfig, writers: Vec<mpsc::Sender<Batch<Part>>>) -> Self {
        Self {
            batchers: writers.iter().map(|_| Batcher::new(config)).collect(),
            writers,
        }
    }

    /// When the oldest forming batch is due, if any is forming.
    pub fn deadline(&self) -> Option<Instant> {
        self.batchers.iter().filter_map(Batcher::deadline).min()
    }

    /// Splits every chunk the readers queued over the lanes, sending each batch that fills. A
    /// chunk with nothing to write (only dead letters) is acknowledged at once.
    pub async fn take(
        &mut self,
        queue: &ArrayQueue<Chunk>,
        acks: &[Arc<shard::Link>],
        region: &str,
        retry_max: std::time::Duration,
    ) {
        let now = Instant::now();
        while let Some(chunk) = queue.pop() {
            let (parts, nothing_to_write) = chunk.split(self.batchers.len());
            if let Some(pending) = nothing_to_write {
                let link = acks[pending.shard].clone();
                let region = region.to_string();
                tokio::spawn(async move { ack::ack(&link, &pending, &region, retry_max).await });
            }
            for (lane, part) in parts {
                if let Some(b) = self.batchers[lane].push(part, now) {
                    let _ = self.writers[lane].send(b).await;
                }
            }
        }
    }

    /// Sends every batch whose first chunk has waited its timeout.
    pub async fn flush_due(&mut self, now: Instant) {
        for (lane, batcher) in self.batchers.iter_mut().enumerate() {
            if let Some(b) = batcher.poll(now) {
                let _ = self.writers[lane].send(b).await;
            }
        }
    }

    /// Sends what every lane holds, and closes the lanes: their writers end once written.
    pub async fn flush_all(mut self) {
        for (lane, batcher) in self.batchers.iter_mut().enumerate() {
            if let Some(b) = batcher.flush() {
                let _ = self.writers[lane].send(b).await;
            }
        }
    }
}
