//! A worker's hold on its in-flight lists. Each aggregator keeps a lease on every shard it
//! drains (`tally:lease:<worker>`, expiring after `lease`), renewed while it runs and released
//! when it stops cleanly. A worker whose lease has expired is gone, or cut off: a live worker of
//! the region adopts its in-flight lists (`pop`'s recovery), one script each, so each list goes
//! to exactly one adopter however many race for it.

use std::sync::Arc;
use std::time::Duration;

use model::queue;
use tokio::sync::watch;

/// Renews the lease every third of its length until `stop`; a failed renewal (no primary yet,
/// a failover) is retried soon. `held` turns true once the lease was first taken: the worker
/// moves nothing before, so no list of its own exists while another could think it gone.
pub async fn hold(
    link: Arc<shard::Link>,
    worker: String,
    lease: Duration,
    held: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let key = queue::lease_key(&worker);
    let holder = format!("{}", model::Stamp::now().0);
    loop {
        let renewed = match link.get() {
            Ok(mut conn) => redis::cmd("SET")
                .arg(&key)
                .arg(&holder)
                .arg("PX")
                .arg(lease.as_millis() as u64)
                .query_async::<()>(&mut conn)
                .await
                .inspect_err(|e| {
                    link.report(e);
                    tracing::debug!(error = %e, "renewing the lease failed");
                })
                .is_ok(),
            Err(_) => false,
        };
        if renewed {
            held.send_if_modified(|h| !std::mem::replace(h, true));
        }
        let next = if renewed { lease / 3 } else { RETRY };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = stop.changed() => break,
        }
    }
}

/// How soon a failed renewal is tried again.
const RETRY: Duration = Duration::from_millis(50);

/// Gives the lease up: called once the worker's last batch is written or abandoned.
pub async fn release(link: &shard::Link, worker: &str) {
    if let Ok(mut conn) = link.get() {
        let _ = redis::cmd("DEL")
            .arg(queue::lease_key(worker))
            .query_async::<()>(&mut conn)
            .await;
    }
}

/// Moves the in-flight list KEYS[2] of a worker whose lease KEYS[1] has expired to KEYS[3], this
/// worker's, keeping its place in the set of lists in flight KEYS[4]; 1 if this call adopted it,
/// 0 if the owner still holds its lease or another worker adopted it first.
const ADOPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local score = redis.call('ZSCORE', KEYS[4], KEYS[2]) or 0
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], KEYS[2])
redis.call('ZADD', KEYS[4], score, KEYS[3])
return 1
"#;

/// Makes `list`, an in-flight list of a worker whose lease has expired, `into` (a list of the
/// caller's), in one script: true if this call adopted it; false if its owner holds its lease
/// again or another worker adopted it first. However many workers race, one adopts each list.
pub async fn adopt(
    conn: &mut impl redis::aio::ConnectionLike,
    list: &str,
    into: &str,
) -> redis::RedisResult<bool> {
    let owner = owner(list).unwrap_or_default();
    redis::Script::new(ADOPT)
        .key(queue::lease_key(owner))
        .key(list)
        .key(into)
        .key(queue::IN_FLIGHT)
        .invoke_async(conn)
        .await
}

/// The worker an in-flight list belongs to, from its key (`tally:inflight:<worker>:<run>-<seq>`).
pub fn owner(key: &str) -> Option<&str> {
    key.strip_prefix(queue::IN_FLIGHT_PREFIX)?
        .rsplit_once(':')
        .map(|(worker, _)| worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lists_owner_is_read_from_its_key() {
        assert_eq!(
            owner(&queue::in_flight_key("us-east-1-0", 17, 3)),
            Some("us-east-1-0")
        );
        assert_eq!(owner(&queue::in_flight_key("a:b", 1, 1)), Some("a:b"));
        assert_eq!(owner("tally:votes"), None);
    }
}
