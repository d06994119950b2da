//! Certifying a poll final: the primary's side. Aggregators name the shards they drain
//! (`queue_shards`), mark each shard drained for a close once every vote it held by the close and
//! its grace is counted (`poll_drained`; how that is known is in the aggregator's `certify`), and
//! whoever marks the last shard freezes the poll: counts recounted from the ballots and checked
//! against the tallies, the digest of its ballots, `final_at`. From then on the poll's ballots
//! and tallies never change: every batch holds its polls' rows `FOR SHARE` and counts only votes
//! of polls that are not final.

use std::time::Duration;

use model::Stamp;
use tokio_postgres::Client;

use crate::audit::{recount, same_counts, tallied};
use crate::catalog::{micros, stamp};
use crate::DbError;

/// A poll whose close, and the grace after it, have passed by the primary's clock, and that is
/// not final yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub poll: String,
    pub closes_at: Stamp,
}

pub async fn due_polls(client: &Client, grace: Duration) -> Result<Vec<Due>, DbError> {
    let sql = format!(
        "SELECT id, {} FROM polls
          WHERE final_at IS NULL AND closes_at IS NOT NULL
            AND closes_at + $1::int8 * interval '1 millisecond' <= clock_timestamp()",
        micros("closes_at")
    );
    let grace_ms = grace.as_millis() as i64;
    Ok(client
        .query(&sql, &[&grace_ms])
        .await?
        .iter()
        .map(|r| Due {
            poll: r.get(0),
            closes_at: stamp(r.get(1)).expect("not null"),
        })
        .collect())
}

/// Names the shards an aggregator of `region` drains: every poll's result waits for them.
pub async fn register_shards(client: &Client, region: &str, shards: u16) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO queue_shards (region, shard) SELECT $1, generate_series(0, $2::int - 1)
             ON CONFLICT DO NOTHING",
            &[&region, &(shards as i32)],
        )
        .await?;
    Ok(())
}

pub async fn mark_drained(
    client: &Client,
    due: &Due,
    region: &str,
    shard: u16,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO poll_drained (poll_id, closes_at, region, shard)
             VALUES ($1, timestamptz 'epoch' + $2::int8 * interval '1 microsecond', $3, $4)
             ON CONFLICT DO NOTHING",
            &[
                &due.poll,
                &(due.closes_at.0 as i64),
                &region,
                &(shard as i16),
            ],
        )
        .await?;
    Ok(())
}

/// What certifying a poll froze.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certified {
    pub counts: std::collections::BTreeMap<String, i64>,
    pub digest: String,
    pub ballots: u64,
    pub final_at: Stamp,
}

/// Certifies `due` final if every named shard is drained for its close and it is not final yet;
/// `None` when it is not (yet) for this call to do. Fails, certifying nothing, if the ballots'
/// recount disagrees with the tallies: that would be a bug, and a result is never frozen wrong.
pub async fn finalize(client: &mut Client, due: &Due) -> Result<Option<Certified>, DbError> {
    let tx = client.transaction().await?;
    let sql = format!(
        "SELECT {}, final_at IS NOT NULL FROM polls WHERE id = $1 FOR UPDATE",
        micros("closes_at")
    );
    let Some(row) = tx.query_opt(&sql, &[&due.poll]).await? else {
        return Ok(None);
    };
    if row.get::<_, bool>(1) || stamp(row.get(0)) != Some(due.closes_at) {
        return Ok(None);
    }
    let missing: i64 = tx
        .query_one(
            "SELECT count(*) FROM queue_shards q WHERE NOT EXISTS (
                 SELECT 1 FROM poll_drained d
                  WHERE d.poll_id = $1 AND d.region = q.region AND d.shard = q.shard
                    AND d.closes_at = timestamptz 'epoch' + $2::int8 * interval '1 microsecond')",
            &[&due.poll, &(due.closes_at.0 as i64)],
        )
        .await?
        .get(0);
    if missing > 0 {
        return Ok(None);
    }
    let counts = recount(&tx, &due.poll).await?;
    let served = tallied(&tx, &due.poll).await?;
    if !same_counts(&counts, &served) {
        return Err(DbError::Unbalanced {
            poll: due.poll.clone(),
            ballots: format!("{counts:?}"),
            tallies: format!("{served:?}"),
        });
    }
    // Every option, with 0 for those nobody chose: the certified result is the whole result.
    let counts: std::collections::BTreeMap<String, i64> = served
        .keys()
        .map(|k| (k.clone(), counts.get(k).copied().unwrap_or(0)))
        .collect();
    let (digest, ballots) = crate::audit::digest(&tx, &due.poll, |_| Ok(())).await?;
    let json = serde_json::to_string(&counts).expect("counts serialize");
    let sql = format!(
        "UPDATE polls SET final_at = clock_timestamp(), final_counts = $2::text::jsonb, digest = $3
          WHERE id = $1 RETURNING {}",
        micros("final_at")
    );
    let final_at = stamp(
        tx.query_one(&sql, &[&due.poll, &json, &digest])
            .await?
            .get(0),
    )
    .expect("just set");
    tx.commit().await?;
    Ok(Some(Certified {
        counts,
        digest,
        ballots,
        final_at,
    }))
}
