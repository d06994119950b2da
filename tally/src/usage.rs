//! Usage errors: a bad setting or argument is reported on one line and exits 64 (EX_USAGE),
//! before any port is bound.

/// A bad setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

pub fn bad(e: impl std::fmt::Display) -> anyhow::Error {
    BadConfig(e.to_string()).into()
}
