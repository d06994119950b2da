//! What anyone may check about a poll's result: its ballots listed canonically (one line a
//! ballot, `voter<TAB>option`, sorted by voter id byte by byte), the SHA-256 of that listing, and
//! a recount from the ballots set against the tallies the readers serve.

use std::collections::BTreeMap;

use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;

use crate::DbError;

/// The `COPY` that lists a poll's ballots canonically. Poll ids are a checked character set, so
/// quoting is enough (`COPY` takes no parameters).
fn listing(poll: &str) -> String {
    format!(
        "COPY (SELECT voter_id, option FROM ballots WHERE poll_id = '{}' ORDER BY voter_id COLLATE \"C\") TO STDOUT",
        poll.replace('\'', "''")
    )
}

/// The SHA-256 (hex) of the poll's canonical listing and how many ballots it lists; each chunk
/// of the listing also goes to `sink` (an export file), so the file and the digest are one read.
pub async fn digest<C: GenericClient>(
    client: &C,
    poll: &str,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<(String, u64), DbError> {
    // On the connection itself: within a transaction, the transaction's own, so it reads what it locked.
    let stream = client.client().copy_out(&listing(poll)).await?;
    futures_util::pin_mut!(stream);
    let mut hash = Sha256::new();
    let mut lines = 0u64;
    while let Some(chunk) = stream.try_next().await? {
        hash.update(&chunk);
        lines += chunk.iter().filter(|&&b| b == b'\n').count() as u64;
        sink(&chunk).map_err(|e| DbError::Export(e.to_string()))?;
    }
    Ok((hex(&hash.finalize()), lines))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Votes per option, recounted from the ballots.
pub(crate) async fn recount<C: GenericClient>(
    client: &C,
    poll: &str,
) -> Result<BTreeMap<String, i64>, DbError> {
    Ok(client
        .query(
            "SELECT option, count(*) FROM ballots WHERE poll_id = $1 GROUP BY option",
            &[&poll],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// Votes per option, as the tallies (what readers serve) have them; options with none are 0.
pub(crate) async fn tallied<C: GenericClient>(
    client: &C,
    poll: &str,
) -> Result<BTreeMap<String, i64>, DbError> {
    let options: Vec<String> = client
        .query_opt("SELECT options FROM polls WHERE id = $1", &[&poll])
        .await?
        .ok_or_else(|| DbError::NoSuchPoll(poll.to_string()))?
        .get(0);
    let mut counts: BTreeMap<String, i64> = options.into_iter().map(|o| (o, 0)).collect();
    for r in client
        .query(
            "SELECT option, count FROM tallies WHERE poll_id = $1",
            &[&poll],
        )
        .await?
    {
        counts.insert(r.get(0), r.get(1));
    }
    Ok(counts)
}

/// Two counts agree when every option has the same number (an option missing is 0).
pub fn same_counts(a: &BTreeMap<String, i64>, b: &BTreeMap<String, i64>) -> bool {
    a.keys()
        .chain(b.keys())
        .all(|k| a.get(k).copied().unwrap_or(0) == b.get(k).copied().unwrap_or(0))
}

/// A poll's audit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Audit {
    pub poll: String,
    /// Did the recount from the ballots agree with the tallies, and (when final) with the
    /// certified counts and digest?
    pub matches: bool,
    pub counts: BTreeMap<String, i64>,
    pub tallied: BTreeMap<String, i64>,
    pub by_region: BTreeMap<String, BTreeMap<String, i64>>,
    /// Votes not counted because of when they were stamped, per region and reason.
    pub refused: BTreeMap<String, BTreeMap<String, i64>>,
    pub ballots: u64,
    pub digest: String,
    pub state: String,
    pub certified_counts: Option<BTreeMap<String, i64>>,
    pub certified_digest: Option<String>,
}

/// Recounts a poll from its ballots, independently of the tallies, and sets it against them and
/// against what was certified; `sink` takes the canonical listing.
pub async fn audit<C: GenericClient>(
    client: &C,
    poll: &str,
    sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<Audit, DbError> {
    let row = crate::poll_row(client.client(), poll).await?;
    let certified = client
        .query_one(
            "SELECT final_counts::text, digest FROM polls WHERE id = $1",
            &[&poll],
        )
        .await?;
    let certified_counts: Option<BTreeMap<String, i64>> = certified
        .get::<_, Option<String>>(0)
        .and_then(|t| serde_json::from_str(&t).ok());
    let certified_digest: Option<String> = certified.get(1);
    let counts = recount(client, poll).await?;
    let tallied = tallied(client, poll).await?;
    let mut by_region: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT region, option, count(*) FROM ballots WHERE poll_id = $1 GROUP BY region, option",
            &[&poll],
        )
        .await?
    {
        by_region
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), r.get(2));
    }
    let mut refused: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for r in client
        .query(
            "SELECT region, reason, count(*) FROM late_votes WHERE poll_id = $1 GROUP BY region, reason",
            &[&poll],
        )
        .await?
    {
        refused
            .entry(r.get(0))
            .or_default()
            .insert(r.get(1), r.get(2));
    }
    let (digest, ballots) = digest(client, poll, sink).await?;
    let matches = same_counts(&counts, &tallied)
        && certified_counts
            .as_ref()
            .is_none_or(|c| same_counts(c, &counts))
        && certified_digest.as_ref().is_none_or(|d| *d == digest);
    let state = match row.final_at {
        Some(_) => model::PollState::Final,
        None => row.window.state(row.now),
    };
    Ok(Audit {
        poll: poll.to_string(),
        matches,
        counts,
        tallied,
        by_region,
        refused,
        ballots,
        digest,
        state: state.as_str().to_string(),
        certified_counts,
        certified_digest,
    })
}
