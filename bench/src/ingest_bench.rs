//! `tally bench ingest`: ingest backed by real Redis shards against a baseline under the same
//! load, alternating rounds in one run. The baseline is a bare hyper server that only reads the
//! body and answers 202 (the ceiling), or the original app's vote service (`tally bench original`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;

use crate::cpu::CpuMeter;
use crate::load::{alternate, open_loop, window_p99_ms, MakeRequest};
use crate::Comparison;

#[derive(Debug, Clone)]
pub struct Options {
    /// Each measured round.
    pub round: Duration,
    /// Rounds per side, alternating.
    pub pairs: usize,
    pub connections: usize,
    pub voters: u64,
    /// Redis shards behind ingest, each its own `redis-server` on this machine's cores.
    pub shards: usize,
    /// How ingest's shard writers form their writes.
    pub group: ingest::GroupCommit,
    pub redis_fsync: servers::Fsync,
    /// Each shard has a replica and ingest waits for it (`WAIT 1`) before it acknowledges, as
    /// the local stack and the deployment run.
    pub redis_replica: bool,
    /// Ingest's per-voter rate limit, on as it ships. Off only to compare with figures taken
    /// before 2026-12-02, when the benchmark turned it off: it costs ingest about 1 µs a vote
    /// (a cold lookup among a million voters' buckets).
    pub voter_limit: bool,
    /// Voters hold tokens of an identity provider (RS256, as Auth0 issues them), which ingest
    /// verifies: `Some(k)` sends each voter's token `k` times (`1`: every vote a new voter).
    pub auth_votes_per_voter: Option<u64>,
    pub baseline: Baseline,
}

/// The open loops' p99 is also reported per window this long, to show whether a missed target
/// was a queue that grew all through the round or a stall.
pub const OPEN_LOOP_WINDOW: Duration = Duration::from_millis(500);

/// Two, so the benchmark goes through the shard choice and two group-commit writers.
pub const DEFAULT_SHARDS: usize = 2;
/// Connections that keep both sides busy on two cores, so the ratio compares throughput; at 32,
/// ingest's rate is bounded by its round trip to Redis (0.48-0.58x on the same machines).
pub const DEFAULT_CONNECTIONS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Baseline {
    #[default]
    BareHyper,
    /// A new Redis connection and one `RPUSH` per request, against the same Redis.
    OriginalVoteService,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            round: Duration::from_secs(3),
            pairs: crate::load::DEFAULT_PAIRS,
            connections: DEFAULT_CONNECTIONS,
            voters: 1_000_000,
            shards: DEFAULT_SHARDS,
            group: ingest::GroupCommit::default(),
            redis_fsync: servers::Fsync::Everysec,
            redis_replica: false,
            voter_limit: true,
            auth_votes_per_voter: None,
            baseline: Baseline::BareHyper,
        }
    }
}

/// Distinct tokens minted for `--auth` (RS256 signing is slow: minted before the rounds).
const AUTH_TOKENS: usize = 8192;
/// Voters a block of `--auth` votes spreads over: more than the connections, so one voter's
/// votes are never in flight together and each after the first finds its token remembered.
const AUTH_BLOCK_VOTERS: u64 = 1024;

/// Votes of voters holding tokens: blocks of [`AUTH_BLOCK_VOTERS`] voters, each voting
/// `per_voter` times, a block's votes taking turns among its voters. Ingest remembers twice a
/// block's tokens, least recently used first out, so a voter's first vote in a block is verified
/// and the rest are not: one verification each `per_voter` votes, as if every block's voters were
/// new. (Truly new voters would need a token minted a vote; the pool wraps after
/// [`AUTH_TOKENS`], long after ingest forgot them.)
fn authenticated_votes(tokens: Arc<Vec<String>>, per_voter: u64) -> MakeRequest {
    Arc::new(move |n| {
        let block = n / (AUTH_BLOCK_VOTERS * per_voter);
        let voter = block * AUTH_BLOCK_VOTERS + n % AUTH_BLOCK_VOTERS;
        let option = if n % 3 == 0 {
            &b"{\"option\":\"b\"}"[..]
        } else {
            &b"{\"option\":\"a\"}"[..]
        };
        Request::post("/v1/polls/default/votes")
            .header("content-type", "application/json")
            .header(
                "authorization",
                &tokens[(voter % tokens.len() as u64) as usize],
            )
            .body(Full::new(Bytes::from_static(option)))
            .expect("static request")
    })
}

/// [`AUTH_TOKENS`] tokens of distinct voters, signed on every core.
fn mint(issuer: &harness::idp::Issuer) -> Vec<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let each = AUTH_TOKENS.div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t * each..((t + 1) * each).min(AUTH_TOKENS))
                        .map(|i| format!("Bearer {}", issuer.token(&format!("voter-{i}"), 3600)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("minting"))
            .collect()
    })
}

fn votes(voters: u64) -> MakeRequest {
    Arc::new(move |n| {
        let option = if n % 3 == 0 {
            &b"{\"option\":\"b\"}"[..]
        } else {
            &b"{\"option\":\"a\"}"[..]
        };
        Request::post("/v1/polls/default/votes")
            .header("content-type", "application/json")
            .header(
                "x-voter-id",
                format!("voter-{}", n.wrapping_mul(2_654_435_761) % voters),
            )
            .body(Full::new(Bytes::from_static(option)))
            .expect("static request")
    })
}

pub fn run(opts: &Options) -> anyhow::Result<Comparison> {
    let server_rt = crate::server_runtime(2)?;
    let client_rt = crate::client_runtime(2)?;
    crate::until_interrupted(&client_rt, async {
        let pg = harness::PgCluster::start().await?;
        let mut shards = Vec::new();
        let mut replicas = Vec::new();
        for _ in 0..opts.shards {
            let shard = harness::RedisServer::start_with(opts.redis_fsync).await?;
            if opts.redis_replica {
                replicas.push(shard.start_replica().await?);
            }
            shards.push(shard);
        }
        let mut config = ingest::Config::new(
            model::RegionName::new("us-east-1")?,
            shards.iter().map(|s| s.url()).collect(),
            pg.primary.url(db::INGEST_ROLE, db::DATABASE),
        );
        if !opts.voter_limit {
            config.voter_limit = None;
        }
        config.wait_replicas = u32::from(opts.redis_replica);
        // The generator stands where a gateway would: its `X-Voter-Id` says who votes.
        config.trusted_proxies =
            ingest::identity::TrustedProxies::parse("127.0.0.1/32").expect("a loopback CIDR");
        let mut provider = None;
        let make = match opts.auth_votes_per_voter {
            None => votes(opts.voters),
            Some(per_voter) => {
                let issuer = harness::idp::Issuer::generate_rsa(
                    "bench-rsa",
                    harness::idp::LOCAL_ISSUER,
                    harness::idp::LOCAL_AUDIENCE,
                )?;
                eprintln!("bench ingest: minting {AUTH_TOKENS} RS256 tokens");
                let tokens = Arc::new(tokio::task::block_in_place(|| mint(&issuer)));
                let server =
                    harness::idp::JwksServer::start(harness::idp::jwks(&[&issuer])).await?;
                let mut jwt = ingest::identity::JwtConfig::new(
                    ingest::identity::KeySource::Url(server.url()),
                    harness::idp::LOCAL_ISSUER.into(),
                    harness::idp::LOCAL_AUDIENCE.into(),
                );
                jwt.cache_entries = 2 * AUTH_BLOCK_VOTERS as usize;
                config.identity = ingest::identity::Identity::Jwt(jwt);
                provider = Some(server);
                authenticated_votes(tokens, per_voter.max(1))
            }
        };
        config.queue_bound = u64::MAX;
        config.group = opts.group;
        let (ingest_listener, ingest_addr) = crate::loopback_listener()?;
        let (bare_listener, bare_addr) = crate::loopback_listener()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = server_rt.spawn(async move {
            ingest::run(crate::tokio_listener(ingest_listener), config, async {
                let _ = stopped.await;
            })
            .await
        });
        let baseline_name = match opts.baseline {
            Baseline::BareHyper => {
                server_rt.spawn(async move {
                    crate::bare::accept_votes(crate::tokio_listener(bare_listener)).await
                });
                "bare-hyper"
            }
            Baseline::OriginalVoteService => {
                let url = shards[0].url();
                server_rt.spawn(async move {
                    crate::original::vote_service(crate::tokio_listener(bare_listener), url).await
                });
                "original-vote-service"
            }
        };
        harness::http::Client::new(format!("http://{ingest_addr}"))
            .wait_ready(Duration::from_secs(15))
            .await?;

        // Replicas' CPU is part of what a vote costs.
        let meter = CpuMeter::new(
            shards
                .iter()
                .chain(&replicas)
                .filter_map(|s| s.server.pid())
                .collect(),
        );
        let rounds = alternate(
            bare_addr,
            ingest_addr,
            opts.connections,
            opts.round,
            opts.pairs,
            make.clone(),
            &meter,
        )
        .await;

        // The latency target is at a sustained rate, so measure it open loop at 0.8x bare, over
        // as many connections as the closed loop had (more connections cost the shared cores
        // more than they cost a server that keeps up).
        let target = 0.8 * rounds.baseline_rate();
        let open_loop_at = |addr| {
            let make = make.clone();
            let meter = &meter;
            async move {
                let before = meter.read();
                let (outcome, samples) = open_loop(
                    crate::load::fixed(addr),
                    crate::load::Schedule::steady(target, opts.round),
                    opts.connections,
                    make,
                    Arc::new(|_, _, _| {}),
                )
                .await;
                let cpu = meter.read().since(&before).per(outcome.ok());
                (outcome, cpu, window_p99_ms(&samples, OPEN_LOOP_WINDOW))
            }
        };
        let (open, open_cpu, open_windows) = open_loop_at(ingest_addr).await;
        let open_summary = open.summary();
        // The same open loop against the baseline: the latency a server that stores nothing gets
        // at this rate from this generator on these cores, so ingest's p99 can be read against
        // what the machine allows rather than against zero.
        let (baseline_open, baseline_open_cpu, baseline_open_windows) =
            open_loop_at(bare_addr).await;
        let baseline_open = baseline_open.summary();

        let last = &rounds.last;
        let acked: u64 = [last, &open]
            .iter()
            .map(|o| o.statuses.get(&202).copied().unwrap_or(0))
            .sum::<u64>();
        let _ = stop.send(());
        server.await??;
        drop(provider);
        let mut stored = 0;
        let mut writes = 0;
        for s in &shards {
            stored += s.outstanding().await?;
            writes += s.calls("RPUSH").await?;
        }
        let closed_summary = last.summary();
        Ok(Comparison::alternated(
            "ingest",
            baseline_name,
            &rounds,
            serde_json::json!({
                "connections": opts.connections,
                "shards": opts.shards,
                "group_max_votes": opts.group.max_votes,
                "group_target_votes": opts.group.target_votes,
                "group_max_in_flight": opts.group.max_in_flight,
                "group_linger_us": opts.group.linger.as_micros() as u64,
                "redis_fsync": opts.redis_fsync,
                "redis_replica": opts.redis_replica,
                "voter_limit": opts.voter_limit,
                "auth_votes_per_voter": opts.auth_votes_per_voter,
                "closed_loop_p99_ms": closed_summary.p99_ms,
                "closed_loop_statuses": closed_summary.statuses,
                "open_loop_rate": target,
                "open_loop_achieved": open_summary.ok_rate,
                "open_loop_p50_ms": open_summary.p50_ms,
                "open_loop_p99_ms": open_summary.p99_ms,
                "open_loop_statuses": open_summary.statuses,
                "open_loop_window_ms": OPEN_LOOP_WINDOW.as_millis() as u64,
                "open_loop_window_p99_ms": open_windows,
                "open_loop_cpu_us_per_vote": open_cpu,
                "baseline_open_loop_achieved": baseline_open.ok_rate,
                "baseline_open_loop_p50_ms": baseline_open.p50_ms,
                "baseline_open_loop_p99_ms": baseline_open.p99_ms,
                "baseline_open_loop_statuses": baseline_open.statuses,
                "baseline_open_loop_window_p99_ms": baseline_open_windows,
                "baseline_open_loop_cpu_us_per_request": baseline_open_cpu,
                "stored_in_redis": stored,
                "votes_per_write": stored as f64 / writes.max(1) as f64,
                "acknowledged_in_last_closed_round_and_open_loop": acked,
            }),
        ))
    })
}
