//! Ingest against real Redis shards and a real PostgreSQL catalog.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;

use common::{vote, Stack};
use harness::http::Client;
use harness::RedisServer;
use ingest::identity::{Identity, JwtConfig, KeySource};
use model::RegionName;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_votes_land_exactly_once_on_the_right_shard() -> anyhow::Result<()> {
    // A region label of its own, so votes of tests running beside it do not add to its counter.
    let stack = Stack::start(2, |c| c.region = RegionName::new("load-test").unwrap()).await?;
    let mut tasks = Vec::new();
    for worker in 0..50 {
        let client = Client::new(stack.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..200 {
                let voter = format!("voter-{}", (worker * 200 + i) % 1000);
                let option = if i % 3 == 0 { "b" } else { "a" };
                let r = vote(&client, "default", option, &voter).await?;
                anyhow::ensure!(r.status == 202, "status {} {}", r.status, r.text());
                acked.push((r.json()["vote_id"].as_str().unwrap().to_string(), voter));
            }
            anyhow::Ok(acked)
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await??);
    }
    assert_eq!(acked.len(), 10_000);
    let queued = stack.queued().await?;
    let mut by_id: HashMap<String, (usize, model::Vote)> = HashMap::new();
    for (shard, v) in queued {
        assert!(
            by_id.insert(v.id.to_string(), (shard, v)).is_none(),
            "a vote is queued twice"
        );
    }
    assert_eq!(
        by_id.len(),
        10_000,
        "Redis holds exactly the acknowledged votes"
    );
    for (id, voter) in &acked {
        let (shard, v) = by_id
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged vote {id} is not in Redis"));
        assert_eq!(v.voter.as_str(), voter);
        assert_eq!(
            *shard as u32,
            model::shard_of("default", voter, 2),
            "vote on the wrong shard"
        );
        assert_eq!(v.region.as_str(), "load-test");
    }
    let metrics = stack.client.get("/metrics").await?.text();
    assert!(
        metrics
            .contains(r#"tally_ingest_votes_total{region="load-test",outcome="accepted"} 10000"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_ingest_group_commit_size_bucket"),
        "group commit histogram missing"
    );
    // Every accepted vote's acknowledgement is timed, in the region's one series.
    for line in [
        r#"tally_ingest_ack_seconds_bucket{region="load-test",le="+Inf"} 10000"#,
        r#"tally_ingest_ack_seconds_count{region="load-test"} 10000"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    stack.shutdown().await
}

#[tokio::test]
async fn every_refusal_has_its_status_and_json_body_and_enqueues_nothing() -> anyhow::Result<()> {
    let stack = Stack::start(2, |c| {
        c.body_limit = 256;
        c.voter_limit = Some(ingest::Rate {
            per_second: 0.01,
            burst: 1.0,
        });
    })
    .await?;
    let c = &stack.client;
    stack
        .pg
        .client()
        .await?
        .batch_execute(
            "INSERT INTO polls (id, options, closes_at) VALUES ('closed', ARRAY['a','b'], now() - interval '1 hour');
             INSERT INTO polls (id, options, opens_at) VALUES ('later', ARRAY['a','b'], now() + interval '1 hour')",
        )
        .await?;
    // Let the catalog refresh pick up the closed poll.
    let start = std::time::Instant::now();
    while vote(c, "closed", "a", "probe").await?.status != 409 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "catalog never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let cases: Vec<(u16, &str, harness::http::Reply)> = vec![
        (
            400,
            "malformed",
            c.post_json(
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1")],
                r#"{"option":"#,
            )
            .await?,
        ),
        (
            400,
            "malformed",
            c.post_json(
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1")],
                r#"{"option":7}"#,
            )
            .await?,
        ),
        (
            400,
            "malformed",
            c.post_json(
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1")],
                "[[[[[[[[]]]]]]]]",
            )
            .await?,
        ),
        (
            400,
            "malformed",
            c.post_json(
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1")],
                r#"["a"]"#,
            )
            .await?,
        ),
        (404, "unknown_poll", vote(c, "nope", "a", "v1").await?),
        (404, "unknown_poll", vote(c, "..%2Fetc", "a", "v1").await?),
        (409, "poll_closed", vote(c, "closed", "a", "v1").await?),
        (409, "poll_not_open", vote(c, "later", "a", "v1").await?),
        (422, "unknown_option", vote(c, "default", "c", "v1").await?),
        (
            422,
            "unknown_option",
            vote(c, "default", "a' OR 1=1 --", "v1").await?,
        ),
        (
            413,
            "too_large",
            c.post_json(
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1")],
                &format!(r#"{{"option":"{}"}}"#, "a".repeat(300)),
            )
            .await?,
        ),
        (
            415,
            "unsupported_media_type",
            c.request(
                hyper::Method::POST,
                "/v1/polls/default/votes",
                &[("x-voter-id", "v1"), ("content-type", "text/plain")],
                r#"{"option":"a"}"#,
            )
            .await?,
        ),
        (
            400,
            "bad_voter",
            vote(c, "default", "a", "has space").await?,
        ),
        (
            405,
            "method_not_allowed",
            c.get("/v1/polls/default/votes").await?,
        ),
        (404, "not_found", c.get("/nope").await?),
    ];
    for (status, code, reply) in &cases {
        assert_eq!(reply.status.as_u16(), *status, "{code}: {}", reply.text());
        assert_eq!(reply.error_code(), *code, "{}", reply.text());
        assert!(reply.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_eq!(reply.headers["content-type"], "application/json");
    }
    assert!(
        stack.queued().await?.is_empty(),
        "a refused vote was enqueued"
    );

    // Rate limit: the first vote of a voter passes, the second is 429 with Retry-After.
    assert_eq!(vote(c, "default", "a", "limited").await?.status, 202);
    let limited = vote(c, "default", "b", "limited").await?;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.error_code(), "rate_limited");
    assert!(limited.headers["retry-after"].to_str()?.parse::<u64>()? >= 1);
    assert_eq!(
        stack.queued().await?.len(),
        1,
        "only the accepted vote is queued"
    );
    stack.shutdown().await
}

#[tokio::test]
async fn one_address_is_limited_whichever_voters_it_names() -> anyhow::Result<()> {
    let stack = Stack::start(2, |c| {
        c.voter_limit = None;
        c.ip_limit = Some(ingest::Rate {
            per_second: 0.01,
            burst: 3.0,
        });
    })
    .await?;
    let c = &stack.client;
    for voter in ["v1", "v2", "v3"] {
        assert_eq!(vote(c, "default", "a", voter).await?.status, 202, "{voter}");
    }
    let limited = vote(c, "default", "a", "v4").await?;
    assert_eq!(limited.status, 429, "{}", limited.text());
    assert_eq!(limited.error_code(), "rate_limited");
    assert_eq!(
        limited.json()["error"]["message"],
        "too many votes from this address"
    );
    // 0.01 a second: the next token is 100 s away.
    assert!(limited.headers["retry-after"].to_str()?.parse::<u64>()? >= 99);
    assert_eq!(
        stack.queued().await?.len(),
        3,
        "the refused vote was queued"
    );
    stack.shutdown().await
}

/// Holds `shard`'s writes for `ms` milliseconds (`CLIENT PAUSE ... WRITE`): reads still answer.
async fn pause_writes(shard: &RedisServer, ms: u64) -> anyhow::Result<()> {
    let mut con = shard.connection().await?;
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(ms)
        .arg("WRITE")
        .query_async::<()>(&mut con)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_shard_answers_503_by_the_store_timeout() -> anyhow::Result<()> {
    let store_timeout = Duration::from_millis(400);
    let stack = Stack::start(2, |c| c.store_timeout = store_timeout).await?;
    let on_shard = |shard: u32| {
        (0..)
            .map(|i| format!("stall-{i}"))
            .find(|v| model::shard_of("default", v, 2) == shard)
            .unwrap()
    };
    // Writes to shard 1 hang for 4 s; reads (the health probe) still answer, so the shard is
    // not "down": only the write's deadline can answer these votes.
    pause_writes(&stack.shards[1], 4_000).await?;
    let started = std::time::Instant::now();
    let stalled = vote(&stack.client, "default", "a", &on_shard(1)).await?;
    let waited = started.elapsed();
    assert_eq!(stalled.status, 503, "{}", stalled.text());
    assert_eq!(stalled.error_code(), "unavailable");
    assert!(
        stalled.text().contains("did not confirm the write in time"),
        "{}",
        stalled.text()
    );
    assert!(
        waited >= store_timeout && waited < Duration::from_millis(2_500),
        "answered after {waited:?}, the deadline is {store_timeout:?}"
    );
    let live = vote(&stack.client, "default", "a", &on_shard(0)).await?;
    assert_eq!(live.status, 202, "{}", live.text());
    stack.shutdown().await
}

/// The bound is in votes, read from the shard's count of stored votes, whatever number of
/// list elements (writes) holds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_holding_its_bound_of_votes_refuses_more_and_stores_nothing() -> anyhow::Result<()>
{
    let stack = Stack::start(1, |c| c.queue_bound = 30).await?;
    let statuses = concurrent_votes(&stack, 30).await;
    assert!(statuses.iter().all(|&s| s == 202), "{statuses:?}");
    metrics_show(
        &stack,
        r#"tally_ingest_queue_depth{region="us-east-1",shard="0"} 30"#,
    )
    .await?;
    let refused = vote(&stack.client, "default", "b", "one-too-many").await?;
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.error_code(), "unavailable");
    assert!(
        refused.text().contains("queue shard is full"),
        "{}",
        refused.text()
    );
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        stack.queued().await?.len(),
        30,
        "the refused vote was not stored"
    );
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_that_half_closes_after_sending_still_gets_its_receipt() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stack = Stack::start(1, |_| {}).await?;
    // Hold the shard's writes so the vote is still waiting when the client's FIN arrives.
    pause_writes(&stack.shards[0], 800).await?;
    let body = r#"{"option":"b"}"#;
    let request = format!(
        "POST /v1/polls/default/votes HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         x-voter-id: half-closer\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream =
        tokio::net::TcpStream::connect(stack.base.trim_start_matches("http://")).await?;
    stream.write_all(request.as_bytes()).await?;
    stream.shutdown().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 202 Accepted"),
        "the vote is answered after the half-close: {answer:?}"
    );
    let queued = stack.queued().await?;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].1.voter.as_str(), "half-closer");
    assert_eq!(queued[0].1.option.as_str(), "b");
    assert!(answer.contains(&queued[0].1.id.to_string()), "{answer}");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shard_gets_503_while_the_other_keeps_taking_votes() -> anyhow::Result<()> {
    let stack = Stack::start(2, |c| c.store_timeout = Duration::from_millis(500)).await?;
    let voters: Vec<String> = (0..400).map(|i| format!("v{i}")).collect();
    let mut acked: Vec<(String, String)> = Vec::new();
    let mut unavailable_on = [0usize; 2];
    let mut accepted_on = [0usize; 2];
    for (round, voter) in voters.iter().enumerate() {
        if round == 200 {
            stack.shards[1].server.kill();
        }
        let shard = model::shard_of("default", voter, 2) as usize;
        let r = vote(&stack.client, "default", "a", voter).await?;
        match r.status.as_u16() {
            202 => {
                accepted_on[shard] += 1;
                acked.push((
                    r.json()["vote_id"].as_str().unwrap().to_string(),
                    voter.clone(),
                ));
            }
            503 => {
                assert!(round >= 200, "503 before the kill");
                assert_eq!(shard, 1, "a vote for the live shard was refused");
                assert_eq!(r.error_code(), "unavailable");
                assert!(r.headers.contains_key("retry-after"));
                unavailable_on[shard] += 1;
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert!(
        unavailable_on[1] > 50,
        "the dead shard's votes were not refused: {unavailable_on:?}"
    );
    assert!(
        accepted_on[0] > 150,
        "the live shard stopped taking votes: {accepted_on:?}"
    );
    let ready = stack.client.get("/readyz").await?;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["shards_down"], serde_json::json!([1]));
    // Bring the dead shard back from its append-only file: every acknowledged vote is there.
    stack.shards[1].server.start()?;
    let queued: HashMap<String, usize> = stack
        .queued()
        .await?
        .into_iter()
        .map(|(s, v)| (v.id.to_string(), s))
        .collect();
    for (id, voter) in &acked {
        assert_eq!(
            queued.get(id).copied(),
            Some(model::shard_of("default", voter, 2) as usize),
            "acknowledged {id} lost"
        );
    }
    stack.shutdown().await
}

/// Votes from `clients` clients of their own, all in flight together: their statuses in order.
async fn concurrent_votes(stack: &Stack, clients: usize) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..clients {
        let client = Client::new(stack.base.clone());
        tasks.push(tokio::spawn(async move {
            let r = vote(&client, "default", "a", &format!("linger-{i}")).await;
            r.map(|r| r.status.as_u16()).unwrap_or(0)
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap_or(0));
    }
    statuses
}

type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// A connection of its own to the stack's ingest.
async fn connect(stack: &Stack) -> anyhow::Result<Connection> {
    let stream = tokio::net::TcpStream::connect(stack.base.trim_start_matches("http://")).await?;
    let (conn, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(driver);
    Ok(conn)
}

/// One vote on `conn`; how long it took to be acknowledged.
async fn vote_on(conn: &mut Connection, voter: &str) -> anyhow::Result<Duration> {
    let req = hyper::Request::post("/v1/polls/default/votes")
        .header("host", "ingest")
        .header("content-type", "application/json")
        .header("x-voter-id", voter)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"option":"b"}"#,
        )))?;
    let started = std::time::Instant::now();
    conn.ready().await?;
    let resp = conn.send_request(req).await?;
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?;
    anyhow::ensure!(status == 202, "{status} {:?}", body.to_bytes());
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_voters_share_one_write_that_goes_once_all_are_in() -> anyhow::Result<()> {
    let linger = Duration::from_secs(2);
    let stack = Stack::start(1, |c| {
        c.group.linger = linger;
        c.store_timeout = Duration::from_secs(10);
    })
    .await?;
    // Ten voters on connections of their own vote once, together, and stay connected: voters
    // who may vote again.
    let mut conns = Vec::new();
    for _ in 0..10 {
        conns.push(connect(&stack).await?);
    }
    let firsts = conns
        .iter_mut()
        .enumerate()
        .map(|(i, c)| async move { vote_on(c, &format!("returning-{i}")).await });
    futures_util::future::try_join_all(firsts).await?;
    let writes_before = stack.shards[0].calls("RPUSH").await?;

    // Their second votes, 20 ms apart: without a linger each would go out alone (a write takes
    // well under 20 ms); with one, the first waits for the other nine, and the write goes as soon
    // as the tenth is in rather than when the linger is over.
    let started = std::time::Instant::now();
    let seconds = conns.iter_mut().enumerate().map(|(i, c)| async move {
        tokio::time::sleep(Duration::from_millis(20) * i as u32).await;
        vote_on(c, &format!("returning-{i}")).await
    });
    futures_util::future::try_join_all(seconds).await?;
    let waited = started.elapsed();
    assert_eq!(
        stack.shards[0].calls("RPUSH").await? - writes_before,
        1,
        "one write for the ten second votes"
    );
    assert!(
        waited < linger,
        "the write waited {waited:?}, although every voter's vote was in after 180 ms"
    );
    assert_eq!(stack.queued().await?.len(), 20);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_batch_goes_without_waiting_out_the_linger() -> anyhow::Result<()> {
    let linger = Duration::from_secs(3);
    let stack = Stack::start(1, |c| {
        c.group.linger = linger;
        c.group.max_votes = 4;
        c.store_timeout = Duration::from_secs(10);
    })
    .await?;
    // A voter who has voted stays connected and idle, so another vote could always come: only
    // the batch reaching `max_votes` can end the linger early.
    let mut idle_voter = connect(&stack).await?;
    vote_on(&mut idle_voter, "idle").await?;
    let started = std::time::Instant::now();
    let statuses = concurrent_votes(&stack, 4).await;
    let waited = started.elapsed();
    assert_eq!(statuses, vec![202; 4]);
    assert!(
        waited < linger / 2,
        "a full batch waited {waited:?} of its {linger:?} linger"
    );
    assert_eq!(stack.shards[0].calls("RPUSH").await?, 2);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickle_of_votes_is_not_held_for_votes_not_expected_within_the_linger(
) -> anyhow::Result<()> {
    let linger = Duration::from_millis(80);
    let stack = Stack::start(1, |c| {
        c.group.linger = linger;
        c.store_timeout = Duration::from_secs(10);
    })
    .await?;
    // A voter who has voted stays connected and idle, so another vote could always come: only
    // the shard's rate can tell the writer that none is due before the linger ends.
    let mut idle_voter = connect(&stack).await?;
    vote_on(&mut idle_voter, "idle").await?;
    // A vote every 250 ms (the pause is the voter's, not a wait for ingest): at four votes a
    // second the next is due long after an 80 ms linger would be over.
    let mut conn = connect(&stack).await?;
    let mut took = Vec::new();
    for i in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        took.push(vote_on(&mut conn, &format!("trickle-{i}")).await?);
    }
    took.sort();
    assert!(
        took[2] < linger / 2,
        "votes took {took:?}: held for a linger ({linger:?}) that no vote was expected in"
    );
    assert_eq!(stack.shards[0].calls("RPUSH").await?, 6);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_voter_is_not_held_by_the_linger_for_connections_that_never_voted(
) -> anyhow::Result<()> {
    let linger = Duration::from_secs(2);
    let stack = Stack::start(1, |c| {
        // A region of its own: the metrics recorder is shared by every test in this process.
        c.region = RegionName::new(LONE_VOTER_REGION).unwrap();
        c.group.linger = linger;
        c.store_timeout = Duration::from_secs(10);
    })
    .await?;
    // Open beside the voter and never voting: the stack's pooled client, which asked for
    // /readyz; a connection that sends nothing; one whose vote was refused.
    let _silent = tokio::net::TcpStream::connect(stack.base.trim_start_matches("http://")).await?;
    let refused = vote(&stack.client, "default", "no-such-option", "refused").await?;
    assert_eq!(refused.status, 422);
    // One voter on one connection, one vote at a time: once its vote waits, nobody who has
    // voted can join the batch, so lingering would only add the linger to every vote.
    let mut conn = connect(&stack).await?;
    let started = std::time::Instant::now();
    for i in 0..5 {
        vote_on(&mut conn, &format!("alone-{i}")).await?;
    }
    let waited = started.elapsed();
    assert!(
        waited < linger,
        "five votes took {waited:?}: the linger ({linger:?}) held votes nobody could join"
    );
    assert_eq!(stack.shards[0].calls("RPUSH").await?, 5);
    // What the linger counts is on /metrics: the voter's connection, not the silent one or the
    // refused one; and none once the voter has gone.
    voting_connections_reach(&stack, LONE_VOTER_REGION, 1).await?;
    drop(conn);
    voting_connections_reach(&stack, LONE_VOTER_REGION, 0).await?;
    stack.shutdown().await
}

const LONE_VOTER_REGION: &str = "lone-voter";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_writes_and_answers_the_votes_still_lingering_at_once() -> anyhow::Result<()> {
    const REGION: &str = "stopping";
    let linger = Duration::from_secs(6);
    let mut stack = Stack::start(1, |c| {
        // A region of its own: the metrics recorder is shared by every test in this process.
        c.region = RegionName::new(REGION).unwrap();
        c.group.linger = linger;
        c.store_timeout = Duration::from_secs(10);
    })
    .await?;
    // A voter who has voted stays connected and idle, so another vote could always come and the
    // batch lingers.
    let mut idle_voter = connect(&stack).await?;
    vote_on(&mut idle_voter, "idle").await?;
    let started = std::time::Instant::now();
    let voters: Vec<_> = (0..3)
        .map(|i| {
            let client = Client::new(stack.base.clone());
            tokio::spawn(async move {
                let reply = vote(&client, "default", "a", &format!("lingering-{i}")).await?;
                anyhow::Ok(reply.status.as_u16())
            })
        })
        .collect();
    // Once all three wait in ingest's memory for the shard's next write, stop ingest.
    metrics_show(
        &stack,
        &format!("tally_ingest_votes_waiting{{region=\"{REGION}\",shard=\"0\"}} 3\n"),
    )
    .await?;
    let writes_before = stack.shards[0].calls("RPUSH").await?;
    stack.stop.take().unwrap().send(()).ok();
    for voter in voters {
        assert_eq!(voter.await??, 202);
    }
    (&mut stack.task).await??;
    let waited = started.elapsed();
    assert!(
        waited < linger / 2,
        "stopping took {waited:?}: the lingering batch waited out its {linger:?}"
    );
    assert_eq!(stack.shards[0].calls("RPUSH").await? - writes_before, 1);
    let mut voters: Vec<_> = stack
        .queued()
        .await?
        .into_iter()
        .map(|(_, v)| v.voter.as_str().to_string())
        .collect();
    voters.sort();
    assert_eq!(
        voters,
        ["idle", "lingering-0", "lingering-1", "lingering-2"]
    );
    Ok(())
}

/// Polls /metrics (the gauge is set with each shard probe) until it reports `n` voting
/// connections in `region`.
async fn voting_connections_reach(stack: &Stack, region: &str, n: u64) -> anyhow::Result<()> {
    metrics_show(
        stack,
        &format!("tally_ingest_voting_connections{{region=\"{region}\"}} {n}\n"),
    )
    .await
}

/// Polls /metrics until it holds the line `want`.
async fn metrics_show(stack: &Stack, want: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = stack.client.get("/metrics").await?.text();
        if metrics.contains(want) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no {want:?} in /metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn token(
    key_file: &str,
    kid: &str,
    alg: jsonwebtoken::Algorithm,
    claims: serde_json::Value,
) -> String {
    let pem = std::fs::read(format!(
        "{}/tests/fixtures/{key_file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let key = match alg {
        jsonwebtoken::Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn jwt_voters_are_their_subject_and_bad_tokens_get_401() -> anyhow::Result<()> {
    let jwks = format!("{}/tests/fixtures/jwks.json", env!("CARGO_MANIFEST_DIR"));
    let stack = Stack::start(1, |c| {
        c.identity = Identity::Jwt(JwtConfig::new(
            KeySource::File(jwks.into()),
            "https://auth.tally.test/".into(),
            "tally".into(),
        ));
    })
    .await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = |sub: &str, aud: &str, exp: u64| serde_json::json!({"sub": sub, "iss": "https://auth.tally.test/", "aud": aud, "exp": exp});
    use jsonwebtoken::Algorithm::{ES256, RS256};
    let cases = [
        (
            "bad signature",
            token(
                "rsa_forger.pem",
                "test-rsa",
                RS256,
                claims("mallory", "tally", now + 600),
            ),
        ),
        (
            "wrong audience",
            token(
                "rsa_private.pem",
                "test-rsa",
                RS256,
                claims("alice", "other", now + 600),
            ),
        ),
        (
            "expired",
            token(
                "rsa_private.pem",
                "test-rsa",
                RS256,
                claims("alice", "tally", now - 600),
            ),
        ),
        (
            "unknown key",
            token(
                "rsa_private.pem",
                "nope",
                RS256,
                claims("alice", "tally", now + 600),
            ),
        ),
    ];
    for (what, t) in &cases {
        let auth = format!("Bearer {t}");
        let r = stack
            .client
            .post_json(
                "/v1/polls/default/votes",
                &[("authorization", &auth)],
                r#"{"option":"a"}"#,
            )
            .await?;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.error_code(), "unauthorized");
    }
    let missing = stack
        .client
        .post_json(
            "/v1/polls/default/votes",
            &[("x-voter-id", "bob")],
            r#"{"option":"a"}"#,
        )
        .await?;
    assert_eq!(missing.status, 401, "with auth on, a header is no identity");
    assert!(stack.queued().await?.is_empty());

    for (sub, key, kid, alg) in [
        ("auth0|alice", "rsa_private.pem", "test-rsa", RS256),
        ("carol", "ec_private.pem", "test-ec", ES256),
    ] {
        let auth = format!(
            "Bearer {}",
            token(key, kid, alg, claims(sub, "tally", now + 600))
        );
        let r = stack
            .client
            .post_json(
                "/v1/polls/default/votes",
                &[("authorization", &auth)],
                r#"{"option":"b"}"#,
            )
            .await?;
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let voters: Vec<String> = stack
        .queued()
        .await?
        .into_iter()
        .map(|(_, v)| v.voter.to_string())
        .collect();
    assert_eq!(voters, ["auth0|alice", "carol"]);
    stack.shutdown().await
}

#[tokio::test]
async fn the_original_apps_form_and_page_and_voter_cookie() -> anyhow::Result<()> {
    let stack = Stack::start(1, |_| {}).await?;
    let page = stack.client.get("/").await?;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains(r#"value="a""#) && html.contains(r#"value="b""#),
        "{html}"
    );
    assert!(html.contains("You can change your vote"));

    // No identity at all: a voter id is issued in a long-lived HttpOnly cookie.
    let r = stack
        .client
        .post_json("/v1/polls/default/votes", &[], r#"{"option":"a"}"#)
        .await?;
    assert_eq!(r.status, 202);
    let set = r.headers["set-cookie"].to_str()?.to_string();
    assert!(
        set.starts_with("voter_id=")
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax")
            && set.contains("Max-Age="),
        "{set}"
    );
    let signed = set
        .trim_start_matches("voter_id=")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    // The cookie holds the voter's id and this deployment's signature of it.
    let (issued, _) = signed.rsplit_once('.').expect("a signed id");
    let issued = issued.to_string();

    // The form post, as the original vote page sends it, with the cookie.
    let cookie = format!("voter_id={signed}");
    let r = stack
        .client
        .request(
            hyper::Method::POST,
            "/",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("cookie", &cookie),
            ],
            "vote=b",
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("Your vote: <b>b</b>"));
    let queued = stack.queued().await?;
    assert_eq!(queued.len(), 2);
    assert!(
        queued.iter().all(|(_, v)| v.voter.as_str() == issued),
        "both votes are the cookie's voter"
    );
    assert_eq!(queued[1].1.option.as_str(), "b");
    let bad = stack
        .client
        .request(
            hyper::Method::POST,
            "/",
            &[("content-type", "application/x-www-form-urlencoded")],
            "vote=zzz",
        )
        .await?;
    assert_eq!(bad.status, 422);
    stack.shutdown().await
}

#[tokio::test]
async fn a_stale_catalog_or_a_clock_off_the_databases_refuses_votes() -> anyhow::Result<()> {
    // A clock within the bound stamps votes; one past it refuses them.
    let skewed = Stack::start(1, |c| {
        c.drill_clock_skew_ms = 2_000;
        c.max_clock_offset = Duration::from_millis(500);
    })
    .await;
    // Not ready: the readiness wait in `start` fails, which is the point.
    assert!(
        skewed.is_err(),
        "an ingest 2 s off the database's clock became ready"
    );
    let stack = Stack::start(1, |c| {
        c.drill_clock_skew_ms = 200;
        c.max_clock_offset = Duration::from_millis(500);
        c.catalog_max_age = Duration::from_millis(600);
    })
    .await?;
    assert_eq!(vote(&stack.client, "default", "a", "v1").await?.status, 202);
    let metrics = stack.client.get("/metrics").await?.text();
    assert!(
        metrics.contains("tally_ingest_clock_offset_seconds"),
        "{metrics}"
    );

    // The catalog's source goes away: within its bound, votes are refused and ingest is not ready.
    stack.pg.primary.stop(servers::StopMode::Immediate)?;
    let start = std::time::Instant::now();
    loop {
        let r = vote(&stack.client, "default", "a", "v2").await?;
        if r.status == 503 {
            assert!(r.text().contains("catalog was last read"), "{}", r.text());
            break;
        }
        assert_eq!(r.status, 202);
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready = stack.client.get("/readyz").await?;
    assert_eq!(ready.status, 503);
    assert!(
        ready.json()["refusing_votes"].is_string(),
        "{}",
        ready.text()
    );
    stack.pg.primary.start()?;
    let start = std::time::Instant::now();
    while stack.client.get("/readyz").await?.status != 200 {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(15),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(vote(&stack.client, "default", "a", "v3").await?.status, 202);
    stack.shutdown().await
}
