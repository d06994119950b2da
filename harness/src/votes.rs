//! Generated votes and an independent reference for what they must count to.

use std::collections::{BTreeMap, HashMap};

use model::{OptionId, PollId, RegionName, Stamp, Vote, VoteId, VoterId};
use rand::{Rng, SeedableRng};

/// `n` votes from `voters` voters over `polls` (each with options a, b, c), with shuffled stamps
/// so arrival order and "latest" disagree, and about a third of voters voting more than once.
pub fn generate(n: usize, voters: usize, polls: &[&str], seed: u64) -> Vec<Vote> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let region = RegionName::new("us-east-1").unwrap();
    let options = ["a", "b", "c"];
    (0..n)
        .map(|i| {
            let voter = rng.random_range(0..voters);
            let micros = 1_700_000_000_000_000 + rng.random_range(0..1_000_000_000u64);
            Vote {
                id: VoteId(((micros as u128) << 64) | i as u128),
                poll: PollId::new(polls[voter % polls.len()]).unwrap(),
                option: OptionId::new(options[rng.random_range(0..options.len())]).unwrap(),
                voter: VoterId::new(format!("voter-{voter}")).unwrap(),
                cast_at: Stamp(micros),
                region: region.clone(),
            }
        })
        .collect()
}

/// "Latest vote wins" per (poll, voter), computed in memory.
#[derive(Default, Debug)]
pub struct Reference {
    latest: HashMap<(String, String), (Stamp, VoteId, String)>,
}

impl Reference {
    pub fn of<'a>(votes: impl IntoIterator<Item = &'a Vote>) -> Self {
        let mut r = Self::default();
        for v in votes {
            r.apply(v);
        }
        r
    }

    pub fn apply(&mut self, v: &Vote) {
        let key = (v.poll.to_string(), v.voter.to_string());
        let candidate = (v.cast_at, v.id, v.option.to_string());
        match self.latest.get(&key) {
            Some(cur) if (cur.0, cur.1) >= (candidate.0, candidate.1) => {}
            _ => {
                self.latest.insert(key, candidate);
            }
        }
    }

    /// (poll, option) -> count, zero counts left out.
    pub fn tallies(&self) -> BTreeMap<(String, String), i64> {
        let mut t = BTreeMap::new();
        for ((poll, _), (_, _, option)) in &self.latest {
            *t.entry((poll.clone(), option.clone())).or_insert(0) += 1;
        }
        t
    }

    /// (poll, voter) -> option.
    pub fn ballots(&self) -> BTreeMap<(String, String), String> {
        self.latest
            .iter()
            .map(|(k, (_, _, o))| (k.clone(), o.clone()))
            .collect()
    }
}

/// Tallies in PostgreSQL, zero counts left out.
pub async fn tallies(client: &db::Client) -> anyhow::Result<BTreeMap<(String, String), i64>> {
    Ok(client
        .query(
            "SELECT poll_id, option, count FROM tallies WHERE count <> 0",
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

/// Tallies recounted from the ballots table.
pub async fn recount(client: &db::Client) -> anyhow::Result<BTreeMap<(String, String), i64>> {
    Ok(client
        .query(
            "SELECT poll_id, option, count(*) FROM ballots GROUP BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

pub async fn ballots(client: &db::Client) -> anyhow::Result<BTreeMap<(String, String), String>> {
    Ok(client
        .query("SELECT poll_id, voter_id, option FROM ballots", &[])
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}
