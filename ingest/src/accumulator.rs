//! A shard's record accumulator: votes waiting for one shard's writer, in batches that fill in
//! turn, the oldest first, as a Kafka producer's accumulator keeps them. A vote is encoded
//! straight into the batch it joins, its task's waker beside it, and waits on that batch's
//! outcome, so it costs no allocation of its own and nothing of it is freed on the writer's
//! thread; written batches' buffers are reused.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the vote's queue shard is unavailable")]
    Unavailable,
    #[error("the vote's queue shard is full")]
    Full,
    #[error("the vote's queue shard did not confirm the write in time")]
    Timeout,
    #[error("the vote's queue shard could not copy it to a replica")]
    Unreplicated,
}

/// Votes waiting for one shard's writer. Votes join the last batch until it holds
/// `max_votes`; the writer takes the first.
#[derive(Default)]
pub(crate) struct Accumulator {
    pub(crate) batches: VecDeque<Batch>,
    /// Votes in `batches`.
    pub(crate) queued: usize,
    /// Buffers of written batches, for the next ones.
    spare: Vec<Buffers>,
}

/// Buffers kept for reuse: enough for the writes in flight and the batches forming meanwhile.
const SPARE_BUFFERS: usize = 8;

impl Accumulator {
    /// Adds `vote`, ready to store at `queued`, to the batch being filled, with `task` to wake
    /// when the batch is written, and returns the vote's wait for that batch's outcome and how
    /// many votes the first batch (the one a writer forms) now holds.
    pub(crate) fn add(
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

    pub(crate) fn take_first(&mut self) -> Option<Batch> {
        let batch = self.batches.pop_front()?;
        self.queued -= batch.len();
        Some(batch)
    }

    pub(crate) fn recycle(&mut self, mut buffers: Buffers) {
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
pub(crate) struct Buffers {
    pub(crate) bytes: Vec<u8>,
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

pub(crate) struct Batch {
    pub(crate) buffers: Buffers,
    /// When its first vote was ready to store (its body read). A write is bounded by its oldest
    /// vote's `queued + store_timeout`, so no vote needs a timer of its own.
    pub(crate) oldest: Instant,
    outcome: Arc<Outcome>,
}

impl Batch {
    pub(crate) fn len(&self) -> usize {
        self.buffers.votes
    }

    /// Tells every vote of the batch how its write ended; only the first settlement counts.
    pub(crate) fn settle(&mut self, result: Result<(), StoreError>) {
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
pub(crate) struct Waiting {
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
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StoreError>> {
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

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing under these locks can leave what they guard half-changed.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Stamp, VoteId};
    use proptest::prelude::*;
    use std::time::Duration;

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
