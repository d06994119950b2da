//! PostgreSQL's binary `COPY` format for the staging table, encoded by hand: one buffer per
//! batch, no per-row allocation or type dispatch. Columns, in order:
//! `poll_id text, voter_id text, option text, vote_id uuid, cast_at int8, region text`.

use bytes::{BufMut, BytesMut};
use model::Vote;

/// The staging table, per connection, emptied by every commit.
pub const CREATE_STAGE: &str = "CREATE TEMP TABLE IF NOT EXISTS vote_stage (
    poll_id text NOT NULL, voter_id text NOT NULL, option text NOT NULL,
    vote_id uuid NOT NULL, cast_at int8 NOT NULL, region text NOT NULL
) ON COMMIT DELETE ROWS";

pub const COPY_STAGE: &str =
    "COPY vote_stage (poll_id, voter_id, option, vote_id, cast_at, region) FROM STDIN (FORMAT binary)";

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

#[cfg(test)]
mod tests {
    use super::*;
    use model::{OptionId, PollId, RegionName, Stamp, VoteId, VoterId};

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
}
