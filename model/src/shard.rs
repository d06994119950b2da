//! Which Redis shard holds a vote: a stable hash of (poll, voter) and jump consistent hashing.
//!
//! Stable across processes, machines and releases (no `std` hasher, whose seed and algorithm
//! may change), so an ingest and an aggregator built years apart agree; one voter's votes
//! always land on one shard, in order. Jump hashing moves only 1/n of the keys when a shard
//! is added. A checked-in table in the tests pins the function.

/// FNV-1a, 64 bit, over `poll`, a separator byte no id may contain, then `voter`.
fn key_hash(poll: &str, voter: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &b in poll
        .as_bytes()
        .iter()
        .chain(&[0xff])
        .chain(voter.as_bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(PRIME);
    }
    // FNV's low bits mix poorly for keys that differ only at the end; finish with splitmix64.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Lamping & Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm" (2014).
fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = (((b + 1) as f64) * ((1u64 << 31) as f64 / (((key >> 33) + 1) as f64))) as i64;
    }
    b as u32
}

/// The shard, in `0..shards`, for this poll and voter. `shards` of 0 is treated as 1.
pub fn shard_of(poll: &str, voter: &str, shards: u32) -> u32 {
    jump(key_hash(poll, voter), shards.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned: if this table changes, votes already queued would be looked for on the wrong shard.
    #[test]
    fn stable_table() {
        let table: &[(&str, &str, u32, u32)] = &[
            ("default", "voter-0", 2, 1),
            ("default", "voter-1", 2, 1),
            ("default", "voter-2", 16, 14),
            ("default", "auth0|123", 16, 6),
            ("final-2026", "voter-0", 16, 14),
            ("final-2026", "alice@example.com", 3, 2),
            ("p", "v", 1, 0),
            ("p", "v", 1000, 718),
        ];
        let got: Vec<_> = table
            .iter()
            .map(|&(p, v, n, _)| (p, v, n, shard_of(p, v, n)))
            .collect();
        let want: Vec<_> = table.to_vec();
        assert_eq!(got, want);
    }

    #[test]
    fn spreads_a_million_voters_over_16_shards_within_2_percent() {
        let mut counts = [0u32; 16];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..1_000_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            counts[shard_of("default", &format!("{rng:x}"), 16) as usize] += 1;
        }
        let even = 1_000_000.0 / 16.0;
        for (shard, &c) in counts.iter().enumerate() {
            let off = (c as f64 - even).abs() / even;
            assert!(
                off < 0.02,
                "shard {shard} has {c} voters, {:.2}% off even",
                off * 100.0
            );
        }
    }

    #[test]
    fn growing_from_4_to_5_shards_moves_about_a_fifth_of_voters() {
        let moved = (0..100_000)
            .filter(|i| {
                let v = format!("voter-{i}");
                shard_of("p", &v, 4) != shard_of("p", &v, 5)
            })
            .count();
        assert!((18_000..22_000).contains(&moved), "moved {moved}");
    }
}
