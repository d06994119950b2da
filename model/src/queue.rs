//! Where votes wait in each Redis shard. Ingest appends to the right of [`VOTES`]; aggregators
//! move elements from its left into an in-flight list of their own and delete that list only
//! once PostgreSQL has committed its votes.
//!
//! An element holds one or more encoded votes back to back (one group-commit write of ingest's;
//! see [`crate::wire::split`]), so a list's length counts writes, not votes: [`STORED`] counts the
//! votes.

/// The list of elements of encoded votes waiting to be counted.
pub const VOTES: &str = "tally:votes";
/// How many votes the shard holds and no aggregator has acknowledged (waiting in [`VOTES`] or in
/// flight): raised in the same transaction as each push, lowered by the acknowledgement that
/// deletes an in-flight list. What ingest's queue bound and the backlog gauges read.
pub const STORED: &str = "tally:votes:stored";
/// Votes that can never be counted, each as `reason\npayload`.
pub const DEAD_LETTERS: &str = "tally:dead";
/// Prefix of every in-flight list.
pub const IN_FLIGHT_PREFIX: &str = "tally:inflight:";
/// How many elements have ever left [`VOTES`]: the position of the last one moved. Raised by the
/// move that takes them, in the same script, so element `n` (counting from 1 since the shard
/// began) left the queue once this reads `n` or more.
pub const MOVED: &str = "tally:moved";
/// Every in-flight list, scored by the position of its first element: what certifying a poll
/// final waits on (every list at or before a position gone means every element up to it is
/// counted). Kept by the move and the acknowledgement, in their scripts.
pub const IN_FLIGHT: &str = "tally:inflight";
/// Prefix of the position a poll's close was snapshot at, per shard.
pub const CLOSE_PREFIX: &str = "tally:close:";
/// Prefix of each aggregator's lease on the shard: while it lives, the worker's in-flight lists
/// are its own; once it expires, another worker adopts them.
pub const LEASE_PREFIX: &str = "tally:lease:";

/// Redis ACL rules for ingest's user: push onto [`VOTES`] and, in the same transaction, raise
/// [`STORED`] (which it also reads); nothing else and no other key (`WAIT` for replicas, `ROLE`
/// to know it reaches the primary). A new user has no keys and no channels, so these rules are
/// the whole of its rights; the deployment gives its ElastiCache user exactly `on` and these
/// (`scripts/check-deploy` compares them), since ElastiCache refuses `reset` rules.
pub const INGEST_ACL: &str = "~tally:votes -@all +rpush +multi +exec +wait +ping +role \
(~tally:votes:stored +incrby +get)";

/// Redis ACL rules for the aggregator's user: pop and move votes from [`VOTES`] into its
/// in-flight lists, read those back after a restart, delete them once committed, dead-letter,
/// lower and read [`STORED`]; no other key. The first selector in brackets allows pushing onto
/// in-flight lists and dead letters only, so not even the move script (it runs with the same
/// rights) can push onto [`VOTES`]; the second changing [`STORED`] only by the commands the
/// acknowledgement uses. [`STORED`] is among the root's keys too, because a script's keys must
/// all pass one rule set for `EVALSHA` itself to be allowed.
pub const AGGREGATOR_ACL: &str =
    "~tally:votes ~tally:votes:stored ~tally:inflight:* ~tally:dead ~tally:moved \
~tally:inflight ~tally:close:* ~tally:lease:* -@all \
+lpop +blmove +lrange +del +scan +llen +exists +evalsha +eval +script|load +ping +role \
(~tally:inflight:* ~tally:dead +rpush +rename) (~tally:votes:stored +decrby +set +get) \
(~tally:moved +incrby +get) (~tally:inflight +zadd +zrem +zrangebyscore +zscore) \
(~tally:close:* +set +get) (~tally:lease:* +set +del)";

/// [`STORED`] as Redis answers it: absent until the shard's first push, and never below zero
/// (the acknowledgement stops it there; only a hand-set value could be).
pub fn stored_votes(count: Option<i64>) -> u64 {
    count.unwrap_or(0).max(0) as u64
}

/// The in-flight list holding move `seq` of aggregator `worker`'s run `epoch`.
pub fn in_flight_key(worker: &str, epoch: u64, seq: u64) -> String {
    format!("{IN_FLIGHT_PREFIX}{worker}:{epoch}-{seq}")
}

/// `worker`'s lease on the shard.
pub fn lease_key(worker: &str) -> String {
    format!("{LEASE_PREFIX}{worker}")
}

/// Where shard's snapshot for a poll's close (microseconds since the epoch) is kept.
pub fn close_key(poll: &str, closes_at_micros: u64) -> String {
    format!("{CLOSE_PREFIX}{poll}:{closes_at_micros}")
}

/// The `SCAN` pattern matching every in-flight list of `worker`.
pub fn in_flight_pattern(worker: &str) -> String {
    format!("{IN_FLIGHT_PREFIX}{worker}:*")
}

/// A dead letter: why, then the payload as it was.
pub fn dead_letter(reason: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len() + 1 + payload.len());
    out.extend_from_slice(reason.replace('\n', " ").as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_count_reads_as_zero_when_absent_or_below_zero() {
        assert_eq!(stored_votes(None), 0);
        assert_eq!(stored_votes(Some(-3)), 0);
        assert_eq!(stored_votes(Some(42)), 42);
    }
}
