//! The first stage. Shard readers: move elements (each one or more votes back to back, see [`model::queue`]) out
//! of a shard's queue into this worker's in-flight lists (an atomic Lua move: a vote is always in
//! exactly one list), decode them into chunks, and hand the chunks to the batcher through a
//! lock-free queue. A chunk's in-flight list is deleted only after its batch has committed (see
//! `ack`), so a crash at any instant loses nothing.
//!
//! A move whose reply never came (Redis killed after applying it, a cut connection) leaves votes
//! in a list nobody holds, so after every error a reader takes back each list of its worker that
//! no chunk of its own claims, before it moves anything new.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use model::{queue, Vote};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};

/// Moves up to ARGV[1] elements from the queue's head to the in-flight list KEYS[2], atomically,
/// and accounts for them: the shard's count of elements ever moved (KEYS[3]) rises by as many,
/// and the list joins the set of in-flight lists (KEYS[4]) scored by the position of its first
/// element. This is the only way an element leaves the queue, so those two always say how far the
/// queue has been taken and what of it is not yet acknowledged (see `certify`). `unpack` is
/// chunked to stay under Lua's stack limit.
const MOVE: &str = r#"
local items = redis.call('LPOP', KEYS[1], ARGV[1])
if not items then return {} end
for i = 1, #items, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(items, i, math.min(i + 999, #items)))
end
local last = redis.call('INCRBY', KEYS[3], #items)
redis.call('ZADD', KEYS[4], 'NX', last - #items + 1, KEYS[2])
return items
"#;

/// One move's worth of votes, tied to the in-flight list that holds them in Redis.
pub struct Chunk {
    pub shard: usize,
    pub key: String,
    /// Votes its list holds, counted or dead: what acknowledging it takes off the shard's count.
    pub held: u64,
    pub votes: Vec<Vote>,
    /// Dead letters (`reason\npayload`) to write when this chunk is acknowledged.
    pub dead: Vec<(&'static str, Vec<u8>)>,
    pub bytes: usize,
    pub(crate) _claim: Claim,
}

/// The in-flight lists a reader has handed on and not yet seen acknowledged (or given up on).
#[derive(Clone, Default)]
pub struct Claims(Arc<Mutex<HashSet<String>>>);

impl Claims {
    fn holds(&self, key: &str) -> bool {
        self.0.lock().expect("never poisoned").contains(key)
    }
}

/// A chunk's place: its permit bounds how many chunks a shard may have taken and not yet
/// acknowledged, and its key stays claimed until the chunk is gone.
pub(crate) struct Claim {
    _permit: OwnedSemaphorePermit,
    key: String,
    claims: Claims,
}

impl Claim {
    fn new(permit: OwnedSemaphorePermit, key: &str, claims: &Claims) -> Self {
        claims
            .0
            .lock()
            .expect("never poisoned")
            .insert(key.to_string());
        Self {
            _permit: permit,
            key: key.to_string(),
            claims: claims.clone(),
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut keys) = self.claims.0.lock() {
            keys.remove(&self.key);
        }
    }
}

pub struct Reader {
    pub shard: usize,
    /// True once the worker holds its lease on the shard; nothing is moved before.
    pub held: watch::Receiver<bool>,
    /// Set when a write gave up waiting on some list's commit: look for lists no chunk holds.
    pub relook: Arc<std::sync::atomic::AtomicBool>,
    pub region: String,
    pub worker: String,
    pub link: Arc<shard::Link>,
    /// Its own connection with no response timeout: a blocking wait must never be cut off.
    pub blocking: Arc<shard::Link>,
    pub out: Arc<ArrayQueue<Chunk>>,
    pub wake: Arc<Notify>,
    pub permits: Arc<Semaphore>,
    pub claims: Claims,
    pub pop_size: usize,
    pub block: Duration,
    pub linger: Duration,
    /// Looks for lists no chunk holds at least this often (see
    /// [`crate::config::DEFAULT_RECOVER_EVERY`]).
    pub recover_every: Duration,
    /// Looks for lists of workers whose lease expired this often.
    pub adopt_every: Duration,
    /// Votes a recent element held, which turns `pop_size` votes into elements to take.
    pub votes_per_element: usize,
    pub catalog: Arc<db::CatalogCache>,
    pub postgres_url: String,
    pub up: Arc<AtomicBool>,
    pub retry_max: Duration,
    /// Added to the log line when the shard cannot be reached (see [`tls::redis_hint`]).
    pub hint: &'static str,
}

impl Reader {
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let labels = [
            ("region", self.region.clone()),
            ("shard", self.shard.to_string()),
        ];
        let drained = metrics::counter!("tally_aggregator_votes_drained_total", &labels);
        while !*self.held.borrow_and_update() {
            tokio::select! {
                changed = self.held.changed() => if changed.is_err() { return },
                _ = stop.changed() => return,
            }
        }
        // Keys of this run never collide with a previous run's, whose lists are recovered first.
        let epoch = model::Stamp::now().0;
        let mut seq = 0u64;
        let mut backoff = Duration::from_millis(50);
        // Whether some list of this worker may hold votes no chunk claims: at start (a previous
        // run's), after every error (a move whose reply was lost) and once a period (a move
        // applied after the look that followed its error).
        let mut unclaimed = true;
        let mut looked = tokio::time::Instant::now();
        let mut adopted_at = tokio::time::Instant::now();
        while !*stop.borrow() {
            let adopt = adopted_at.elapsed() >= self.adopt_every;
            let relook = self.relook.swap(false, Ordering::Relaxed);
            if unclaimed || adopt || relook || looked.elapsed() >= self.recover_every {
                match self.recover(epoch, &mut seq).await {
                    Ok((n, adopted)) => {
                        unclaimed = false;
                        looked = tokio::time::Instant::now();
                        adopted_at = looked;
                        self.up.store(true, Ordering::Relaxed);
                        if n > 0 {
                            tracing::info!(
                                shard = self.shard,
                                chunks = n,
                                adopted,
                                "took back in-flight votes no chunk held"
                            );
                        }
                    }
                    Err(e) => {
                        self.down(&e, &mut backoff, &mut stop).await;
                        continue;
                    }
                }
            }
            let permit = tokio::select! {
                p = self.permits.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = stop.changed() => break,
            };
            seq += 1;
            let key = queue::in_flight_key(&self.worker, epoch, seq);
            let wanted = elements_to_take(self.pop_size, self.votes_per_element);
            match self.take(&key, wanted).await {
                Ok(items) if items.is_empty() => {
                    self.up.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(50);
                }
                Ok(items) => {
                    self.up.store(true, Ordering::Relaxed);
                    backoff = Duration::from_millis(50);
                    let partial = items.len() < wanted;
                    let elements = items.len();
                    let chunk = self.chunk(key, items, permit).await;
                    drained.increment(chunk.held);
                    self.votes_per_element = (chunk.held as usize).div_ceil(elements).max(1);
                    self.push(chunk);
                    if partial {
                        tokio::select! {
                            _ = tokio::time::sleep(self.linger) => {}
                            _ = stop.changed() => {}
                        }
                    }
                }
                Err(e) => {
                    unclaimed = true;
                    self.down(&e, &mut backoff, &mut stop).await;
                }
            }
        }
    }

    async fn down(
        &self,
        e: &redis::RedisError,
        backoff: &mut Duration,
        stop: &mut watch::Receiver<bool>,
    ) {
        self.link.report(e);
        self.up.store(false, Ordering::Relaxed);
        tracing::warn!(shard = self.shard, error = %e, "shard unavailable{}; retrying", self.hint);
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {}
            _ = stop.changed() => {}
        }
        *backoff = (*backoff * 2).min(self.retry_max);
    }

    /// Up to `wanted` elements, moved into `key`; blocks up to `block` when the queue is empty.
    async fn take(&mut self, key: &str, wanted: usize) -> redis::RedisResult<Vec<Vec<u8>>> {
        let items = self.move_into(key, wanted).await?;
        if !items.is_empty() {
            return Ok(items);
        }
        // Wait for an element without taking it: the queue's head moved onto itself, a no-op
        // that blocks until there is a head. Only the move script takes elements, so every one
        // that leaves the queue is accounted for.
        let waited: Option<Vec<u8>> = redis::cmd("BLMOVE")
            .arg(queue::VOTES)
            .arg(queue::VOTES)
            .arg("LEFT")
            .arg("LEFT")
            .arg(self.block.as_secs_f64())
            .query_async(&mut self.blocking.get()?)
            .await
            .inspect_err(|e| self.blocking.report(e))?;
        if waited.is_none() {
            return Ok(Vec::new());
        }
        self.move_into(key, wanted).await
    }

    async fn move_into(&mut self, key: &str, wanted: usize) -> redis::RedisResult<Vec<Vec<u8>>> {
        redis::Script::new(MOVE)
            .key(queue::VOTES)
            .key(key)
            .key(queue::MOVED)
            .key(queue::IN_FLIGHT)
            .arg(wanted)
            .invoke_async(&mut self.link.get()?)
            .await
    }

    /// Finishes what this worker had taken and nobody holds (a previous run's lists, a move
    /// whose reply was lost, an acknowledgement given up), and adopts the lists of workers whose
    /// lease has expired: each such in-flight list becomes a chunk, before anything new is taken.
    /// Returns the chunks made and how many of them were adopted.
    async fn recover(&mut self, epoch: u64, seq: &mut u64) -> redis::RedisResult<(usize, usize)> {
        let mut conn = self.link.get()?;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(queue::in_flight_pattern("*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let (mut n, mut adopted) = (0, 0);
        // Owners whose lease is held: their lists are theirs, asked once a look.
        let mut alive: HashSet<String> = HashSet::new();
        for key in keys {
            let Some(owner) = crate::lease::owner(&key) else {
                continue;
            };
            let key = if owner == self.worker {
                if self.claims.holds(&key) {
                    continue;
                }
                key
            } else {
                if alive.contains(owner) {
                    continue;
                }
                let held: bool = redis::cmd("EXISTS")
                    .arg(queue::lease_key(owner))
                    .query_async(&mut conn)
                    .await?;
                if held {
                    alive.insert(owner.to_string());
                    continue;
                }
                *seq += 1;
                let mine = queue::in_flight_key(&self.worker, epoch, *seq);
                if !crate::lease::adopt(&mut conn, &key, &mine).await? {
                    continue;
                }
                tracing::info!(shard = self.shard, from = %owner, list = %key, "adopted the in-flight list of a worker whose lease expired");
                metrics::counter!("tally_aggregator_adopted_lists_total", "region" => self.region.clone())
                    .increment(1);
                adopted += 1;
                mine
            };
            let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await?;
            if items.is_empty() {
                continue;
            }
            // A list moved before lists were accounted for: the earliest position, so no poll is
            // certified final before it is counted.
            redis::cmd("ZADD")
                .arg(queue::IN_FLIGHT)
                .arg("NX")
                .arg(0)
                .arg(&key)
                .query_async::<()>(&mut conn)
                .await?;
            let permit = self
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let chunk = self.chunk(key, items, permit).await;
            self.push(chunk);
            n += 1;
        }
        Ok((n, adopted))
    }

    /// Decodes elements; what cannot be counted becomes a dead letter with its reason, one a
    /// vote (or, past bytes that frame no vote, the rest of the element).
    async fn chunk(&self, key: String, items: Vec<Vec<u8>>, permit: OwnedSemaphorePermit) -> Chunk {
        let bytes = items.iter().map(Vec::len).sum();
        let mut votes = Vec::with_capacity(items.len());
        let mut undecodable = Vec::new();
        let mut held = 0u64;
        for element in &items {
            let mut split = model::wire::split(element);
            for payload in split.by_ref() {
                let Ok(payload) = payload else {
                    break;
                };
                held += 1;
                match model::wire::decode(payload) {
                    Ok(v) => votes.push((v, payload.to_vec())),
                    Err(_) => undecodable.push(("undecodable", payload.to_vec())),
                }
            }
            if !split.rest().is_empty() {
                undecodable.push(("undecodable", split.rest().to_vec()));
            }
        }
        // A vote may name a poll created after our catalog was read: look again before refusing it.
        let unknown = |c: &model::Catalog, v: &Vote| {
            c.get(v.poll.as_str())
                .is_none_or(|p| !p.has_option(v.option.as_str()))
        };
        if votes.iter().any(|(v, _)| unknown(&self.catalog.get(), v)) {
            if let Err(e) = self.catalog.reload(&self.postgres_url).await {
                tracing::warn!(error = %e, "catalog reload failed");
            }
        }
        let catalog = self.catalog.get();
        let mut dead = undecodable;
        let mut good = Vec::with_capacity(votes.len());
        for (v, payload) in votes {
            match catalog.get(v.poll.as_str()) {
                None => dead.push(("unknown poll", payload)),
                Some(p) if !p.has_option(v.option.as_str()) => {
                    dead.push(("unknown option", payload))
                }
                Some(_) => good.push(v),
            }
        }
        Chunk {
            shard: self.shard,
            _claim: Claim::new(permit, &key, &self.claims),
            key,
            held,
            votes: good,
            dead,
            bytes,
        }
    }

    fn push(&self, chunk: Chunk) {
        // Capacity equals the total permits, and every chunk holds one: this cannot be full.
        if self.out.push(chunk).is_err() {
            unreachable!("chunk queue sized to the permits");
        }
        self.wake.notify_one();
    }
}

/// Elements to move for about `pop_size` votes when recent elements held `votes_per_element`.
fn elements_to_take(pop_size: usize, votes_per_element: usize) -> usize {
    pop_size.div_ceil(votes_per_element.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_move_takes_about_pop_size_votes_and_always_at_least_one_element() {
        assert_eq!(elements_to_take(5_000, 1), 5_000);
        assert_eq!(elements_to_take(5_000, 50), 100);
        assert_eq!(elements_to_take(5_000, 3), 1_667);
        assert_eq!(elements_to_take(10, 1_000), 1);
        assert_eq!(elements_to_take(1, 0), 1);
    }

    #[test]
    fn a_key_is_claimed_while_its_chunk_lives_and_free_once_it_is_gone() {
        let claims = Claims::default();
        let permits = Arc::new(Semaphore::new(2));
        let first = Claim::new(permits.clone().try_acquire_owned().unwrap(), "k1", &claims);
        let second = Claim::new(permits.clone().try_acquire_owned().unwrap(), "k2", &claims);
        assert!(claims.holds("k1") && claims.holds("k2"));
        assert!(!claims.holds("k3"));
        drop(first);
        assert!(
            !claims.holds("k1"),
            "an acknowledged chunk's list is no longer claimed"
        );
        assert!(claims.holds("k2"));
        assert_eq!(permits.available_permits(), 1, "its permit went with it");
        drop(second);
        assert_eq!(permits.available_permits(), 2);
    }
}
