//! Who may vote as whom: ingest against real Redis and PostgreSQL, with its identity provider's
//! key set served over HTTP by the test (rotated under it), anonymous voters' signed cookies,
//! trusted proxies, cross-site posts and the per-address limit behind a load balancer.

mod common;

use std::time::{Duration, Instant};

use common::Stack;
use harness::idp::{self, Issuer, JwksServer};
use ingest::identity::{Identity, JwtConfig, KeySource, TrustedProxies};

const ISSUER: &str = "https://idp.tally.test/";
const AUDIENCE: &str = "tally";

fn jwt(url: &str, refetch: Duration) -> Identity {
    let mut jwt = JwtConfig::new(KeySource::Url(url.into()), ISSUER.into(), AUDIENCE.into());
    jwt.unknown_key_refetch = refetch;
    jwt.leeway = Duration::from_secs(1);
    Identity::Jwt(jwt)
}

async fn vote_as(stack: &Stack, token: &str) -> anyhow::Result<harness::http::Reply> {
    let auth = format!("Bearer {token}");
    stack
        .client
        .post_json(
            "/v1/polls/default/votes",
            &[("authorization", &auth)],
            r#"{"option":"a"}"#,
        )
        .await
}

async fn voters(stack: &Stack) -> anyhow::Result<Vec<String>> {
    Ok(stack
        .queued()
        .await?
        .into_iter()
        .map(|(_, v)| v.voter.to_string())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_at_the_provider_is_taken_without_a_restart() -> anyhow::Result<()> {
    let old = Issuer::generate("key-1", ISSUER, AUDIENCE);
    let new = Issuer::generate("key-2", ISSUER, AUDIENCE);
    let provider = JwksServer::start(idp::jwks(&[&old])).await?;
    let stack = Stack::start(1, |c| c.identity = jwt(&provider.url(), Duration::ZERO)).await?;
    assert_eq!(vote_as(&stack, &old.token("alice", 600)).await?.status, 202);

    // The provider rotates: the new key signs, the old one is withdrawn.
    provider.set(idp::jwks(&[&new]));
    let r = vote_as(&stack, &new.token("bob", 600)).await?;
    assert_eq!(r.status, 202, "a token of the new key: {}", r.text());
    let r = vote_as(&stack, &old.token("mallory", 600)).await?;
    assert_eq!(r.status, 401, "a withdrawn key signs nothing: {}", r.text());
    // Even a token verified before the rotation: the remembered verdict went with the key.
    let r = vote_as(&stack, &old.token("alice", 600)).await?;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(voters(&stack).await?, ["alice", "bob"]);
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_key_ids_fetch_the_key_set_at_most_once_a_period() -> anyhow::Result<()> {
    let issuer = Issuer::generate("key-1", ISSUER, AUDIENCE);
    let provider = JwksServer::start(idp::jwks(&[&issuer])).await?;
    let stack = Stack::start(1, |c| {
        c.identity = jwt(&provider.url(), Duration::from_secs(600))
    })
    .await?;
    let at_start = provider.fetches();
    assert_eq!(at_start, 1, "fetched once at start");
    let started = Instant::now();
    for n in 0..40 {
        let forged = Issuer::generate(&format!("made-up-{n}"), ISSUER, AUDIENCE);
        let r = vote_as(&stack, &forged.token(&format!("bot{n}"), 600)).await?;
        assert_eq!(r.status, 401, "{}", r.text());
        assert_eq!(r.error_code(), "unauthorized");
    }
    assert!(
        provider.fetches() - at_start <= 1,
        "40 unknown keys fetched the set {} times",
        provider.fetches() - at_start
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals inside the period do not wait for a fetch: {:?}",
        started.elapsed()
    );
    assert!(stack.queued().await?.is_empty(), "nothing was stored");
    stack.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_keys_and_a_failed_fetch_keeps_the_good_ones() -> anyhow::Result<()>
{
    let issuer = Issuer::generate("key-1", ISSUER, AUDIENCE);
    let provider = JwksServer::start(r#"{"keys":[]}"#.to_string()).await?;
    let mut identity = jwt(&provider.url(), Duration::ZERO);
    if let Identity::Jwt(j) = &mut identity {
        j.refresh = Duration::from_millis(200);
    }
    // Started with a key set holding no key: not ready, and votes are not taken.
    let pg = harness::PgCluster::start().await?;
    let shard = harness::redis_shards(1).await?;
    let mut config = ingest::Config::new(
        model::RegionName::new("us-east-1")?,
        shard.iter().map(|s| s.url()).collect(),
        pg.primary.url(db::INGEST_ROLE, db::DATABASE),
    );
    config.identity = identity;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let client = harness::http::Client::new(format!("http://{}", listener.local_addr()?));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ingest::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    let not_ready = loop {
        let r = client.get("/readyz").await;
        if let Ok(r) = r {
            if r.json()["catalog_loaded"] == true {
                break r;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "ingest never answered /readyz");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(not_ready.status, 503);
    assert_eq!(not_ready.json()["keys_loaded"], false);
    let auth = format!("Bearer {}", issuer.token("alice", 600));
    let r = client
        .post_json(
            "/v1/polls/default/votes",
            &[("authorization", &auth)],
            r#"{"option":"a"}"#,
        )
        .await?;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));

    provider.set(idp::jwks(&[&issuer]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get("/readyz").await?.status != 200 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "never ready once the keys were served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The provider breaks: its answers are no key set. The keys ingest has stay.
    provider.set("<html>maintenance</html>".into());
    let fetched = provider.fetches();
    while provider.fetches() < fetched + 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client
        .post_json(
            "/v1/polls/default/votes",
            &[("authorization", &auth)],
            r#"{"option":"a"}"#,
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(client.get("/readyz").await?.status, 200);
    stop.send(()).ok();
    task.await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_yet_valid_expired_or_for_others_get_401() -> anyhow::Result<()> {
    let issuer = Issuer::generate("key-1", ISSUER, AUDIENCE);
    let provider = JwksServer::start(idp::jwks(&[&issuer])).await?;
    let stack = Stack::start(1, |c| c.identity = jwt(&provider.url(), Duration::ZERO)).await?;
    let now = idp::unix_now();
    let claims = |sub: &str, nbf: u64, exp: u64, aud: &str, iss: &str| serde_json::json!({"sub": sub, "iss": iss, "aud": aud, "nbf": nbf, "exp": exp});
    for (what, token) in [
        (
            "nbf in the future",
            issuer.sign(claims("early", now + 120, now + 600, AUDIENCE, ISSUER)),
        ),
        (
            "expired",
            issuer.sign(claims("late", now - 600, now - 120, AUDIENCE, ISSUER)),
        ),
        (
            "another audience",
            issuer.sign(claims("x", now, now + 600, "other", ISSUER)),
        ),
        (
            "another issuer",
            issuer.sign(claims("x", now, now + 600, AUDIENCE, "https://evil/")),
        ),
        ("no token", String::new()),
    ] {
        let r = vote_as(&stack, &token).await?;
        assert_eq!(r.status, 401, "{what}: {}", r.text());
        assert_eq!(r.error_code(), "unauthorized", "{what}");
    }
    // A voter voting again with the same token is the same voter (its verdict remembered).
    let token = issuer.token("carol", 600);
    for _ in 0..3 {
        assert_eq!(vote_as(&stack, &token).await?.status, 202);
    }
    assert_eq!(voters(&stack).await?, ["carol", "carol", "carol"]);
    stack.shutdown().await
}

#[tokio::test]
async fn anonymous_voters_cannot_name_themselves_or_forge_a_cookie() -> anyhow::Result<()> {
    // No trusted proxy: every client speaks for itself.
    let stack = Stack::start(1, |c| c.trusted_proxies = TrustedProxies::default()).await?;
    let r = common::vote(&stack.client, "default", "a", "alice").await?;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code(), "untrusted_voter_header");

    // A forged cookie (no signature, or a signature of another id) is not trusted: its holder
    // is a new voter, issued a signed id of its own.
    for forged in [
        "voter_id=alice",
        "voter_id=alice.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let r = stack
            .client
            .post_json(
                "/v1/polls/default/votes",
                &[("cookie", forged)],
                r#"{"option":"b"}"#,
            )
            .await?;
        assert_eq!(r.status, 202, "{}", r.text());
        let set = r.headers["set-cookie"].to_str()?;
        assert!(
            set.starts_with("voter_id=") && !set.contains("alice"),
            "{set}"
        );
    }
    let queued = voters(&stack).await?;
    assert_eq!(queued.len(), 2);
    assert!(queued.iter().all(|v| v != "alice"), "{queued:?}");
    assert_ne!(queued[0], queued[1], "each forger is a voter of its own");
    stack.shutdown().await
}

#[tokio::test]
async fn cross_site_posts_are_refused_and_store_nothing() -> anyhow::Result<()> {
    let stack = Stack::start(1, |c| {
        c.allowed_origins = vec!["https://partner.example".into()]
    })
    .await?;
    let host = stack.base.trim_start_matches("http://").to_string();
    let form = [("content-type", "application/x-www-form-urlencoded")];
    for (path, content_type, body) in [
        ("/", form[0].1, "vote=a"),
        (
            "/v1/polls/default/votes",
            "application/json",
            r#"{"option":"a"}"#,
        ),
    ] {
        for headers in [
            vec![("origin", "https://evil.example")],
            vec![("sec-fetch-site", "cross-site")],
            vec![("origin", "null")],
        ] {
            let mut h = vec![("content-type", content_type), ("x-voter-id", "victim")];
            h.extend(headers.iter().copied());
            let r = stack
                .client
                .request(hyper::Method::POST, path, &h, body)
                .await?;
            assert_eq!(r.status, 403, "{path} {headers:?}: {}", r.text());
            assert_eq!(r.error_code(), "cross_site");
        }
    }
    assert!(
        stack.queued().await?.is_empty(),
        "no cross-site vote was stored"
    );
    // The site itself, an allowed partner, and a client that is no browser are taken.
    let own = format!("http://{host}");
    for origin in [Some(own.as_str()), Some("https://partner.example"), None] {
        let mut h = vec![("content-type", "application/json"), ("x-voter-id", "v")];
        if let Some(o) = origin {
            h.push(("origin", o));
        }
        let r = stack
            .client
            .request(
                hyper::Method::POST,
                "/v1/polls/default/votes",
                &h,
                r#"{"option":"a"}"#,
            )
            .await?;
        assert_eq!(r.status, 202, "{origin:?}: {}", r.text());
    }
    assert_eq!(stack.queued().await?.len(), 3);
    stack.shutdown().await
}

#[tokio::test]
async fn a_spoofed_forwarded_for_does_not_escape_the_address_limit() -> anyhow::Result<()> {
    let stack = Stack::start(1, |c| {
        c.ip_limit = Some(ingest::Rate {
            per_second: 0.01,
            burst: 3.0,
        });
    })
    .await?;
    // One client behind the load balancer (the test, trusted) writes a new address of its own
    // in front of the one the load balancer appends, each vote.
    let mut statuses = Vec::new();
    for n in 0..6 {
        let xff = format!("10.9.9.{n}, 198.51.100.7");
        let voter = format!("v{n}");
        let r = stack
            .client
            .post_json(
                "/v1/polls/default/votes",
                &[("x-forwarded-for", &xff), ("x-voter-id", &voter)],
                r#"{"option":"a"}"#,
            )
            .await?;
        statuses.push(r.status);
    }
    assert_eq!(statuses, [202, 202, 202, 429, 429, 429]);
    // Another client behind the same load balancer has its own allowance.
    let r = stack
        .client
        .post_json(
            "/v1/polls/default/votes",
            &[("x-forwarded-for", "198.51.100.8"), ("x-voter-id", "w")],
            r#"{"option":"a"}"#,
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(stack.queued().await?.len(), 4);
    stack.shutdown().await
}
