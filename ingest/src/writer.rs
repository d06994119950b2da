//! A shard's writer, the driver of the group-commit decision in [`crate::group`]: it forms
//! batches from the shard's accumulator as the decision says, drives up to `max_in_flight`
//! writes at once, and each write answers its own votes. Votes for one shard queue up while its
//! writes are in flight and, below saturation, for up to a linger; a dead or slow shard holds
//! only its own requests.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use model::RegionName;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::accumulator::{lock, Accumulator, Batch, StoreError};
use crate::group::{Arrivals, Forming, GroupCommit, Next};

/// How long a shard may take to answer a write or a probe.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the shard's writes and probes last learnt of it.
#[derive(Default)]
pub(crate) struct Status {
    /// Votes it holds, stored and not yet acknowledged by an aggregator.
    pub(crate) depth: AtomicU64,
    pub(crate) up: AtomicBool,
}

/// One shard's votes on their way to its writer.
pub(crate) struct Queue {
    pub(crate) accumulator: Mutex<Accumulator>,
    pub(crate) lingering: Lingering,
    /// Set once the server is stopping: batches no longer linger for votes that may not come.
    pub(crate) stopping: AtomicBool,
    /// Set once the shard is gone: its writer writes what is left and stops.
    pub(crate) closed: AtomicBool,
}

impl Queue {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Accumulator> {
        lock(&self.accumulator)
    }

    /// The first batch's size and oldest vote, if any vote waits.
    fn first(&self) -> Option<(usize, Instant)> {
        self.lock().batches.front().map(|b| (b.len(), b.oldest))
    }
}

/// Whether any voter could still vote: the open connections that have voted against the votes
/// every shard holds unanswered. An HTTP/1 connection carries one request at a time, so once
/// every such connection's vote is waiting, no vote from a voter seen so far can join a batch
/// until some are answered. Connections that never voted (probes, scrapes, clients refused or
/// too slow to send a request) are not waited for.
pub(crate) struct Census {
    pub(crate) voting: web::Enlisted,
    pub(crate) unanswered: AtomicUsize,
}

impl Census {
    pub(crate) fn more_may_come(&self) -> bool {
        self.unanswered.load(Ordering::Relaxed) < self.voting.get()
    }
}

/// How a writer learns of votes without being woken per vote: a vote that finds the shard's queue
/// empty wakes it, and while it lingers each vote that arrives checks whether the batch is now
/// big enough, its linger over or nobody else able to join, and wakes the writer if so. Under load that
/// ends a linger to the microsecond; tokio's timer, which the writer also sets for when no vote
/// comes, fires only on its next millisecond tick.
pub(crate) struct Lingering {
    pub(crate) wake: Notify,
    /// When the batch being formed may go, in nanoseconds since `epoch`; `u64::MAX` while the
    /// writer is not lingering.
    until: AtomicU64,
    epoch: Instant,
    pub(crate) group: GroupCommit,
    pub(crate) census: Arc<Census>,
}

impl Lingering {
    pub(crate) fn new(group: GroupCommit, census: Arc<Census>) -> Self {
        Self {
            wake: Notify::new(),
            until: AtomicU64::new(u64::MAX),
            epoch: Instant::now(),
            group,
            census,
        }
    }

    /// A vote was queued at `at`, leaving `forming` votes in the batch the writer forms. A writer
    /// waiting for a slot needs no word: a slot wakes it.
    pub(crate) fn arrived(&self, at: Instant, forming: usize) {
        if forming == 1 {
            // The writer may be waiting for a first vote.
            self.wake.notify_one();
            return;
        }
        let until = self.until.load(Ordering::Relaxed);
        if until == u64::MAX {
            return;
        }
        if self.group.is_enough(forming) || self.nanos(at) >= until || !self.census.more_may_come()
        {
            self.wake.notify_one();
        }
    }

    fn begin(&self, until: Instant) {
        self.until.store(self.nanos(until), Ordering::Relaxed);
    }

    fn end(&self) {
        self.until.store(u64::MAX, Ordering::Relaxed);
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

/// What every write of one shard's writer is formed and bounded by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriteSettings {
    pub(crate) group: GroupCommit,
    pub(crate) wait_replicas: u32,
    pub(crate) store_timeout: Duration,
}

/// One shard's writer: forms batches as [`GroupCommit::next`] decides and drives up to
/// `max_in_flight` writes at once; each write answers its own votes.
pub(crate) async fn write_loop(
    index: u32,
    status: Weak<Status>,
    link: Arc<shard::Link>,
    queue: Arc<Queue>,
    write: WriteSettings,
    region: RegionName,
) {
    let group = write.group;
    let lingering = &queue.lingering;
    let index = index.to_string();
    let batch_size = metrics::histogram!("tally_ingest_group_commit_size", "region" => region.to_string(), "shard" => index);
    // Counted here, a batch at a time, rather than by each vote's request: one shared count
    // written from both cores on every vote was a cache line moving between them.
    let accepted = metrics::counter!("tally_ingest_votes_total", "region" => region.to_string(), "outcome" => "accepted");
    let mut writes = FuturesUnordered::new();
    let mut arrivals = Arrivals::default();
    let linger = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(linger);
    loop {
        let (queued, oldest) = match queue.first() {
            Some(first) => first,
            // Checked after the queue: a vote that came before the shard went is still written.
            None if queue.closed.load(Ordering::Relaxed) => break,
            // Nothing forming: wait for a batch's first vote, finishing writes meanwhile.
            None => {
                tokio::select! {
                    biased;
                    Some(()) = writes.next() => {}
                    () = lingering.wake.notified() => {}
                }
                continue;
            }
        };
        let now = Instant::now();
        let forming = Forming {
            queued,
            oldest,
            in_flight: writes.len(),
            more_may_come: !queue.stopping.load(Ordering::Relaxed)
                && lingering.census.more_may_come(),
            gap: arrivals.gap(now, queued),
        };
        // Waiting, then deciding again on the batch as it is by then; only the writer takes
        // batches, so the first one is still there.
        match group.next(forming, now) {
            Next::Cut => {}
            Next::WaitForSlot => {
                writes.next().await;
                continue;
            }
            Next::LingerUntil(until) => {
                lingering.begin(until);
                linger.as_mut().reset(until);
                tokio::select! {
                    biased;
                    Some(()) = writes.next() => {}
                    () = lingering.wake.notified() => {}
                    () = &mut linger => {}
                }
                lingering.end();
                continue;
            }
        }
        // One pass of the scheduler first: connection tasks that are already runnable add their
        // votes before the batch is cut (measured at 256 connections without a linger: 14 -> 23
        // votes a write, 14% less Redis CPU a vote). With nothing else runnable this returns at
        // once.
        tokio::task::yield_now().await;
        let Some(batch) = queue.lock().take_first() else {
            continue;
        };
        batch_size.record(batch.len() as f64);
        arrivals.written(Instant::now(), batch.len());
        writes.push(write_batch(
            batch,
            link.clone(),
            status.clone(),
            queue.clone(),
            write,
            &accepted,
        ));
    }
    // The shard is gone and its queue empty: finish the writes still in flight before returning.
    while writes.next().await.is_some() {}
}

/// Writes one batch as one list element, its votes counted into [`model::queue::STORED`] in the
/// same transaction (and `WAIT`s for replicas), then answers each of its votes, counting them in
/// `accepted` first when they are stored.
async fn write_batch(
    mut batch: Batch,
    link: Arc<shard::Link>,
    status: Weak<Status>,
    queue: Arc<Queue>,
    settings: WriteSettings,
    accepted: &metrics::Counter,
) {
    let votes = batch.len();
    let mut pipe = redis::Pipeline::with_capacity(5);
    pipe.cmd("MULTI").ignore();
    pipe.cmd("RPUSH")
        .arg(model::queue::VOTES)
        .arg(&batch.buffers.bytes)
        .ignore();
    pipe.cmd("INCRBY")
        .arg(model::queue::STORED)
        .arg(votes)
        .ignore();
    pipe.cmd("EXEC");
    let wait_replicas = settings.wait_replicas;
    if wait_replicas > 0 {
        pipe.cmd("WAIT")
            .arg(wait_replicas)
            .arg(RESPONSE_TIMEOUT.as_millis() as u64 / 2);
    }
    // The first vote is the oldest, so its deadline bounds the whole write.
    let deadline = batch.oldest + settings.store_timeout;
    let reply = match link.get() {
        _ if Instant::now() >= deadline => None,
        Err(e) => Some(Err(e)),
        Ok(mut conn) => {
            tokio::time::timeout_at(deadline, pipe.query_async::<Vec<redis::Value>>(&mut conn))
                .await
                .ok()
                .map(|r| r.and_then(|r| Written::from_replies(&r).map_err(Into::into)))
        }
    };
    let outcome = match reply {
        // Not confirmed in time: not acknowledged, though Redis may still store it (a retry
        // is a re-vote, which the ballot upsert counts once).
        None => Err(StoreError::Timeout),
        Some(Ok(w)) if w.replicas < wait_replicas as u64 => {
            // Stored on the primary but not on enough replicas: a failover could lose it, so it
            // is not acknowledged (a retry is a re-vote, counted once).
            Err(StoreError::Unreplicated)
        }
        Some(Ok(w)) => {
            if let Some(s) = status.upgrade() {
                s.depth.store(w.stored, Ordering::Relaxed);
            }
            accepted.increment(votes as u64);
            Ok(())
        }
        Some(Err(e)) => {
            link.report(&e);
            tracing::warn!(error = %e, "shard write failed");
            if let Some(s) = status.upgrade() {
                s.up.store(false, Ordering::Relaxed);
            }
            Err(StoreError::Unavailable)
        }
    };
    queue
        .lingering
        .census
        .unanswered
        .fetch_sub(votes, Ordering::Relaxed);
    batch.settle(outcome);
    let buffers = std::mem::take(&mut batch.buffers);
    queue.lock().recycle(buffers);
}

/// What Redis said to a write: the shard's stored votes after it, and the replicas that have it
/// (0 when the write did not `WAIT`).
struct Written {
    stored: u64,
    replicas: u64,
}

impl Written {
    /// Replies are `EXEC`'s (the list's length, the count) and then `WAIT`'s, if sent.
    fn from_replies(replies: &[redis::Value]) -> Result<Self, redis::ParsingError> {
        let exec = replies.first().ok_or("no reply to EXEC")?;
        let (_elements, stored): (u64, i64) = redis::from_redis_value_ref(exec)?;
        let replicas = match replies.get(1) {
            Some(wait) => redis::from_redis_value_ref(wait)?,
            None => 0,
        };
        Ok(Self {
            stored: model::queue::stored_votes(Some(stored)),
            replicas,
        })
    }
}
