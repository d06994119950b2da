//! How fresh a server's data is, as the server itself says: which one is the primary, how far
//! each replica has replayed, read from PostgreSQL rather than estimated. Readers report it on
//! every answer; the replication watcher and the lab's checks read it too.

use tokio_postgres::Client;

use crate::DbError;

/// One server's view of itself.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Freshness {
    /// True on a streaming replica, false on the primary.
    pub in_recovery: bool,
    /// The WAL position this server's data reflects (replayed, or written on a primary).
    pub lsn: String,
    /// How stale this server's data may be: 0 on a primary and on a replica that has replayed all
    /// it received while streaming; else the age of the last replayed transaction. `None` when
    /// the replica is cut off and has replayed nothing since it started: staleness unknown.
    pub lag_ms: Option<f64>,
    /// The time this server's data is current as of (RFC 3339, UTC), by the server's own clock.
    pub as_of: Option<String>,
    /// Is a replica's WAL receiver connected to a primary right now?
    pub streaming: bool,
}

const FRESHNESS: &str = "
WITH s AS (
    SELECT pg_is_in_recovery() AS rec,
           EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming') AS streaming,
           clock_timestamp() AS now
), c AS (
    SELECT rec, streaming, now,
           NOT rec OR (streaming AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()) AS current
      FROM s
)
SELECT rec,
       (CASE WHEN rec THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
       CASE WHEN current THEN 0::float8
            ELSE GREATEST(0, EXTRACT(EPOCH FROM (now - pg_last_xact_replay_timestamp())) * 1000)::float8 END,
       to_char((CASE WHEN current THEN now ELSE pg_last_xact_replay_timestamp() END) AT TIME ZONE 'UTC',
               'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
       streaming
  FROM c";

pub async fn freshness(client: &Client) -> Result<Freshness, DbError> {
    let row = client.query_one(FRESHNESS, &[]).await?;
    Ok(Freshness {
        in_recovery: row.get(0),
        lsn: row.get::<_, Option<String>>(1).unwrap_or_default(),
        lag_ms: row.get(2),
        as_of: row.get(3),
        streaming: row.get(4),
    })
}

/// The primary's current WAL position, to wait for on a replica with [`has_replayed`].
pub async fn current_lsn(primary: &Client) -> Result<String, DbError> {
    Ok(primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// Does this server hold everything up to `lsn`: a replica once it has replayed it, a primary
/// always (a promoted server's replay position stays where its recovery ended, and one never in
/// recovery has none, so asking a primary for it would wait for ever or read NULL).
pub async fn has_replayed(server: &Client, lsn: &str) -> Result<bool, DbError> {
    Ok(server
        .query_one(
            "SELECT NOT pg_is_in_recovery() OR pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
            &[&lsn],
        )
        .await?
        .get(0))
}

/// A replica as the primary sees it, through its replication slot.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct ReplicaLag {
    pub slot: String,
    /// Is the replica connected right now?
    pub active: bool,
    /// WAL the primary has written that the replica has not replayed yet.
    pub lag_bytes: Option<i64>,
    /// The primary's measure of replay delay (NULL in PostgreSQL once the replica is idle and caught up).
    pub replay_lag_ms: Option<f64>,
}

pub async fn replica_lags(primary: &Client) -> Result<Vec<ReplicaLag>, DbError> {
    let rows = primary
        .query(
            "SELECT s.slot_name::text, s.active,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), COALESCE(r.replay_lsn, s.restart_lsn))::int8,
                    (EXTRACT(EPOCH FROM r.replay_lag) * 1000)::float8
               FROM pg_replication_slots s
               LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
              WHERE s.slot_type = 'physical'
              ORDER BY 1",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ReplicaLag {
            slot: r.get(0),
            active: r.get(1),
            lag_bytes: r.get(2),
            replay_lag_ms: r.get(3),
        })
        .collect())
}

/// A WAL position as PostgreSQL prints it (`16/B374D848`), as a number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}
