//! The last stage: once every lane holding part of a chunk has committed it, its in-flight list
//! is deleted, its dead letters stored and the shard's count of stored votes lowered, in one
//! script that does nothing once the list is gone. A vote leaves Redis only here.

use std::time::Duration;

use model::queue;

use crate::pop::Claim;
use crate::replay::Commit;

/// Takes the in-flight list KEYS[1] out of the set of lists in flight KEYS[4]; then, if that
/// list still exists, stores ARGV[2..] (dead letters) on KEYS[2], deletes the list and lowers the
/// shard's count of stored votes KEYS[3] by the ARGV[1] votes it held: an acknowledgement applied once whose reply was lost is not applied again. Votes
/// pushed without being counted (by hand, by tools) would take the count below zero: it stops
/// at zero.
const ACK: &str = r#"
redis.call('ZREM', KEYS[4], KEYS[1])
if redis.call('LLEN', KEYS[1]) == 0 then return 0 end
for i = 2, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('DEL', KEYS[1])
if redis.call('DECRBY', KEYS[3], ARGV[1]) < 0 then redis.call('SET', KEYS[3], 0) end
return 1
"#;

/// What acknowledging a chunk needs once all its votes are committed, wherever they went.
pub struct Pending {
    pub shard: usize,
    pub key: String,
    pub held: u64,
    pub dead: Vec<(&'static str, Vec<u8>)>,
    /// Lanes still writing part of this chunk; the last to commit acknowledges it.
    pub remaining: std::sync::atomic::AtomicUsize,
    /// The latest commit holding any of its parts: what must be replayed before it is
    /// acknowledged.
    pub committed: std::sync::Mutex<Committed>,
    pub(crate) _claim: Claim,
}

/// Where a chunk's parts were committed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Committed {
    #[default]
    Nowhere,
    At(Commit),
    /// On primaries of different timelines: a failover came between its parts, and the older
    /// one's commit may be gone. It is not acknowledged, but applied again.
    Apart,
}

impl Pending {
    /// A lane committed a part of this chunk at `commit` (`None`: somewhere it could not tell,
    /// which is never waited on as if known).
    pub fn committed_at(&self, commit: Option<Commit>) {
        let mut c = self.committed.lock().expect("never poisoned");
        let Some(commit) = commit else {
            *c = Committed::Apart;
            return;
        };
        *c = match *c {
            Committed::Nowhere => Committed::At(commit),
            Committed::At(seen) if seen.timeline == commit.timeline => Committed::At(Commit {
                timeline: seen.timeline,
                lsn: seen.lsn.max(commit.lsn),
            }),
            _ => Committed::Apart,
        };
    }

    pub fn committed(&self) -> Committed {
        *self.committed.lock().expect("never poisoned")
    }
}

/// Acknowledges a committed chunk: its dead letters are stored and its in-flight list deleted
/// in one script, only while the list exists, so a retry after a lost reply stores nothing twice.
/// Retried; if Redis stays away the list remains, unclaimed once this returns, and its reader
/// takes it back after its next error or within a recovery period (or the next run does), which
/// changes nothing in PostgreSQL.
pub async fn ack(link: &shard::Link, chunk: &Pending, region: &str, retry_max: Duration) {
    let script = redis::Script::new(ACK);
    let mut invocation = script.prepare_invoke();
    invocation
        .key(&chunk.key)
        .key(queue::DEAD_LETTERS)
        .key(queue::STORED)
        .key(queue::IN_FLIGHT)
        .arg(chunk.held);
    for (reason, payload) in &chunk.dead {
        invocation.arg(queue::dead_letter(reason, payload));
    }
    let mut backoff = Duration::from_millis(20);
    for attempt in 0..10 {
        let answer = match link.get() {
            Ok(mut conn) => invocation.invoke_async::<bool>(&mut conn).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(acknowledged_now) => {
                if acknowledged_now {
                    for (reason, _) in &chunk.dead {
                        metrics::counter!("tally_aggregator_dead_letters_total", "region" => region.to_string(), "reason" => *reason)
                            .increment(1);
                    }
                }
                return;
            }
            Err(e) => {
                link.report(&e);
                tracing::warn!(attempt, error = %e, key = %chunk.key, "ack failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(retry_max);
            }
        }
    }
    tracing::error!(key = %chunk.key, "ack gave up; the chunk will be re-delivered");
}
