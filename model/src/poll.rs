//! Polls and the catalog ingest validates votes against.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{IdError, OptionId, PollId};

/// Most options one poll may have.
pub const MAX_OPTIONS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Poll {
    pub id: PollId,
    pub options: Vec<OptionId>,
    pub open: bool,
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
    /// A new open poll, checked: valid ids, 2..=64 distinct options.
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
            open: true,
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

    /// May this option of this poll be voted for now?
    pub fn check(&self, poll: &str, option: &str) -> Result<&Poll, Rejection> {
        let p = self.polls.get(poll).ok_or(Rejection::UnknownPoll)?;
        if !p.open {
            return Err(Rejection::PollClosed);
        }
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
    fn catalog_rejects_in_order_unknown_closed_option() {
        let mut closed = Poll::new("closed", &["a", "b"]).unwrap();
        closed.open = false;
        let cat = Catalog::new([Poll::new("p", &["a", "b"]).unwrap(), closed]);
        assert!(cat.check("p", "a").is_ok());
        assert_eq!(cat.check("nope", "a").unwrap_err(), Rejection::UnknownPoll);
        assert_eq!(cat.check("closed", "a").unwrap_err(), Rejection::PollClosed);
        assert_eq!(cat.check("p", "c").unwrap_err(), Rejection::UnknownOption);
    }
}
