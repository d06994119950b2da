//! A batch as PostgreSQL takes it: the latest vote of each voter, in the ballots index's order,
//! in the binary `COPY` format for the staging table, encoded by hand: one buffer per batch, no
//! per-row allocation or type dispatch. Columns, in order:
//! `poll_id text, voter_id text, option text, vote_id uuid, cast_at int8, region text`.

use bytes::{BufMut, BytesMut};
use model::Vote;

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const COLUMNS: i16 = 6;

/// The whole COPY stream for `votes`: header, one tuple each, trailer.
pub fn encode<'a>(votes: impl IntoIterator<Item = &'a Vote>, out: &mut BytesMut) {
    out.put_slice(SIGNATURE);
    out.put_u32(0); // flags
    out.put_u32(0); // header extension length
    for v in votes {
        out.put_i16(COLUMNS);
        text(out, v.poll.as_str());
        text(out, v.voter.as_str());
        text(out, v.option.as_str());
        out.put_i32(16);
        out.put_u128(v.id.0);
        out.put_i32(8);
        out.put_i64(v.cast_at.0 as i64);
        text(out, v.region.as_str());
    }
    out.put_i16(-1);
}

fn text(out: &mut BytesMut, s: &str) {
    out.put_i32(s.len() as i32);
    out.put_slice(s.as_bytes());
}

/// The latest vote of each (poll, voter) in a batch, sorted by (poll, voter): what the upsert
/// needs (one row per voter, or PostgreSQL refuses to touch a row twice in one statement), in the
/// ballots index's order. Latest is the greatest `(cast_at, vote id)`, as in PostgreSQL.
pub fn latest_per_voter<'a>(
    votes: impl IntoIterator<Item = &'a model::Vote>,
) -> Vec<&'a model::Vote> {
    let mut all: Vec<&model::Vote> = votes.into_iter().collect();
    all.sort_unstable_by(|a, b| {
        (a.poll.as_str(), a.voter.as_str())
            .cmp(&(b.poll.as_str(), b.voter.as_str()))
            .then_with(|| b.order_key().cmp(&a.order_key()))
    });
    all.dedup_by(|later, first| later.poll == first.poll && later.voter == first.voter);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{OptionId, PollId, RegionName, Stamp, VoteId, VoterId};
    use proptest::prelude::*;

    #[test]
    fn one_row_is_laid_out_as_postgres_expects() {
        let v = Vote {
            id: VoteId(1),
            poll: PollId::new("p").unwrap(),
            option: OptionId::new("a").unwrap(),
            voter: VoterId::new("v").unwrap(),
            cast_at: Stamp(2),
            region: RegionName::new("r").unwrap(),
        };
        let mut out = BytesMut::new();
        encode([&v], &mut out);
        let mut want = Vec::new();
        want.extend_from_slice(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0");
        want.extend_from_slice(&[0, 6]);
        for s in [b"p", b"v", b"a"] {
            want.extend_from_slice(&[0, 0, 0, 1]);
            want.extend_from_slice(s);
        }
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&1u128.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 1, b'r']);
        want.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(&out[..], &want[..]);
    }

    proptest! {
        #[test]
        fn latest_per_voter_keeps_exactly_the_newest_vote_of_each_voter(
            raw in proptest::collection::vec((0u8..4, 0u8..20, 0u64..50, any::<u64>(), 0u8..3), 0..300)
        ) {
            let votes: Vec<model::Vote> = raw.iter().map(|&(p, v, at, id, o)| model::Vote {
                id: model::VoteId(id as u128),
                poll: model::PollId::new(format!("p{p}")).unwrap(),
                option: model::OptionId::new(format!("o{o}")).unwrap(),
                voter: model::VoterId::new(format!("v{v}")).unwrap(),
                cast_at: model::Stamp(at),
                region: model::RegionName::new("r").unwrap(),
            }).collect();
            let mut want: std::collections::HashMap<(String, String), &model::Vote> = Default::default();
            for v in &votes {
                let k = (v.poll.to_string(), v.voter.to_string());
                if want.get(&k).is_none_or(|cur| cur.order_key() < v.order_key()) {
                    want.insert(k, v);
                }
            }
            let got = latest_per_voter(&votes);
            prop_assert_eq!(got.len(), want.len());
            for w in got.windows(2) {
                prop_assert!((w[0].poll.as_str(), w[0].voter.as_str()) < (w[1].poll.as_str(), w[1].voter.as_str()));
            }
            for v in got {
                prop_assert_eq!(v.order_key(), want[&(v.poll.to_string(), v.voter.to_string())].order_key());
            }
        }
    }
}
