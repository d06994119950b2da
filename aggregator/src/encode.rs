//! A batch as PostgreSQL takes it: the latest vote of each voter, in the ballots index's order,
//! in the binary `COPY` format for the staging table, encoded by hand: one buffer per batch, no
//! per-row allocation or type dispatch. Columns, in order:
//! `poll_id text, voter_id text, option text, vote_id uuid, cast_at int8, region text, sure bool`.
//!
//! `sure` says the row is its voter's only one: all of the voter's votes in the batch were
//! deduplicated here. A voter whose latest vote could fall after a close the catalog may not
//! know of yet sends all its votes instead (`sure` false), and the upsert keeps the latest of
//! those it counts: were a late vote to hide the voter's counted one, that one would be lost.

use bytes::{BufMut, BytesMut};
use model::{Stamp, Vote};

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
const COLUMNS: i16 = 7;

/// A staged row: a vote, and whether it is its voter's only row.
pub type Row<'a> = (&'a Vote, bool);

/// The whole COPY stream for `rows`: header, one tuple each, trailer.
pub fn encode<'a>(rows: impl IntoIterator<Item = Row<'a>>, out: &mut BytesMut) {
    out.put_slice(SIGNATURE);
    out.put_u32(0); // flags
    out.put_u32(0); // header extension length
    for (v, sure) in rows {
        out.put_i16(COLUMNS);
        text(out, v.poll.as_str());
        text(out, v.voter.as_str());
        text(out, v.option.as_str());
        out.put_i32(16);
        out.put_u128(v.id.0);
        out.put_i32(8);
        out.put_i64(v.cast_at.0 as i64);
        text(out, v.region.as_str());
        out.put_i32(1);
        out.put_u8(u8::from(sure));
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
pub fn latest_per_voter<'a>(votes: impl IntoIterator<Item = &'a Vote>) -> Vec<&'a Vote> {
    stage_rows(votes, |_| None, Stamp(u64::MAX))
        .into_iter()
        .map(|(v, _)| v)
        .collect()
}

/// The rows to stage for a batch, sorted by (poll, voter) and, within a voter, latest first: one
/// `sure` row for a voter with one vote, or whose latest vote is stamped before `horizon` (before
/// which the catalog knows every close) and before its poll's known close (`close_of`); every
/// vote, none `sure`, for a voter whose latest vote is not.
pub fn stage_rows<'a>(
    votes: impl IntoIterator<Item = &'a Vote>,
    close_of: impl Fn(&str) -> Option<Stamp>,
    horizon: Stamp,
) -> Vec<Row<'a>> {
    let mut all: Vec<&Vote> = votes.into_iter().collect();
    all.sort_unstable_by(|a, b| {
        (a.poll.as_str(), a.voter.as_str())
            .cmp(&(b.poll.as_str(), b.voter.as_str()))
            .then_with(|| b.order_key().cmp(&a.order_key()))
    });
    let mut rows = Vec::with_capacity(all.len());
    for group in all.chunk_by(|a, b| a.poll == b.poll && a.voter == b.voter) {
        let latest = group[0];
        let settled = group.len() == 1
            || (latest.cast_at < horizon
                && close_of(latest.poll.as_str()).is_none_or(|c| latest.cast_at < c));
        if settled {
            rows.push((latest, true));
        } else {
            rows.extend(group.iter().map(|v| (*v, false)));
        }
    }
    rows
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
        encode([(&v, true)], &mut out);
        let mut want = Vec::new();
        want.extend_from_slice(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0");
        want.extend_from_slice(&[0, 7]);
        for s in [b"p", b"v", b"a"] {
            want.extend_from_slice(&[0, 0, 0, 1]);
            want.extend_from_slice(s);
        }
        want.extend_from_slice(&[0, 0, 0, 16]);
        want.extend_from_slice(&1u128.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 8]);
        want.extend_from_slice(&2u64.to_be_bytes());
        want.extend_from_slice(&[0, 0, 0, 1, b'r']);
        want.extend_from_slice(&[0, 0, 0, 1, 1]);
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

        /// Whatever a close the catalog did not know turns out to be, the rows staged still hold
        /// every voter's latest vote before it: judging the rows by that close and keeping each
        /// voter's latest counted row gives what judging every vote would.
        #[test]
        fn staged_rows_never_hide_a_voters_latest_vote_before_any_close(
            raw in proptest::collection::vec((0u8..2, 0u8..12, 0u64..100, any::<u64>()), 0..200),
            horizon in 0u64..120,
            known in proptest::option::of(0u64..120),
            actual_from in 0u64..120,
        ) {
            let votes: Vec<model::Vote> = raw.iter().map(|&(p, v, at, id)| model::Vote {
                id: model::VoteId(id as u128),
                poll: model::PollId::new(format!("p{p}")).unwrap(),
                option: model::OptionId::new("a").unwrap(),
                voter: model::VoterId::new(format!("v{v}")).unwrap(),
                cast_at: model::Stamp(at),
                region: model::RegionName::new("r").unwrap(),
            }).collect();
            // The close the catalog knows of, if any; the real close may be any later instant
            // from `actual_from` on, but never before the horizon unless it is the known one.
            let actual = known.unwrap_or(actual_from.max(horizon));
            let rows = stage_rows(&votes, |_| known.map(Stamp), Stamp(horizon));
            let latest_counted = |candidates: Vec<&model::Vote>| {
                let mut best: std::collections::HashMap<(String, String), (Stamp, model::VoteId)> = Default::default();
                for v in candidates.into_iter().filter(|v| v.cast_at.0 < actual) {
                    let k = (v.poll.to_string(), v.voter.to_string());
                    if best.get(&k).is_none_or(|cur| *cur < v.order_key()) {
                        best.insert(k, v.order_key());
                    }
                }
                best
            };
            prop_assert_eq!(
                latest_counted(rows.iter().map(|(v, _)| *v).collect()),
                latest_counted(votes.iter().collect())
            );
            // A sure row is its voter's only row.
            for (v, sure) in &rows {
                if *sure {
                    prop_assert_eq!(rows.iter().filter(|(w, _)| w.poll == v.poll && w.voter == v.voter).count(), 1);
                }
            }
        }
    }
}
