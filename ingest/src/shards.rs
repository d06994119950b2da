//! The region's Redis shards, each with a group-commit writer: votes for one shard queue up while
//! that shard's writes are in flight (and, below saturation, for up to a linger: see
//! [`crate::group`]), then go out together as one list element (see [`model::queue`]). Each
//! vote's request is answered only after Redis replied to the write holding it. A dead or slow
//! shard holds only its own requests.
//!
//! A vote is encoded straight into the batch it joins, its task's waker beside it, and waits on
//! that batch's outcome, so it costs no allocation of its own and nothing of it is freed on the
//! writer's thread; written batches' buffers are reused.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use model::RegionName;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Config;
use crate::group::{Arrivals, Forming, GroupCommit, Next};

/// Requests waiting for one shard beyond this are refused rather than queued in memory.
const PENDING_PER_SHARD: usize = 65_536;
/// How often each shard's depth and health are probed.
const PROBE_EVERY: Duration = Duration::from_millis(250);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the vote's queue shard is unavailable")]
    Unavailable,
    #[error("the vote's queue shard is full")]
    Full,
    #[error("the vote's queue shard did not confirm the write in time")]
    Timeout,
}

/// Votes waiting for one shard's writer: batches that fill in turn, the oldest first, as a Kafka
/// producer's record accumulator keeps them. Votes join the last batch until it holds
/// `max_votes`; the writer takes the first.
#[derive(Default)]
struct Accumulator {
    batches: VecDeque<Batch>,
    /// Votes in `batches`.
    queued: usize,
    /// Buffers of written batches, for the next ones.
    spare: Vec<Buffers>,
}

/// Buffers kept for reuse: enough for the writes in flight and the batches forming meanwhile.
const SPARE_BUFFERS: usize = 8;

impl Accumulator {
    /// Adds `vote`, ready to store at `queued`, to the batch being filled, with `task` to wake
    /// when the batch is written, and returns the vote's wait for that batch's outcome and how
    /// many votes the first batch (the one a writer forms) now holds.
    fn add(
        &mut self,
        vote: &model::wire::Fields<'_>,
        queued: Instant,
        max_votes: usize,
        task: &Waker,
    ) -> (Waiting, usize) {
        if self.batches.back().is_none_or(|b| b.len() >= max_votes) {
            let buffers = self.spare.pop().unwrap_or_default();
            self.batches.push_back(Batch {
                buffers,
                oldest: queued,
                outcome: Arc::default(),
            });
        }
        let filling = self.batches.back_mut().expect("a batch was just ensured");
        filling.buffers.push(vote, task);
        let waiting = Waiting {
            outcome: filling.outcome.clone(),
            task: Registered::of(task),
        };
        self.queued += 1;
        (waiting, self.batches[0].len())
    }

    fn take_first(&mut self) -> Option<Batch> {
        let batch = self.batches.pop_front()?;
        self.queued -= batch.len();
        Some(batch)
    }

    fn recycle(&mut self, mut buffers: Buffers) {
        if self.spare.len() < SPARE_BUFFERS {
            buffers.bytes.clear();
            buffers.votes = 0;
            buffers.waiting.clear();
            self.spare.push(buffers);
        }
    }
}

/// A batch's votes, encoded back to back (the list element its write pushes), and the tasks
/// waiting for them.
#[derive(Default)]
struct Buffers {
    bytes: Vec<u8>,
    votes: usize,
    /// Registered under the accumulator's lock as each vote joins, so waiting costs a vote no
    /// lock of its own, and taken out with the batch, so waking them takes none either.
    waiting: Vec<Waker>,
}

impl Buffers {
    fn push(&mut self, vote: &model::wire::Fields<'_>, task: &Waker) {
        vote.encode_into(&mut self.bytes);
        self.votes += 1;
        self.waiting.push(task.clone());
    }
}

struct Batch {
    buffers: Buffers,
    /// When its first vote was ready to store (its body read). A write is bounded by its oldest
    /// vote's `queued + store_timeout`, so no vote needs a timer of its own.
    oldest: Instant,
    outcome: Arc<Outcome>,
}

impl Batch {
    fn len(&self) -> usize {
        self.buffers.votes
    }

    /// Tells every vote of the batch how its write ended; only the first settlement counts.
    fn settle(&mut self, result: Result<(), StoreError>) {
        if self.outcome.result.set(result).is_err() {
            return;
        }
        for task in self.buffers.waiting.drain(..) {
            task.wake();
        }
        let late = std::mem::take(&mut *lock(&self.outcome.late));
        for task in late {
            task.wake();
        }
    }
}

impl Drop for Batch {
    /// A batch dropped unwritten (its writer gone) answers its votes rather than leave them
    /// waiting; after a write this changes nothing.
    fn drop(&mut self) {
        self.settle(Err(StoreError::Unavailable));
    }
}

/// How the write of a batch ended, for every vote in it. Where tokio's `Notify` took a lock and
/// linked a waiter a vote, and the write walked them under the lock again, a vote's task is
/// registered in its batch as it joins (see [`Buffers::waiting`]).
#[derive(Default)]
struct Outcome {
    result: OnceLock<Result<(), StoreError>>,
    /// Tasks that came to wait with a waker other than the one they joined with: none for a vote
    /// awaited by its connection's task, which polls it with the same waker every time.
    late: Mutex<Vec<Waker>>,
}

/// One vote's wait for its batch's outcome.
struct Waiting {
    outcome: Arc<Outcome>,
    /// Which waker was last registered for the vote.
    task: Registered,
}

/// A waker told apart as `Waker::will_wake` does (the same data and the same vtable) without
/// holding a clone of it: a clone and its drop are two atomic operations on the task a vote. The
/// batch holds the registered waker itself until the outcome is set, so until then no other
/// waker can have its data.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Registered {
    data: usize,
    vtable: usize,
}

impl Registered {
    fn of(waker: &Waker) -> Self {
        Self {
            data: waker.data() as usize,
            vtable: std::ptr::from_ref(waker.vtable()) as usize,
        }
    }
}

impl Waiting {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
        if let Some(result) = self.outcome.result.get() {
            return Poll::Ready(*result);
        }
        if self.task == Registered::of(cx.waker()) {
            return Poll::Pending;
        }
        let mut late = lock(&self.outcome.late);
        // Looked at again under the lock: a settlement sets the result before it takes the
        // late wakers, so this one is either seen by it or sees its result.
        if let Some(result) = self.outcome.result.get() {
            return Poll::Ready(*result);
        }
        self.task = Registered::of(cx.waker());
        late.push(cx.waker().clone());
        Poll::Pending
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks can leave what they guard half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One shard's votes on their way to its writer.
struct Queue {
    accumulator: Mutex<Accumulator>,
    lingering: Lingering,
    /// Set once the server is stopping: batches no longer linger for votes that may not come.
    stopping: AtomicBool,
    /// Set once the shard is gone: its writer writes what is left and stops.
    closed: AtomicBool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Accumulator> {
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
struct Census {
    voting: web::Enlisted,
    unanswered: AtomicUsize,
}

impl Census {
    fn more_may_come(&self) -> bool {
        self.unanswered.load(Ordering::Relaxed) < self.voting.get()
    }
}

/// How a writer learns of votes without being woken per vote: a vote that finds the shard's queue
/// empty wakes it, and while it lingers each vote that arrives checks whether the batch is now
/// big enough, its linger over or nobody else able to join, and wakes the writer if so. Under load that
/// ends a linger to the microsecond; tokio's timer, which the writer also sets for when no vote
/// comes, fires only on its next millisecond tick.
struct Lingering {
    wake: Notify,
    /// When the batch being formed may go, in nanoseconds since `epoch`; `u64::MAX` while the
    /// writer is not lingering.
    until: AtomicU64,
    epoch: Instant,
    group: GroupCommit,
    census: Arc<Census>,
}

impl Lingering {
    fn new(group: GroupCommit, census: Arc<Census>) -> Self {
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
    fn arrived(&self, at: Instant, forming: usize) {
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
struct WriteSettings {
    group: GroupCommit,
    wait_replicas: u32,
    store_timeout: Duration,
}

pub struct Shard {
    index: u32,
    queue: Arc<Queue>,
    conn: ConnectionManager,
    depth: AtomicU64,
    up: AtomicBool,
    bound: u64,
    /// Added to the log line when the shard cannot be reached (see [`tls::redis_hint`]).
    hint: &'static str,
}

impl Shard {
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }

    /// Stores one vote whose request was read at `queued` (its deadline counts from there); `Ok`
    /// means Redis holds it.
    pub async fn store(
        &self,
        vote: &model::wire::Fields<'_>,
        queued: Instant,
    ) -> Result<(), StoreError> {
        if !self.is_up() {
            return Err(StoreError::Unavailable);
        }
        if self.depth() >= self.bound {
            return Err(StoreError::Full);
        }
        let lingering = &self.queue.lingering;
        let census = &lingering.census;
        // The vote joins a batch on the first poll, where its task's waker is at hand.
        let mut waiting: Option<Waiting> = None;
        std::future::poll_fn(|cx| {
            if let Some(waiting) = &mut waiting {
                return waiting.poll(cx);
            }
            census.unanswered.fetch_add(1, Ordering::Relaxed);
            let joined = {
                let mut accumulator = self.queue.lock();
                (accumulator.queued < PENDING_PER_SHARD)
                    .then(|| accumulator.add(vote, queued, lingering.group.max_votes, cx.waker()))
            };
            let Some((joined, forming)) = joined else {
                census.unanswered.fetch_sub(1, Ordering::Relaxed);
                return Poll::Ready(Err(StoreError::Full));
            };
            lingering.arrived(queued, forming);
            // Its write cannot have been settled without waking this task.
            waiting = Some(joined);
            Poll::Pending
        })
        .await
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.lingering.wake.notify_one();
    }
}

pub struct Shards {
    shards: Vec<Arc<Shard>>,
}

impl Shards {
    /// Connects lazily (a shard that is down at start-up is reported down, not fatal) and starts
    /// each shard's writer and probe. The writers stop once `Shards` is dropped and their
    /// queues are written.
    pub fn start(config: &Config) -> Result<Self, redis::RedisError> {
        let mut shards = Vec::with_capacity(config.redis_urls.len());
        let census = Arc::new(Census {
            voting: config.serve.enlisted.clone(),
            unanswered: AtomicUsize::new(0),
        });
        for (i, url) in config.redis_urls.iter().enumerate() {
            let client = tls::redis_client(url)?;
            let conn = ConnectionManager::new_lazy_with_config(
                client,
                redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500)),
            )?;
            let queue = Arc::new(Queue {
                accumulator: Mutex::default(),
                lingering: Lingering::new(config.group, census.clone()),
                stopping: AtomicBool::new(false),
                closed: AtomicBool::new(false),
            });
            let shard = Arc::new(Shard {
                index: i as u32,
                queue: queue.clone(),
                conn,
                depth: AtomicU64::new(0),
                up: AtomicBool::new(false),
                bound: config.queue_bound,
                hint: tls::redis_hint(url),
            });
            tokio::spawn(write_loop(
                Arc::downgrade(&shard),
                shard.conn.clone(),
                queue,
                WriteSettings {
                    group: config.group,
                    wait_replicas: config.wait_replicas,
                    store_timeout: config.store_timeout,
                },
                config.region.clone(),
            ));
            tokio::spawn(probe_loop(Arc::downgrade(&shard), config.region.clone()));
            shards.push(shard);
        }
        tokio::spawn(census_loop(Arc::downgrade(&census), config.region.clone()));
        Ok(Self { shards })
    }

    pub fn count(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn get(&self, index: u32) -> &Shard {
        &self.shards[index as usize]
    }

    pub fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter().map(|s| s.as_ref())
    }

    /// From now on every batch goes without waiting out its linger: the server is stopping, so
    /// its requests in flight are to be answered as soon as their votes are stored.
    pub fn stop_lingering(&self) {
        for shard in &self.shards {
            shard.queue.stopping.store(true, Ordering::Relaxed);
            shard.queue.lingering.wake.notify_one();
        }
    }

    /// Waits until every shard has answered a probe once (or `limit` passes).
    pub async fn wait_probed(&self, limit: Duration) {
        let start = tokio::time::Instant::now();
        while self.iter().any(|s| !s.is_up()) && start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One shard's writer: forms batches as [`GroupCommit::next`] decides and drives up to
/// `max_in_flight` writes at once; each write answers its own votes.
async fn write_loop(
    shard: Weak<Shard>,
    conn: ConnectionManager,
    queue: Arc<Queue>,
    write: WriteSettings,
    region: RegionName,
) {
    let group = write.group;
    let lingering = &queue.lingering;
    let index = shard
        .upgrade()
        .map(|s| s.index)
        .unwrap_or_default()
        .to_string();
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
            conn.clone(),
            shard.clone(),
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
    mut conn: ConnectionManager,
    shard: Weak<Shard>,
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
    let reply = if Instant::now() >= deadline {
        None
    } else {
        tokio::time::timeout_at(deadline, pipe.query_async::<Vec<redis::Value>>(&mut conn))
            .await
            .ok()
            .map(|r| r.and_then(|r| Written::from_replies(&r).map_err(Into::into)))
    };
    let outcome = match reply {
        // Not confirmed in time: not acknowledged, though Redis may still store it (a retry
        // is a re-vote, which the ballot upsert counts once).
        None => Err(StoreError::Timeout),
        Some(Ok(w)) if w.replicas < wait_replicas as u64 => {
            // Stored on the primary but not on enough replicas: not acknowledged.
            Err(StoreError::Unavailable)
        }
        Some(Ok(w)) => {
            if let Some(s) = shard.upgrade() {
                s.depth.store(w.stored, Ordering::Relaxed);
            }
            accepted.increment(votes as u64);
            Ok(())
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "shard write failed");
            if let Some(s) = shard.upgrade() {
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

/// Publishes the connections the linger waits for, as often as the shards are probed, until
/// the writers holding the census are gone.
async fn census_loop(census: Weak<Census>, region: RegionName) {
    let voting = metrics::gauge!("tally_ingest_voting_connections", "region" => region.to_string());
    loop {
        let Some(c) = census.upgrade() else { return };
        voting.set(c.voting.get() as f64);
        drop(c);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

async fn probe_loop(shard: Weak<Shard>, region: RegionName) {
    // Logged on the way down, not on every failed probe; `None` until the first probe.
    let mut was_up: Option<bool> = None;
    loop {
        let Some(s) = shard.upgrade() else { return };
        let mut conn = s.conn.clone();
        let probe = tokio::time::timeout(
            RESPONSE_TIMEOUT,
            redis::cmd("GET")
                .arg(model::queue::STORED)
                .query_async::<Option<i64>>(&mut conn),
        )
        .await;
        let labels = [
            ("region", region.to_string()),
            ("shard", s.index.to_string()),
        ];
        let waiting = s.queue.lock().queued;
        metrics::gauge!("tally_ingest_votes_waiting", &labels).set(waiting as f64);
        match probe {
            Ok(Ok(stored)) => {
                let depth = model::queue::stored_votes(stored);
                was_up = Some(true);
                s.depth.store(depth, Ordering::Relaxed);
                s.up.store(true, Ordering::Relaxed);
                metrics::gauge!("tally_ingest_queue_depth", &labels).set(depth as f64);
                metrics::gauge!("tally_ingest_shard_up", &labels).set(1.0);
            }
            failed => {
                if was_up != Some(false) {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {RESPONSE_TIMEOUT:?}"),
                    };
                    tracing::warn!(shard = s.index, error = %why, "queue shard unavailable{}", s.hint);
                }
                was_up = Some(false);
                s.up.store(false, Ordering::Relaxed);
                metrics::gauge!("tally_ingest_shard_up", &labels).set(0.0);
            }
        }
        drop(s);
        tokio::time::sleep(PROBE_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Stamp, VoteId};
    use proptest::prelude::*;

    fn vote(n: u64, voter: &str) -> model::wire::Fields<'_> {
        model::wire::Fields {
            id: VoteId(u128::from(n)),
            cast_at: Stamp(n),
            poll: "best-pet",
            option: "a",
            voter,
            region: "eu",
        }
    }

    proptest! {
        #[test]
        fn batches_hold_every_vote_once_in_order_and_never_more_than_max_votes(
            max_votes in 1usize..40,
            voters in proptest::collection::vec("[a-z0-9]{1,60}", 1..200),
        ) {
            let mut accumulator = Accumulator::default();
            let t0 = Instant::now();
            for (n, voter) in voters.iter().enumerate() {
                let at = t0 + Duration::from_micros(n as u64);
                let (_, first) = accumulator.add(&vote(n as u64, voter), at, max_votes, Waker::noop());
                prop_assert_eq!(first, accumulator.batches[0].len());
                prop_assert_eq!(accumulator.queued, n + 1);
            }
            let mut seen = Vec::new();
            while let Some(mut batch) = accumulator.take_first() {
                prop_assert!(batch.len() >= 1 && batch.len() <= max_votes);
                // Only the last batch may be short.
                prop_assert!(batch.len() == max_votes || accumulator.batches.is_empty());
                prop_assert_eq!(batch.oldest, t0 + Duration::from_micros(seen.len() as u64));
                let split: Vec<&[u8]> = model::wire::split(&batch.buffers.bytes)
                    .collect::<Result<_, _>>()
                    .expect("whole votes");
                prop_assert_eq!(split.len(), batch.len());
                for bytes in split {
                    seen.push(model::wire::decode(bytes).expect("a whole vote"));
                }
                accumulator.recycle(std::mem::take(&mut batch.buffers));
            }
            prop_assert_eq!(accumulator.queued, 0);
            prop_assert_eq!(seen.len(), voters.len());
            for (n, (v, voter)) in seen.iter().zip(&voters).enumerate() {
                prop_assert_eq!(v.id, VoteId(n as u128));
                prop_assert_eq!(v.voter.as_str(), voter.as_str());
            }
        }
    }

    #[test]
    fn written_buffers_are_reused_empty() {
        let mut accumulator = Accumulator::default();
        let t0 = Instant::now();
        accumulator.add(&vote(1, "v1"), t0, 4, Waker::noop());
        let mut batch = accumulator.take_first().expect("one batch");
        let capacity = batch.buffers.bytes.capacity();
        accumulator.recycle(std::mem::take(&mut batch.buffers));
        accumulator.add(&vote(2, "v2"), t0, 4, Waker::noop());
        let batch = accumulator.take_first().expect("one batch");
        assert_eq!(batch.buffers.bytes.capacity(), capacity);
        let votes: Vec<&[u8]> = model::wire::split(&batch.buffers.bytes)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(votes.len(), 1, "nothing of the earlier batch is left");
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch.buffers.waiting.len(),
            1,
            "only the new vote's task waits"
        );
        assert_eq!(model::wire::decode(votes[0]).unwrap().id, VoteId(2));
    }

    /// Joins vote `n` to the shared accumulator's batch from the polling task, then waits for
    /// its outcome, as `Shard::store` does.
    async fn join_and_wait(accumulator: Arc<Mutex<Accumulator>>, n: u64) -> Result<(), StoreError> {
        let mut waiting: Option<Waiting> = None;
        std::future::poll_fn(|cx| {
            let waiting = waiting.get_or_insert_with(|| {
                lock(&accumulator)
                    .add(&vote(n, "v"), Instant::now(), 64, cx.waker())
                    .0
            });
            waiting.poll(cx)
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_vote_of_a_batch_learns_its_outcome_however_it_waits() {
        let accumulator = Arc::new(Mutex::new(Accumulator::default()));
        let voters: Vec<_> = (0..8)
            .map(|n| tokio::spawn(join_and_wait(accumulator.clone(), n)))
            .collect();
        // One more joins with one waker and is then awaited by a task with another: it is
        // registered again, as a late waiter.
        let (mut moved, _) =
            lock(&accumulator).add(&vote(8, "v"), Instant::now(), 64, Waker::noop());
        let moved = tokio::spawn(async move { std::future::poll_fn(|cx| moved.poll(cx)).await });
        // And one looks only once the batch is written.
        let (mut after, _) =
            lock(&accumulator).add(&vote(9, "v"), Instant::now(), 64, Waker::noop());
        let all_waiting = async {
            loop {
                let joined = {
                    let accumulator = lock(&accumulator);
                    accumulator.queued == 10
                        && !lock(&accumulator.batches[0].outcome.late).is_empty()
                };
                if joined {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), all_waiting)
            .await
            .expect("every vote joined and the moved one registered late");
        let mut batch = lock(&accumulator).take_first().expect("one batch");
        assert_eq!(batch.len(), 10);
        batch.settle(Err(StoreError::Timeout));
        // A second settlement (a batch dropped after its write) changes nothing.
        batch.settle(Ok(()));
        drop(batch);
        for voter in voters {
            assert_eq!(voter.await.unwrap(), Err(StoreError::Timeout));
        }
        assert_eq!(moved.await.unwrap(), Err(StoreError::Timeout));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(after.poll(&mut cx), Poll::Ready(Err(StoreError::Timeout)));
    }

    #[tokio::test]
    async fn a_batch_dropped_unwritten_answers_its_votes_unavailable() {
        let accumulator = Arc::new(Mutex::new(Accumulator::default()));
        let voter = tokio::spawn(join_and_wait(accumulator.clone(), 1));
        while lock(&accumulator).queued < 1 {
            tokio::task::yield_now().await;
        }
        drop(lock(&accumulator).take_first());
        assert_eq!(voter.await.unwrap(), Err(StoreError::Unavailable));
    }
}
