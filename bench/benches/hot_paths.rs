//! Criterion benches of the hot paths: a vote's decode/validate/encode, shard choice, the
//! per-voter limit, batch assembly and COPY encoding. Gate a change with `tally bench gate` (see
//! the README).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aggregator::batch::{Batcher, Weighed};
use aggregator::BatchConfig;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ingest::config::{Rate, DEFAULT_LIMIT_KEYS};
use ingest::limit::Limiter;
use model::{Catalog, OptionId, Poll, PollId, RegionName, Stamp, Vote, VoteId, VoterId};

/// One measured iteration. Built with `--features slowdown`, it does the work four times: the
/// deliberately slowed build that proves the regression gate fails (tally/tests/gate.rs).
#[inline(always)]
fn work<T>(mut f: impl FnMut() -> T) -> T {
    if cfg!(feature = "slowdown") {
        for _ in 0..3 {
            black_box(f());
        }
    }
    f()
}

fn vote(i: u64) -> Vote {
    Vote {
        id: VoteId::generate(1_763_000_000_000_000 + i),
        poll: PollId::new("default").unwrap(),
        option: OptionId::new(if i.is_multiple_of(2) { "a" } else { "b" }).unwrap(),
        voter: VoterId::new(format!("voter-{i}")).unwrap(),
        cast_at: Stamp(1_763_000_000_000_000 + i),
        region: RegionName::new("eu-west-1").unwrap(),
    }
}

fn wire(c: &mut Criterion) {
    let catalog = Catalog::new([Poll::new("default", &["a", "b"]).unwrap()]);
    let v = vote(7);
    let bytes = model::wire::encode(&v);
    let mut g = c.benchmark_group("vote");
    g.throughput(Throughput::Elements(1));
    // Ingest's own steps for a vote: its body decoded, its poll and option checked against the
    // catalog, its voter's id validated, and its fields encoded into the batch it joins.
    let mut batch = Vec::with_capacity(64 * 1024);
    g.bench_function("parse_validate_encode", |b| {
        b.iter(|| {
            work(|| {
                let option = ingest::request::json_vote(black_box(br#"{"option":"a"}"#)).unwrap();
                catalog.check("default", &option).unwrap();
                let voter = black_box("voter-123456");
                VoterId::validate(voter).unwrap();
                if batch.len() > 60 * 1024 {
                    batch.clear();
                }
                model::wire::Fields {
                    id: v.id,
                    cast_at: v.cast_at,
                    poll: "default",
                    option: &option,
                    voter,
                    region: "eu-west-1",
                }
                .encode_into(&mut batch);
                black_box(batch.len())
            })
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| work(|| model::wire::decode(black_box(&bytes)).unwrap()))
    });
    g.bench_function("shard_of", |b| {
        b.iter(|| work(|| model::shard_of(black_box("default"), black_box("voter-123456"), 16)))
    });
    g.finish();
}

/// The per-voter limit with as many voters as the ingest benchmark has, in a table of the
/// default size (4.6 MiB, beyond a core's own caches; on a machine whose shared cache holds it,
/// as this one's does, a check here misses less than ingest's do under load). `vote_then_check` is a vote's path as ingest took it before
/// 2026-12-05 (decode and validate the body, then check the voter); `locate_vote_check` locates
/// the voter's set first, so its load overlaps the decoding, as ingest does now.
fn limit(c: &mut Criterion) {
    const VOTERS: u64 = 100_000;
    let limiter = Limiter::new(
        Rate {
            per_second: 1e9,
            burst: 1e9,
        },
        DEFAULT_LIMIT_KEYS,
        metrics::Counter::noop(),
    );
    let catalog = Catalog::new([Poll::new("default", &["a", "b"]).unwrap()]);
    let now = Instant::now();
    // Voters in a scattered order, as the benchmark's load generator sends them.
    let mut n = 0u64;
    let mut next_voter = move || {
        n += 1;
        (n.wrapping_mul(2_654_435_761) % VOTERS).to_le_bytes()
    };
    let decode = |body: &[u8]| {
        let body: serde_json::Value = serde_json::from_slice(body).unwrap();
        let option = body["option"].as_str().unwrap().to_owned();
        catalog.check("default", &option).unwrap();
        option
    };
    let mut g = c.benchmark_group("limit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check_one_of_100k_voters", |b| {
        b.iter(|| work(|| black_box(limiter.check(&next_voter(), now))))
    });
    g.bench_function("vote_then_check", |b| {
        b.iter(|| {
            work(|| {
                let voter = next_voter();
                let option = decode(black_box(br#"{"option":"a"}"#));
                black_box((option, limiter.check(&voter, now)))
            })
        })
    });
    g.bench_function("locate_vote_check", |b| {
        b.iter(|| {
            work(|| {
                let bucket = limiter.locate(&next_voter());
                let option = decode(black_box(br#"{"option":"a"}"#));
                black_box((option, bucket.take(now)))
            })
        })
    });
    g.finish();
}

struct Chunk(usize);
impl Weighed for Chunk {
    fn events(&self) -> usize {
        self.0
    }
    fn bytes(&self) -> usize {
        self.0 * 60
    }
}

fn batching(c: &mut Criterion) {
    let votes: Vec<Vote> = (0..10_000).map(vote).collect();
    let mut g = c.benchmark_group("aggregator");
    g.throughput(Throughput::Elements(votes.len() as u64));
    g.bench_function("copy_encode_10k", |b| {
        let mut out = bytes::BytesMut::with_capacity(1 << 20);
        b.iter(|| {
            work(|| {
                out.clear();
                aggregator::encode::encode(black_box(&votes).iter().map(|v| (v, true)), &mut out);
                black_box(out.len())
            })
        })
    });
    g.throughput(Throughput::Elements(1_000));
    g.bench_function("batch_assembly_1k_chunks", |b| {
        let config = BatchConfig {
            max_events: 20_000,
            max_bytes: 8 << 20,
            timeout: Duration::from_millis(20),
        };
        b.iter(|| {
            work(|| {
                let mut batcher = Batcher::new(config);
                let now = Instant::now();
                let mut batches = 0;
                for i in 0..1_000 {
                    if batcher.push(Chunk(100 + i % 7), now).is_some() {
                        batches += 1;
                    }
                }
                black_box(batches)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, wire, limit, batching);
criterion_main!(benches);
