//! A vote, as it travels from ingest through Redis to the aggregator.

use crate::{OptionId, PollId, RegionName, Stamp, VoteId, VoterId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    pub id: VoteId,
    pub poll: PollId,
    pub option: OptionId,
    pub voter: VoterId,
    /// When ingest accepted it; orders one voter's votes across regions (ties: `id`).
    pub cast_at: Stamp,
    /// The region whose ingest accepted it.
    pub region: RegionName,
}

impl Vote {
    /// The key "latest vote wins" compares.
    pub fn order_key(&self) -> (Stamp, VoteId) {
        (self.cast_at, self.id)
    }
}
