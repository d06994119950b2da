//! The bytes a vote has in a Redis list.
//!
//! Version 1, big-endian, 26 fixed bytes then four length-prefixed strings:
//!
//! ```text
//! u8 version=1 | u128 vote_id | u64 cast_at_micros | u8 len, poll | u8 len, option | u8 len, voter | u8 len, region
//! ```
//!
//! A version byte first so a future ingest can change the layout while old aggregators refuse it
//! by name ([`WireError::UnsupportedVersion`]) instead of misreading it.
//!
//! Every vote says its own length, so a list element may hold several votes back to back: ingest
//! pushes each group-commit write as one element (Redis then stores and moves one element where
//! it would have handled fifty), and [`split`] takes an element apart again.

use crate::{IdError, OptionId, PollId, RegionName, Stamp, Vote, VoteId, VoterId};

pub const VERSION: u8 = 1;
const FIXED: usize = 1 + 16 + 8;

/// Why bytes are not a vote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("empty payload")]
    Empty,
    #[error("unsupported wire version {0} (this build reads version {VERSION})")]
    UnsupportedVersion(u8),
    #[error("payload truncated in {field}")]
    Truncated { field: &'static str },
    #[error("{field} is not UTF-8")]
    NotUtf8 { field: &'static str },
    #[error("invalid {field}: {source}")]
    Invalid {
        field: &'static str,
        source: IdError,
    },
    #[error("{0} unexpected bytes after the vote")]
    TrailingBytes(usize),
}

/// Appends the encoding of `vote` to `out` (callers reuse one buffer per batch).
pub fn encode_into(vote: &Vote, out: &mut Vec<u8>) {
    let fields = Fields {
        id: vote.id,
        cast_at: vote.cast_at,
        poll: vote.poll.as_str(),
        option: vote.option.as_str(),
        voter: vote.voter.as_str(),
        region: vote.region.as_str(),
    };
    fields.encode_into(out);
}

/// A vote's fields, borrowed: what ingest encodes without building an owned [`Vote`]. The
/// strings must already be valid ids of their kinds (at most 255 bytes each).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub id: VoteId,
    pub cast_at: Stamp,
    pub poll: &'a str,
    pub option: &'a str,
    pub voter: &'a str,
    pub region: &'a str,
}

impl Fields<'_> {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.reserve(
            FIXED + 4 + self.poll.len() + self.option.len() + self.voter.len() + self.region.len(),
        );
        out.push(VERSION);
        out.extend_from_slice(&self.id.0.to_be_bytes());
        out.extend_from_slice(&self.cast_at.0.to_be_bytes());
        for s in [self.poll, self.option, self.voter, self.region] {
            // Every id type caps its length at or below 255 bytes, so the cast cannot truncate.
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

pub fn encode(vote: &Vote) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(vote));
    encode_into(vote, &mut out);
    out
}

pub fn encoded_len(vote: &Vote) -> usize {
    FIXED
        + 4
        + vote.poll.as_str().len()
        + vote.option.as_str().len()
        + vote.voter.as_str().len()
        + vote.region.as_str().len()
}

pub fn decode(bytes: &[u8]) -> Result<Vote, WireError> {
    let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let mut r = Reader { rest };
    let id = VoteId(u128::from_be_bytes(r.array("vote id")?));
    let cast_at = Stamp(u64::from_be_bytes(r.array("timestamp")?));
    let poll = PollId::new(r.string("poll id")?).map_err(|source| WireError::Invalid {
        field: "poll id",
        source,
    })?;
    let option = OptionId::new(r.string("option")?).map_err(|source| WireError::Invalid {
        field: "option",
        source,
    })?;
    let voter = VoterId::new(r.string("voter id")?).map_err(|source| WireError::Invalid {
        field: "voter id",
        source,
    })?;
    let region = RegionName::new(r.string("region")?).map_err(|source| WireError::Invalid {
        field: "region",
        source,
    })?;
    if !r.rest.is_empty() {
        return Err(WireError::TrailingBytes(r.rest.len()));
    }
    Ok(Vote {
        id,
        poll,
        option,
        voter,
        cast_at,
        region,
    })
}

/// The votes of one list element, each as its own bytes (framed by their lengths, not yet
/// decoded), in order. Ends at the first bytes that do not frame a vote: past them no later vote
/// can be found, so they stay in [`Split::rest`] for whoever dead-letters them.
pub fn split(element: &[u8]) -> Split<'_> {
    Split {
        rest: element,
        failed: false,
    }
}

pub struct Split<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Split<'a> {
    /// The bytes not yet returned; after an error, everything from the vote that failed.
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn frame(&self) -> Result<usize, WireError> {
        let (&version, _) = self.rest.split_first().ok_or(WireError::Empty)?;
        if version != VERSION {
            return Err(WireError::UnsupportedVersion(version));
        }
        for (end, field) in [(1 + 16, "vote id"), (FIXED, "timestamp")] {
            if self.rest.len() < end {
                return Err(WireError::Truncated { field });
            }
        }
        let mut len = FIXED;
        for field in ["poll id", "option", "voter id", "region"] {
            let &n = self.rest.get(len).ok_or(WireError::Truncated { field })?;
            len += 1 + n as usize;
            if len > self.rest.len() {
                return Err(WireError::Truncated { field });
            }
        }
        Ok(len)
    }
}

impl<'a> Iterator for Split<'a> {
    type Item = Result<&'a [u8], WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match self.frame() {
            Ok(len) => {
                let (vote, rest) = self.rest.split_at(len);
                self.rest = rest;
                Some(Ok(vote))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], WireError> {
        if self.rest.len() < n {
            return Err(WireError::Truncated { field });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        Ok(self
            .take(N, field)?
            .try_into()
            .expect("take returned N bytes"))
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let [len] = self.array::<1>(field)?;
        let bytes = self.take(len as usize, field)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::NotUtf8 { field })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vote() -> Vote {
        Vote {
            id: VoteId(0x0102030405060708090a0b0c0d0e0f10),
            poll: PollId::new("default").unwrap(),
            option: OptionId::new("a").unwrap(),
            voter: VoterId::new("auth0|voter-1").unwrap(),
            cast_at: Stamp(1_763_000_000_123_456),
            region: RegionName::new("eu-west-1").unwrap(),
        }
    }

    #[test]
    fn layout_is_stable() {
        let bytes = encode(&vote());
        assert_eq!(bytes.len(), encoded_len(&vote()));
        assert_eq!(bytes[0], 1);
        assert_eq!(
            &bytes[1..17],
            &0x0102030405060708090a0b0c0d0e0f10u128.to_be_bytes()
        );
        assert_eq!(&bytes[25..33], b"\x07default");
    }

    #[test]
    fn garbage_truncated_and_future_payloads_are_typed_errors() {
        assert_eq!(decode(b""), Err(WireError::Empty));
        assert_eq!(decode(b"\x02rest"), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(
            decode(b"{\"voter_id\":\"x\"}"),
            Err(WireError::UnsupportedVersion(b'{'))
        );
        let full = encode(&vote());
        assert_eq!(
            decode(&full[..10]),
            Err(WireError::Truncated { field: "vote id" })
        );
        assert_eq!(
            decode(&full[..20]),
            Err(WireError::Truncated { field: "timestamp" })
        );
        assert_eq!(
            decode(&full[..30]),
            Err(WireError::Truncated { field: "poll id" })
        );
        assert_eq!(
            decode(&full[..full.len() - 1]),
            Err(WireError::Truncated { field: "region" })
        );
        let mut long = full.clone();
        long.push(0);
        assert_eq!(decode(&long), Err(WireError::TrailingBytes(1)));
        let mut bad_utf8 = full.clone();
        bad_utf8[26] = 0xff;
        assert_eq!(
            decode(&bad_utf8),
            Err(WireError::NotUtf8 { field: "poll id" })
        );
        let mut bad_id = full;
        bad_id[26] = b'/';
        assert!(matches!(
            decode(&bad_id),
            Err(WireError::Invalid {
                field: "poll id",
                ..
            })
        ));
    }

    #[test]
    fn an_element_splits_into_its_votes_and_keeps_what_does_not_frame_one() {
        let one = encode(&vote());
        let mut element = one.clone();
        element.extend_from_slice(&one);
        element.extend_from_slice(b"\x01short");
        let mut split = split(&element);
        assert_eq!(split.next(), Some(Ok(&one[..])));
        assert_eq!(split.next(), Some(Ok(&one[..])));
        assert_eq!(
            split.next(),
            Some(Err(WireError::Truncated { field: "vote id" }))
        );
        assert_eq!(
            split.next(),
            None,
            "nothing is found past bytes that do not frame a vote"
        );
        assert_eq!(split.rest(), b"\x01short");
        assert_eq!(super::split(b"").count(), 0);
        assert_eq!(
            super::split(b"not a vote").next(),
            Some(Err(WireError::UnsupportedVersion(b'n')))
        );
    }

    fn name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{1,32}"
    }

    fn any_vote() -> impl Strategy<Value = Vote> {
        (
            any::<u128>(),
            any::<u64>(),
            name(),
            name(),
            "[!-~]{1,128}",
            name(),
        )
            .prop_map(|(id, at, poll, option, voter, region)| Vote {
                id: VoteId(id),
                poll: PollId::new(poll).unwrap(),
                option: OptionId::new(option).unwrap(),
                voter: VoterId::new(voter).unwrap(),
                cast_at: Stamp(at),
                region: RegionName::new(region).unwrap(),
            })
    }

    proptest! {
        #[test]
        fn round_trips_every_field(v in any_vote()) {
            prop_assert_eq!(decode(&encode(&v)), Ok(v));
        }

        #[test]
        fn votes_back_to_back_split_into_each_encoding(votes in proptest::collection::vec(any_vote(), 0..20)) {
            let element: Vec<u8> = votes.iter().flat_map(encode).collect();
            let split: Vec<&[u8]> = split(&element).collect::<Result<_, _>>().unwrap();
            prop_assert_eq!(split.len(), votes.len());
            for (bytes, v) in split.into_iter().zip(votes) {
                prop_assert_eq!(decode(bytes), Ok(v));
            }
        }

        /// Whatever the damage, every byte of an element is either in a framed vote or in the
        /// rest handed to the dead letters: nothing is skipped or read twice.
        #[test]
        fn a_damaged_element_loses_no_byte(
            votes in proptest::collection::vec(any_vote(), 1..8),
            damage in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut element: Vec<u8> = votes.iter().flat_map(encode).collect();
            for (at, byte) in &damage {
                let i = at.index(element.len());
                element[i] = *byte;
            }
            element.truncate(cut.index(element.len() + 1));
            let mut split = split(&element);
            let mut seen: Vec<u8> = Vec::new();
            for vote in split.by_ref() {
                match vote {
                    Ok(bytes) => seen.extend_from_slice(bytes),
                    Err(_) => break,
                }
            }
            seen.extend_from_slice(split.rest());
            prop_assert_eq!(seen, element);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        /// Random bytes rarely get past the version byte; a real payload from Redis, cut short or
        /// with bytes overwritten, reaches every length and field check. Whatever decodes must be
        /// a valid vote that encodes back to the same bytes: nothing half-read is ever counted.
        #[test]
        fn damaged_payloads_are_refused_or_decode_to_exactly_what_they_say(
            v in any_vote(),
            cut in any::<proptest::sample::Index>(),
            damage in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut bytes = encode(&v);
            for (at, byte) in &damage {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            if damage.is_empty() {
                bytes.truncate(cut.index(bytes.len()));
            }
            if let Ok(decoded) = decode(&bytes) {
                prop_assert_eq!(encode(&decoded), bytes);
            }
        }
    }
}
