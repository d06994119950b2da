//! Tally's domain model: the nouns every role shares and the bytes a vote has on the wire.
//!
//! Everything here is pure (no IO), so it can be property-tested and benchmarked on its own.
#![forbid(unsafe_code)]

pub mod clock;
pub mod id;
pub mod poll;
pub mod queue;
pub mod shard;
pub mod vote;
pub mod wire;

pub use clock::{Clock, Stamp};
pub use id::{IdError, OptionId, PollId, RegionName, VoteId, VoterId};
pub use poll::{Catalog, Poll, PollState, Rejection, Window};
pub use shard::shard_of;
pub use vote::Vote;
pub use wire::WireError;

/// The poll every fresh database has, as in the original two-option app.
pub const DEFAULT_POLL: &str = "default";
/// The options of [`DEFAULT_POLL`].
pub const DEFAULT_OPTIONS: [&str; 2] = ["a", "b"];
