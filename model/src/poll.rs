//! Polls and the catalog ingest validates votes against.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{IdError, OptionId, PollId, Stamp};

/// Most options one poll may have.
pub const MAX_OPTIONS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    pub id: PollId,
    pub options: Vec<OptionId>,
    /// When votes count: stamped at or after the opening and before the close.
    pub window: Window,
    /// Results are kept from the public until revealed.
    pub hidden: bool,
}

/// When a poll takes votes, in the votes' own stamps (microseconds since the epoch): one instant
/// for every region, judged by each vote's stamp rather than by when anyone looked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub opens_at: Option<Stamp>,
    pub closes_at: Option<Stamp>,
}

impl Window {
    /// Does a vote stamped `at` count?
    pub fn admits(&self, at: Stamp) -> Result<(), Rejection> {
        if self.opens_at.is_some_and(|o| at < o) {
            return Err(Rejection::PollNotOpen);
        }
        if self.closes_at.is_some_and(|c| at >= c) {
            return Err(Rejection::PollClosed);
        }
        Ok(())
    }

    /// Where the poll stands at `now`, unless it is final.
    pub fn state(&self, now: Stamp) -> PollState {
        match self.admits(now) {
            Ok(()) => PollState::Open,
            Err(Rejection::PollNotOpen) => PollState::Scheduled,
            Err(_) => PollState::Closed,
        }
    }
}

/// A poll's life: `scheduled` until it opens, `open`, `closed` once its close has passed, and
/// `final` once every vote acknowledged before the close is counted and the result certified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollState {
    Scheduled,
    Open,
    Closed,
    Final,
}

impl PollState {
    pub fn as_str(self) -> &'static str {
        match self {
            PollState::Scheduled => "scheduled",
            PollState::Open => "open",
            PollState::Closed => "closed",
            PollState::Final => "final",
        }
    }
}

/// Why a poll definition is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("a poll needs at least two options")]
    TooFewOptions,
    #[error("a poll has at most {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option {0:?} is listed twice")]
    DuplicateOption(String),
}

impl Poll {
    /// A new poll that is always open, checked: valid ids, 2..=64 distinct options.
    pub fn new(id: &str, options: &[&str]) -> Result<Self, PollError> {
        let id = PollId::new(id)?;
        let options = options
            .iter()
            .map(|o| OptionId::new(o.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if options.len() < 2 {
            return Err(PollError::TooFewOptions);
        }
        if options.len() > MAX_OPTIONS {
            return Err(PollError::TooManyOptions);
        }
        for (i, o) in options.iter().enumerate() {
            if options[..i].contains(o) {
                return Err(PollError::DuplicateOption(o.to_string()));
            }
        }
        Ok(Poll {
            id,
            options,
            window: Window::default(),
            hidden: false,
        })
    }

    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o.as_str() == option)
    }
}

/// Why a vote is refused before it is stored; each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no such poll")]
    UnknownPoll,
    #[error("the poll is not open yet")]
    PollNotOpen,
    #[error("the poll is closed")]
    PollClosed,
    #[error("the poll has no such option")]
    UnknownOption,
}

/// The polls a role knows about, keyed by id.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    polls: HashMap<String, Poll>,
}

impl Catalog {
    pub fn new(polls: impl IntoIterator<Item = Poll>) -> Self {
        Self {
            polls: polls.into_iter().map(|p| (p.id.to_string(), p)).collect(),
        }
    }

    pub fn get(&self, poll: &str) -> Option<&Poll> {
        self.polls.get(poll)
    }

    /// Is there such a poll with such an option? (Whether a vote counts also depends on its
    /// stamp: see [`Window::admits`].)
    pub fn check(&self, poll: &str, option: &str) -> Result<&Poll, Rejection> {
        let p = self.polls.get(poll).ok_or(Rejection::UnknownPoll)?;
        if !p.has_option(option) {
            return Err(Rejection::UnknownOption);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_definitions_are_checked() {
        assert!(Poll::new("p", &["a", "b"]).is_ok());
        assert_eq!(
            Poll::new("p", &["a"]).unwrap_err(),
            PollError::TooFewOptions
        );
        assert_eq!(
            Poll::new("p", &["a", "a"]).unwrap_err(),
            PollError::DuplicateOption("a".into())
        );
        assert!(matches!(
            Poll::new("p/../x", &["a", "b"]),
            Err(PollError::Id(_))
        ));
        let many: Vec<String> = (0..65).map(|i| format!("o{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(
            Poll::new("p", &many).unwrap_err(),
            PollError::TooManyOptions
        );
    }

    #[test]
    fn catalog_rejects_unknown_polls_and_options() {
        let cat = Catalog::new([Poll::new("p", &["a", "b"]).unwrap()]);
        assert!(cat.check("p", "a").is_ok());
        assert_eq!(cat.check("nope", "a").unwrap_err(), Rejection::UnknownPoll);
        assert_eq!(cat.check("p", "c").unwrap_err(), Rejection::UnknownOption);
    }

    #[test]
    fn a_window_admits_from_its_opening_up_to_but_not_at_its_close() {
        let w = Window {
            opens_at: Some(Stamp(100)),
            closes_at: Some(Stamp(200)),
        };
        assert_eq!(w.admits(Stamp(99)), Err(Rejection::PollNotOpen));
        assert_eq!(w.admits(Stamp(100)), Ok(()));
        assert_eq!(w.admits(Stamp(199)), Ok(()));
        assert_eq!(w.admits(Stamp(200)), Err(Rejection::PollClosed));
        assert_eq!(w.state(Stamp(50)), PollState::Scheduled);
        assert_eq!(w.state(Stamp(150)), PollState::Open);
        assert_eq!(w.state(Stamp(250)), PollState::Closed);
        assert_eq!(
            Window::default().admits(Stamp(0)),
            Ok(()),
            "no window: always open"
        );
    }
}
