//! The lab: everything that proves the plane and is not part of it. Three regions on this
//! machine from real servers (`local`), simulated voters routed as Route53 would route them
//! (`edge`, `load`) with their report (`report`), faults under load (`drill`, `gauntlet`),
//! hostile input (`bad_input`), the local identity provider (`idp`), and the `tally` subcommands that run them (`cli`). The
//! container image never links this crate: `tally` builds it only with its `lab` feature.
#![forbid(unsafe_code)]

pub mod bad_input;
pub mod cli;
pub mod drill;
pub mod edge;
pub mod freshness;
pub mod gauntlet;
pub mod idp;
pub mod load;
pub mod local;
pub mod rehearsal;
pub mod report;
pub mod target;

pub use cli::{BadArgs, Command, DirArg};
