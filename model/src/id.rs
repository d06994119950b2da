//! Validated identifiers. Each is checked once, where it enters the system, so that nothing
//! downstream (Redis keys, SQL, HTML, logs) ever sees a path separator, a quote or a control byte.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} contains a character outside {allowed}")]
    BadChar {
        kind: &'static str,
        allowed: &'static str,
    },
}

/// Poll, option and region names: short, URL- and SQL-safe.
const NAME_ALLOWED: &str = "[A-Za-z0-9_-]";
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Voter ids come from JWT subjects and headers (`auth0|123`, emails): any visible ASCII.
const VOTER_ALLOWED: &str = "visible ASCII (0x21-0x7e)";
fn is_voter_byte(b: u8) -> bool {
    (0x21..=0x7e).contains(&b)
}

fn check(
    s: &str,
    kind: &'static str,
    max: usize,
    allowed: &'static str,
    ok: fn(u8) -> bool,
) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !s.bytes().all(ok) {
        return Err(IdError::BadChar { kind, allowed });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $allowed:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted value, in bytes (the wire format stores the length in one byte).
            pub const MAX_LEN: usize = $max;

            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                Self::validate(&s)?;
                Ok(Self(s))
            }

            /// Checks `s` without taking a copy (for hot paths that only pass it on).
            pub fn validate(s: &str) -> Result<(), IdError> {
                check(s, $kind, $max, $allowed, $ok)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A poll's id, e.g. `default` or `final-2026`.
    PollId, "poll id", 64, NAME_ALLOWED, is_name_byte
);
string_id!(
    /// One of a poll's options, e.g. `a`.
    OptionId, "option", 64, NAME_ALLOWED, is_name_byte
);
string_id!(
    /// Whoever casts a vote: a JWT `sub`, an `X-Voter-Id` header or a `voter_id` cookie.
    VoterId, "voter id", 128, VOTER_ALLOWED, is_voter_byte
);
string_id!(
    /// A region's name, e.g. `us-east-1`.
    RegionName, "region", 32, NAME_ALLOWED, is_name_byte
);

/// A vote's unique id: the stamp's microseconds in the high 64 bits (so ids sort by time)
/// and 64 random bits below. Rendered in UUID text form, stored as PostgreSQL `uuid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VoteId(pub u128);

impl VoteId {
    pub fn generate(micros: u64) -> Self {
        Self(((micros as u128) << 64) | rand::random::<u64>() as u128)
    }

    /// The UUID text form, written without the formatting machinery (it is on every vote's path).
    pub fn to_uuid_text(self) -> [u8; 36] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [b'-'; 36];
        let mut pos = 0;
        for (i, byte) in self.0.to_be_bytes().iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                pos += 1;
            }
            out[pos] = HEX[(byte >> 4) as usize];
            out[pos + 1] = HEX[(byte & 0xf) as usize];
            pos += 2;
        }
        out
    }
}

impl fmt::Display for VoteId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(std::str::from_utf8(&self.to_uuid_text()).expect("hex and dashes are ASCII"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_traversal_sql_and_control_bytes() {
        for bad in ["../etc", "a b", "a'b", "a;drop", "a\u{0}", "é", "a/b"] {
            assert!(PollId::new(bad).is_err(), "{bad:?} accepted");
            assert!(OptionId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            PollId::new("").unwrap_err(),
            IdError::Empty { kind: "poll id" }
        );
        assert_eq!(
            PollId::new("x".repeat(65)).unwrap_err().to_string(),
            "poll id is longer than 64 bytes"
        );
        assert!(PollId::new("final-2026_b").is_ok());
    }

    #[test]
    fn voter_ids_accept_jwt_subjects_but_not_spaces() {
        assert!(VoterId::new("auth0|5f1c@example.com").is_ok());
        assert!(VoterId::new("a b").is_err());
        assert!(VoterId::new("x".repeat(129)).is_err());
    }

    #[test]
    fn uuid_text_matches_the_formatter() {
        for v in [0u128, 1, u128::MAX, 0x0123456789abcdef_fedcba9876543210] {
            let want = format!("{v:032x}");
            let want = format!(
                "{}-{}-{}-{}-{}",
                &want[0..8],
                &want[8..12],
                &want[12..16],
                &want[16..20],
                &want[20..]
            );
            assert_eq!(
                std::str::from_utf8(&VoteId(v).to_uuid_text()).unwrap(),
                want
            );
        }
    }

    #[test]
    fn vote_ids_render_as_uuid_text_and_sort_by_time() {
        let id = VoteId(0x0123456789abcdef_fedcba9876543210);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-fedc-ba9876543210");
        assert!(VoteId::generate(10) < VoteId::generate(11));
    }

    #[test]
    fn serde_validates() {
        let ok: PollId = serde_json::from_str("\"p1\"").unwrap();
        assert_eq!(ok.as_str(), "p1");
        assert!(serde_json::from_str::<PollId>("\"../x\"").is_err());
    }
}
