//! The regions' topology as data (`regions/*.toml`), the Route53 records it calls for, and
//! Route53's answer computed from them, and (feature `route53`) the sync that makes Route53
//! match. Everything here but `sync` is pure; hot-path crates never depend on `route53`.
#![forbid(unsafe_code)]

pub mod answer;
pub mod audience;
pub mod plan;
pub mod records;
#[cfg(feature = "route53")]
pub mod sync;
pub mod topology;

pub use answer::{answer, route, Location};
pub use audience::{home_region, VOTER_MIX};
pub use records::{records, Record};
pub use topology::{Region, Topology, TopologyError};
