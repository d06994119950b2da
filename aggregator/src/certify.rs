//! Knowing when a poll's result is final: every vote acknowledged with a stamp before its close,
//! in every region's every shard, is counted.
//!
//! The argument. Ingest acknowledges a vote only once its shard stored it, within the store
//! timeout of the vote's stamp, and it stamps with a clock it keeps within a bound of the
//! database's. So every vote acknowledged with a stamp before the close `C` was in its shard's
//! queue by `C + grace` on the primary's clock, `grace` covering both. After that instant (the
//! primary's `clock_timestamp()` says when) each shard is snapshot once, atomically: the
//! position of the queue's last element, `moved + LLEN`. Elements leave the queue only through
//! the move script, which raises `moved` and scores each in-flight list by its first position,
//! and a list leaves that set only when its batch has committed. So once `moved` has passed the
//! snapshot and no list scored at or below it is left, every element stored by `C + grace` is
//! counted: the shard is drained for that close. The last shard to be marked drained lets the
//! poll be certified (`db::certify::finalize`); votes that arrive later are never counted (the
//! upsert holds each poll's row `FOR SHARE` and counts nothing for a final poll).
//!
//! Drained is a property of the shard, not of a worker: any aggregator of the region may mark
//! it, however many drain it, and the snapshot is shared in Redis (the first one taken stands).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use db::certify::{self, Due};
use model::queue;
use tokio::sync::watch;

/// Snapshots the shard's end of queue for a close once (KEYS[4]), then answers whether every
/// element up to it has left the queue (KEYS[2], the count moved) and no in-flight list holding
/// one is left (KEYS[3]). KEYS[1] is the queue.
const DRAINED: &str = r#"
local target = redis.call('GET', KEYS[4])
if not target then
  target = tonumber(redis.call('GET', KEYS[2]) or '0') + redis.call('LLEN', KEYS[1])
  redis.call('SET', KEYS[4], target, 'EX', 604800)
end
target = tonumber(target)
if tonumber(redis.call('GET', KEYS[2]) or '0') < target then return 0 end
if #redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', target, 'LIMIT', 0, 1) > 0 then return 0 end
return 1
"#;

/// One shard this aggregator drains.
pub struct Shard {
    pub index: u16,
    pub link: Arc<shard::Link>,
}

/// Looks for polls whose close and grace have passed, marks this aggregator's shards drained for
/// them as they become so, and certifies a poll final once every shard of every region is.
pub async fn run(
    region: String,
    postgres_url: String,
    grace: Duration,
    every: Duration,
    shards: Vec<Shard>,
    mut stop: watch::Receiver<bool>,
) {
    let certified =
        metrics::counter!("tally_aggregator_polls_certified_total", "region" => region.clone());
    let time_to_final =
        metrics::gauge!("tally_aggregator_close_to_final_seconds", "region" => region.clone());
    let mut client: Option<db::Client> = None;
    let mut registered = false;
    // (poll, close, shard) this worker has seen drained, so it asks Redis once each.
    let mut drained: HashSet<(String, u64, u16)> = HashSet::new();
    let script = Arc::new(redis::Script::new(DRAINED));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = db::connect(&postgres_url).await.ok();
        }
        let Some(c) = client.as_mut() else { continue };
        if !registered {
            registered = certify::register_shards(c, &region, shards.len() as u16)
                .await
                .map_err(|e| tracing::warn!(error = %e, "naming this region's shards failed"))
                .is_ok();
        }
        let due = match certify::due_polls(c, grace).await {
            Ok(due) => due,
            Err(e) => {
                tracing::debug!(error = %e, "looking for polls to certify failed");
                client = None;
                continue;
            }
        };
        for d in &due {
            for shard in &shards {
                let seen = (d.poll.clone(), d.closes_at.0, shard.index);
                if drained.contains(&seen) {
                    continue;
                }
                match is_drained(&script, &shard.link, d).await {
                    Ok(true) => {
                        if certify::mark_drained(c, d, &region, shard.index)
                            .await
                            .is_ok()
                        {
                            tracing::info!(poll = %d.poll, shard = shard.index, "shard drained for the poll's close");
                            drained.insert(seen);
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, shard = shard.index, "shard not reachable to certify")
                    }
                }
            }
            match certify::finalize(c, d).await {
                Ok(Some(f)) => {
                    let seconds = f.final_at.0.saturating_sub(d.closes_at.0) as f64 / 1e6;
                    certified.increment(1);
                    time_to_final.set(seconds);
                    tracing::info!(poll = %d.poll, counts = ?f.counts, digest = %f.digest, ballots = f.ballots, seconds, "poll certified final");
                }
                Ok(None) => {}
                Err(e) => tracing::error!(poll = %d.poll, error = %e, "certifying the poll failed"),
            }
        }
        drained.retain(|(poll, closes_at, _)| {
            due.iter()
                .any(|d| d.poll == *poll && d.closes_at.0 == *closes_at)
        });
    }
}

async fn is_drained(
    script: &redis::Script,
    link: &shard::Link,
    due: &Due,
) -> redis::RedisResult<bool> {
    let mut conn = link.get()?;
    script
        .key(queue::VOTES)
        .key(queue::MOVED)
        .key(queue::IN_FLIGHT)
        .key(queue::close_key(&due.poll, due.closes_at.0))
        .invoke_async(&mut conn)
        .await
        .inspect_err(|e| link.report(e))
}
