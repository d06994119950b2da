//! Where votes wait in each Redis shard. Ingest appends to the right of [`VOTES`]; aggregators
//! move batches from its left into an in-flight list of their own and delete that list only
//! once PostgreSQL has committed the batch.

/// The list of encoded votes waiting to be counted.
pub const VOTES: &str = "tally:votes";
/// Votes that can never be counted, each as `reason\npayload`.
pub const DEAD_LETTERS: &str = "tally:dead";
/// Prefix of every in-flight list.
pub const IN_FLIGHT_PREFIX: &str = "tally:inflight:";

/// Redis ACL rules for ingest's user: push onto [`VOTES`] and read its length, nothing else and
/// no other key (`WAIT` for replicas).
pub const INGEST_ACL: &str = "resetkeys ~tally:votes resetchannels -@all +rpush +llen +wait +ping";

/// Redis ACL rules for the aggregator's user: pop and move votes from [`VOTES`] into its
/// in-flight lists, read those back after a restart, delete them once committed, dead-letter; no
/// other key. The selector in brackets allows pushing onto in-flight lists and dead letters
/// only, so not even the move script (it runs with the same rights) can push onto [`VOTES`].
pub const AGGREGATOR_ACL: &str =
    "resetkeys ~tally:votes ~tally:inflight:* ~tally:dead resetchannels -@all \
+lpop +blmove +lrange +del +scan +llen +evalsha +eval +script|load +ping \
(~tally:inflight:* ~tally:dead +rpush)";

/// The in-flight list holding move `seq` of aggregator `worker`'s run `epoch`.
pub fn in_flight_key(worker: &str, epoch: u64, seq: u64) -> String {
    format!("{IN_FLIGHT_PREFIX}{worker}:{epoch}-{seq}")
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
