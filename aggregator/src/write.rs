//! Writes a batch to the primary: binary `COPY` into the staging table, then one set-based
//! statement that upserts ballots (latest vote wins) and applies the resulting deltas to the
//! tallies, all in one transaction. Re-delivering any batch, in any order, changes nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::SinkExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Statement};

use crate::ack::{self, Committed, Pending};
use crate::batch::Batch;
use crate::encode;
use crate::lanes::Part;
use crate::replay::{Commit, Outcome, Replay};

/// The staging table, per connection, emptied by every commit; its columns are the order
/// [`encode::encode`] writes them in.
pub const CREATE_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS vote_stage (
    poll_id text NOT NULL, voter_id text NOT NULL, option text NOT NULL,
    vote_id uuid NOT NULL, cast_at int8 NOT NULL, region text NOT NULL, sure bool NOT NULL
) ON COMMIT DELETE ROWS";

pub const COPY_STAGE: &str =
    "COPY vote_stage (poll_id, voter_id, option, vote_id, cast_at, region, sure) FROM STDIN (FORMAT binary)";

/// The upsert. Each staged vote is judged against its poll's window, read from the `polls` row
/// held `FOR SHARE` for the transaction, so a poll's close or its certification waits for this
/// batch, and this batch sees them once they committed: a vote stamped before the opening, at or
/// after the close, or of a poll already final, is kept in `late_votes` with its reason and not
/// counted. The rest upsert ballots: the `sure` rows are already one a voter (see
/// `encode::stage_rows`), the others are reduced to each voter's latest here.
/// `replaced_option = b.option` reads the locked, current row, so when two writers race on one
/// voter each sees the other's committed option and the tallies stay exact. Deltas go to this
/// writer's own tally part (`$1`), so writers never queue on hot count rows.
pub const UPSERT: &str = "
WITH windows AS MATERIALIZED (
    SELECT id,
           COALESCE((EXTRACT(EPOCH FROM opens_at) * 1000000)::int8, -9223372036854775808) AS opens,
           COALESCE((EXTRACT(EPOCH FROM closes_at) * 1000000)::int8, 9223372036854775807) AS closes,
           final_at IS NOT NULL AS final
      FROM polls WHERE id IN (SELECT poll_id FROM vote_stage)
       FOR SHARE
), judged AS (
    SELECT s.poll_id, s.voter_id, s.option, s.vote_id, s.cast_at, s.region, s.sure,
           CASE WHEN w.final THEN 'after_final'
                WHEN s.cast_at < w.opens THEN 'before_open'
                WHEN s.cast_at >= w.closes THEN 'after_close' END AS late
      FROM vote_stage s JOIN windows w ON w.id = s.poll_id
), refused AS (
    INSERT INTO late_votes (vote_id, poll_id, voter_id, option, cast_at, region, reason)
    SELECT vote_id, poll_id, voter_id, option, cast_at, region, late FROM judged WHERE late IS NOT NULL
    ON CONFLICT (vote_id) DO NOTHING
    RETURNING reason
), counted AS (
    SELECT poll_id, voter_id, option, vote_id, cast_at, region FROM judged WHERE late IS NULL AND sure
    UNION ALL
    (SELECT DISTINCT ON (poll_id, voter_id) poll_id, voter_id, option, vote_id, cast_at, region
       FROM judged WHERE late IS NULL AND NOT sure
      ORDER BY poll_id, voter_id, cast_at DESC, vote_id DESC)
), changed AS (
    INSERT INTO ballots AS b (poll_id, voter_id, option, vote_id, cast_at, region, replaced_option)
    SELECT poll_id, voter_id, option, vote_id, cast_at, region, NULL FROM counted
    ON CONFLICT (poll_id, voter_id) DO UPDATE
       SET option = EXCLUDED.option, vote_id = EXCLUDED.vote_id, cast_at = EXCLUDED.cast_at,
           region = EXCLUDED.region, replaced_option = b.option
     WHERE (b.cast_at, b.vote_id) < (EXCLUDED.cast_at, EXCLUDED.vote_id)
    RETURNING b.poll_id, b.option, b.replaced_option
), deltas AS (
    SELECT poll_id, option, 1 AS d FROM changed
    UNION ALL
    SELECT poll_id, replaced_option, -1 FROM changed WHERE replaced_option IS NOT NULL
), parts AS (
    INSERT INTO tally_parts AS t (poll_id, option, part, count)
    SELECT poll_id, option, $1::smallint, sum(d) FROM deltas GROUP BY poll_id, option HAVING sum(d) <> 0
     ORDER BY poll_id, option
    ON CONFLICT (poll_id, option, part) DO UPDATE SET count = t.count + EXCLUDED.count
)
SELECT reason, count(*)::int8 FROM refused GROUP BY reason";

/// Where the commit just made is: read after the `COMMIT`, so at or past its record. The WAL
/// file's name starts with the timeline (see [`crate::replay::Commit`]).
pub const POSITION: &str =
    "SELECT pg_walfile_name(pg_current_wal_lsn()), pg_current_wal_lsn()::text";

/// How many tally parts writers spread over. Writers of different aggregators may share a part;
/// that only costs them a wait, never a wrong count.
pub const TALLY_PARTS: u32 = 64;

/// Errors worth retrying: the connection went away, the server is starting or stopping, we
/// reached a replica (after a failover), or we lost a race. Anything else is a bug or bad
/// data, and retrying would only repeat it.
pub fn retriable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        None => std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()),
        Some(code) => {
            code.code().starts_with("08")
                || [
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::ADMIN_SHUTDOWN,
                    SqlState::CRASH_SHUTDOWN,
                    SqlState::CANNOT_CONNECT_NOW,
                    SqlState::READ_ONLY_SQL_TRANSACTION,
                    SqlState::TOO_MANY_CONNECTIONS,
                ]
                .contains(code)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("writing a batch failed and is not retriable: {}", describe(.0))]
pub struct FatalWrite(#[from] tokio_postgres::Error);

/// tokio-postgres prints only "db error"; the server's own words are what an operator needs.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!(
            "{} ({}): {}",
            db.message(),
            db.code().code(),
            db.detail().unwrap_or("")
        ),
        None => e.to_string(),
    }
}

/// Votes a batch kept aside as late, by reason: newly recorded ones only (a redelivered late vote
/// is not counted twice).
pub type Late = Vec<(String, i64)>;

/// A connection with its statements prepared.
struct Connection {
    client: Client,
    copy: Statement,
    upsert: Statement,
    /// Asked after each commit only when acknowledgements wait for replicas.
    position: Option<Statement>,
}

pub struct Writer {
    url: String,
    part: i16,
    conn: Option<Connection>,
    retry_min: Duration,
    retry_max: Duration,
    locate_commits: bool,
}

impl Writer {
    /// A writer adding its tally deltas to `part` (taken modulo [`TALLY_PARTS`]).
    pub fn new(url: String, part: u32, retry_min: Duration, retry_max: Duration) -> Self {
        Self {
            url,
            part: (part % TALLY_PARTS) as i16,
            conn: None,
            retry_min,
            retry_max,
            locate_commits: false,
        }
    }

    /// Also learn where each commit is, for acknowledgements that wait until replicas replayed
    /// it (`Config::wait_replicas`); otherwise the writer does not ask.
    pub fn locating_commits(mut self, yes: bool) -> Self {
        self.locate_commits = yes;
        self
    }

    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.client.is_closed())
    }

    async fn connect(&mut self) -> Result<(), tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(&self.url, tls::postgres()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client.batch_execute(CREATE_STAGE).await?;
        let copy = client.prepare(COPY_STAGE).await?;
        let upsert = client.prepare(UPSERT).await?;
        let position = if self.locate_commits {
            Some(client.prepare(POSITION).await?)
        } else {
            None
        };
        self.conn = Some(Connection {
            client,
            copy,
            upsert,
            position,
        });
        Ok(())
    }

    /// Commits `copy` (a whole binary COPY stream) or keeps trying while the failure is
    /// retriable. Returns the votes it kept aside as late, and where the commit is.
    pub async fn write(
        &mut self,
        copy: Bytes,
        stop_retrying: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<(Late, Option<Commit>), WriteOutcome> {
        let mut backoff = self.retry_min;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.attempt(copy.clone()).await {
                Ok(late) => return Ok(late),
                Err(e) if retriable(&e) => {
                    self.conn = None;
                    if *stop_retrying.borrow() {
                        return Err(WriteOutcome::Abandoned);
                    }
                    tracing::warn!(attempt = attempts, error = %describe(&e), "batch write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry_max);
                }
                Err(e) => return Err(WriteOutcome::Fatal(FatalWrite(e))),
            }
        }
    }

    async fn attempt(
        &mut self,
        copy: Bytes,
    ) -> Result<(Late, Option<Commit>), tokio_postgres::Error> {
        if !self.is_connected() {
            self.connect().await?;
        }
        let result = self.transact(copy).await;
        if result.is_err() {
            // The transaction may still be open, or aborted, on this connection: start afresh.
            self.conn = None;
        }
        result
    }

    /// One transaction in three round trips, which is what a writer far from the primary pays
    /// for: `BEGIN` travels with the start of the `COPY`, the `COMMIT` with the upsert and the
    /// question of where the commit is (statements sent together are pipelined on one
    /// connection). Should the upsert fail, the server answers the `COMMIT` of the aborted
    /// transaction with a rollback, and the upsert's error is what this returns.
    async fn transact(&self, copy: Bytes) -> Result<(Late, Option<Commit>), tokio_postgres::Error> {
        let c = self.conn.as_ref().expect("connected above");
        let (_, sink) = tokio::try_join!(
            c.client.batch_execute("BEGIN"),
            c.client.copy_in::<_, Bytes>(&c.copy)
        )?;
        futures_util::pin_mut!(sink);
        sink.send(copy).await?;
        sink.finish().await?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.part];
        let locate = async {
            match &c.position {
                Some(position) => c.client.query_one(position, &[]).await.map(Some),
                None => Ok(None),
            }
        };
        let (late, (), position) = tokio::try_join!(
            c.client.query(&c.upsert, &params),
            c.client.batch_execute("COMMIT"),
            locate,
        )?;
        let commit = position.and_then(|p| Commit::parse(p.get(0), p.get(1)));
        Ok((late.iter().map(|r| (r.get(0), r.get(1))).collect(), commit))
    }
}

#[derive(Debug)]
pub enum WriteOutcome {
    /// Shutting down while PostgreSQL is away: the batch stays in Redis for the next run.
    Abandoned,
    Fatal(FatalWrite),
}

/// A close set after the catalog was read is at or after the instant it was set, so a vote
/// stamped before the catalog's last read, less this margin for clocks, is before any close the
/// catalog does not know.
const CLOSE_MARGIN: Duration = Duration::from_millis(1500);

/// The batch's rows, judged by what the catalog knows of each poll's close (see
/// `encode::stage_rows`).
fn stage<'a>(
    catalog: &db::CatalogCache,
    votes: impl IntoIterator<Item = &'a model::Vote>,
) -> Vec<encode::Row<'a>> {
    let polls = catalog.load();
    let horizon = catalog
        .age_at(Instant::now())
        .map_or(model::Stamp(0), |age| {
            let back = (age + CLOSE_MARGIN).as_micros() as u64;
            model::Stamp(model::Stamp::now().0.saturating_sub(back))
        });
    encode::stage_rows(
        votes,
        |poll| polls.get(poll).and_then(|p| p.window.closes_at),
        horizon,
    )
}

/// A writer lane: each batch the lane's batcher hands on is encoded, written in one
/// transaction and, for every chunk whose last part this was, acknowledged.
pub async fn write_loop(
    mut writer: Writer,
    catalog: Arc<db::CatalogCache>,
    mut batches: mpsc::Receiver<Batch<Part>>,
    acks: Acks,
    region: String,
    stop: watch::Receiver<bool>,
    retry_max: Duration,
) -> Result<(), FatalWrite> {
    let committed =
        metrics::counter!("tally_aggregator_votes_committed_total", "region" => region.clone());
    let batch_size = metrics::histogram!("tally_aggregator_batch_size", "region" => region.clone());
    let write_seconds =
        metrics::histogram!("tally_aggregator_write_seconds", "region" => region.clone());
    let commit_lag =
        metrics::histogram!("tally_aggregator_commit_lag_seconds", "region" => region.clone());
    let mut copy = bytes::BytesMut::new();
    // Acknowledgements waiting for their commit to be replayed; the lane writes on meanwhile.
    let mut waiting = tokio::task::JoinSet::new();
    loop {
        while waiting.try_join_next().is_some() {}
        let Some(batch) = batches.recv().await else {
            // A clean stop waits a while for the last commits to be replayed; what is still
            // waiting then stays in Redis, for this worker's next run or another's adoption.
            let _ = tokio::time::timeout(REPLAY_GRACE, async {
                while waiting.join_next().await.is_some() {}
            })
            .await;
            return Ok(());
        };
        metrics::counter!("tally_aggregator_flushes_total", "region" => region.clone(), "reason" => batch.reason.as_str()).increment(1);
        let count = batch.items.iter().map(|c| c.votes.len()).sum::<usize>();
        let mut commit = None;
        if count > 0 {
            let rows = stage(&catalog, batch.items.iter().flat_map(|c| c.votes.iter()));
            let oldest = batch
                .items
                .iter()
                .flat_map(|c| c.votes.iter())
                .map(|v| v.cast_at.0)
                .min()
                .unwrap_or(0);
            copy.clear();
            encode::encode(rows, &mut copy);
            let started = Instant::now();
            match writer.write(copy.split().freeze(), &stop).await {
                Ok((late, at)) => {
                    commit = at;
                    for (reason, n) in late {
                        metrics::counter!("tally_aggregator_late_votes_total", "region" => region.clone(), "reason" => reason)
                            .increment(n as u64);
                    }
                }
                // Leave the chunks' in-flight lists in Redis: the next run writes them.
                Err(WriteOutcome::Abandoned) => continue,
                Err(WriteOutcome::Fatal(e)) => {
                    tracing::error!(error = %e, "stopping: a batch cannot be written; its votes stay in Redis");
                    return Err(e);
                }
            }
            write_seconds.record(started.elapsed().as_secs_f64());
            tracing::debug!(
                votes = count,
                chunks = batch.items.len(),
                reason = batch.reason.as_str(),
                seconds = started.elapsed().as_secs_f64(),
                "batch committed"
            );
            let lag = model::Stamp::now().0.saturating_sub(oldest) as f64 / 1e6;
            commit_lag.record(lag);
            committed.increment(count as u64);
        }
        batch_size.record(batch.events as f64);
        // A chunk is acknowledged by the last lane to commit its votes, once the latest commit
        // holding any of them is replayed where asked.
        if count > 0 {
            for part in &batch.items {
                part.chunk.committed_at(commit);
            }
        }
        let complete: Vec<Arc<Pending>> = batch
            .items
            .iter()
            .filter(|part| part.chunk.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
            .map(|part| part.chunk.clone())
            .collect();
        match &acks.replay {
            None => acknowledge(&complete, &acks, &region, retry_max).await,
            Some(replay) => {
                let (replay, acks, region) = (replay.clone(), acks.clone(), region.clone());
                waiting.spawn(async move {
                    for chunk in complete {
                        let replayed = match chunk.committed() {
                            Committed::At(commit) => {
                                let started = Instant::now();
                                let outcome = replay.wait(commit).await;
                                metrics::histogram!("tally_aggregator_replay_wait_seconds", "region" => region.clone())
                                    .record(started.elapsed().as_secs_f64());
                                outcome == Outcome::Replayed
                            }
                            Committed::Nowhere => true,
                            Committed::Apart => false,
                        };
                        if replayed {
                            acknowledge(&[chunk], &acks, &region, retry_max).await;
                        } else {
                            tracing::warn!(key = %chunk.key, "a newer primary may lack this chunk's commit; it stays in Redis to be applied again");
                            // Unclaimed first, so the readers' next look finds its list.
                            drop(chunk);
                            acks.relook_all();
                        }
                    }
                });
            }
        }
    }
}

/// How long a clean stop waits for its last commits to be replayed.
const REPLAY_GRACE: Duration = Duration::from_secs(10);

/// What a lane needs to acknowledge chunks: each shard's link and the flag that makes its reader
/// look for lists no chunk holds, and the replay wait, when asked for.
#[derive(Clone)]
pub struct Acks {
    pub links: Vec<Arc<shard::Link>>,
    pub relook: Vec<Arc<std::sync::atomic::AtomicBool>>,
    pub replay: Option<Arc<Replay>>,
}

impl Acks {
    /// Every reader looks again for lists no chunk holds (a wait gave up on some).
    fn relook_all(&self) {
        for flag in &self.relook {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

async fn acknowledge(chunks: &[Arc<Pending>], acks: &Acks, region: &str, retry_max: Duration) {
    let done = chunks
        .iter()
        .map(|chunk| ack::ack(&acks.links[chunk.shard], chunk, region, retry_max));
    futures_util::future::join_all(done).await;
}
