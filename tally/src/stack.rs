//! What the plane's commands take from the local stack when none is named: its primary (for the
//! poll commands) and its moto (the local Route53). Only a build with the lab has a local stack.

#[cfg(feature = "lab")]
mod with_lab {
    /// Where a command finds the local stack.
    pub type Dir = lab::DirArg;

    /// The local stack's primary, as the owner.
    pub fn primary_url(dir: &Dir) -> anyhow::Result<String> {
        Ok(lab::local::Stack::require(&dir.path())?.primary_url())
    }

    /// The local stack's moto, when it runs.
    #[cfg(feature = "route53")]
    pub fn moto_url(dir: &Dir) -> anyhow::Result<Option<String>> {
        Ok(lab::local::Stack::load(&dir.path())?
            .map(|s| s.moto())
            .filter(|m| m.is_running())
            .map(|m| m.url()))
    }
}

#[cfg(not(feature = "lab"))]
mod without_lab {
    use crate::usage::bad;

    /// No `--dir` in a build without the lab.
    #[derive(Debug, clap::Args)]
    pub struct Dir {}

    pub fn primary_url(_: &Dir) -> anyhow::Result<String> {
        Err(bad(
            "--postgres-url (TALLY_POSTGRES_URL) is required: this build has no local stack",
        ))
    }

    #[cfg(feature = "route53")]
    pub fn moto_url(_: &Dir) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
}

#[cfg(feature = "lab")]
pub use with_lab::*;
#[cfg(not(feature = "lab"))]
pub use without_lab::*;
