//! The reader against a real PostgreSQL primary and streaming replica.

use std::time::{Duration, Instant};

use harness::http::Client;
use harness::PgCluster;
use model::RegionName;
use reader::{Config, Source};
use tokio::sync::oneshot;

struct Running {
    client: Client,
    base: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), reader::ReaderError>>,
}

async fn start(pg: &PgCluster) -> anyhow::Result<Running> {
    start_in(pg, "eu-west-1").await
}

/// A reader with its own region label, for tests that read process-wide metrics.
async fn start_in(pg: &PgCluster, region: &str) -> anyhow::Result<Running> {
    start_with(pg, region, None).await
}

async fn start_with(
    pg: &PgCluster,
    region: &str,
    operator_token: Option<&str>,
) -> anyhow::Result<Running> {
    harness::init_logs();
    let sources = vec![
        Source {
            name: "eu-west-1".into(),
            url: pg.replica().url(db::READER_ROLE, db::DATABASE),
        },
        Source {
            name: "us-east-1".into(),
            url: pg.primary.url(db::READER_ROLE, db::DATABASE),
        },
    ];
    let mut config = Config::new(RegionName::new(region)?, sources);
    config.heartbeat = Duration::from_millis(300);
    config.operator_token = operator_token.map(str::to_string);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(reader::run(listener, config, async move {
        let _ = stopped.await;
    }));
    let client = Client::new(base.clone());
    client.wait_ready(Duration::from_secs(10)).await?;
    Ok(Running {
        client,
        base,
        stop,
        task,
    })
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task).await???;
        Ok(())
    }

    async fn results(&self, poll: &str) -> anyhow::Result<serde_json::Value> {
        let r = self
            .client
            .get(&format!("/v1/polls/{poll}/results"))
            .await?;
        anyhow::ensure!(r.status == 200, "status {}: {}", r.status, r.text());
        Ok(r.json())
    }
}

async fn wait_for<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await.unwrap_or(false) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_the_primary_is_served_from_the_replica_within_a_second() -> anyhow::Result<()>
{
    let pg = PgCluster::start_with_replica().await?;
    let r = start(&pg).await?;
    let first = r.results("default").await?;
    assert_eq!(first["counts"], serde_json::json!({"a": 0, "b": 0}));
    assert_eq!(first["region"], "eu-west-1");
    assert_eq!(first["source"], "eu-west-1");
    assert_eq!(first["fallback"], false);
    for key in [
        "poll",
        "counts",
        "total",
        "as_of",
        "region",
        "replica_lag_ms",
    ] {
        assert!(first.get(key).is_some(), "{key} missing from {first}");
    }
    pg.client()
        .await?
        .batch_execute(
            "UPDATE tally_parts SET count = 41 WHERE poll_id = 'default' AND option = 'a'",
        )
        .await?;
    let took = wait_for(Duration::from_secs(5), || async {
        let v = r.results("default").await?;
        Ok(v["counts"]["a"] == 41)
    })
    .await?;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let v = r.results("default").await?;
    assert_eq!(v["total"], 41);
    assert!(
        v["replica_lag_ms"].as_f64().is_some_and(|l| l >= 0.0),
        "{v}"
    );
    // Caught up and streaming: the replica itself says it is current, not "as old as the last commit".
    wait_for(Duration::from_secs(5), || async {
        Ok(r.results("default").await?["replica_lag_ms"] == 0.0)
    })
    .await?;
    assert!(
        v["as_of"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z') && s.contains('T')),
        "{v}"
    );
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_the_replica_stops_and_returns_to_it() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let r = start_in(&pg, "fallback-test").await?;
    assert_eq!(r.results("default").await?["source"], "eu-west-1");
    let replica = pg.replica().clone();
    tokio::task::spawn_blocking(move || replica.stop(servers::StopMode::Fast)).await??;
    pg.client()
        .await?
        .batch_execute("UPDATE tally_parts SET count = 7 WHERE option = 'b'")
        .await?;
    wait_for(Duration::from_secs(5), || async {
        let v = r.results("default").await?;
        Ok(v["source"] == "us-east-1" && v["fallback"] == true && v["counts"]["b"] == 7)
    })
    .await?;
    let metrics = r.client.get("/metrics").await?.text();
    assert!(
        metrics.contains(r#"tally_reader_fallback{region="fallback-test"} 1"#),
        "{metrics}"
    );
    let replica = pg.replica().clone();
    tokio::task::spawn_blocking(move || replica.start()).await??;
    wait_for(Duration::from_secs(15), || async {
        let v = r.results("default").await?;
        Ok(v["source"] == "eu-west-1" && v["fallback"] == false && v["counts"]["b"] == 7)
    })
    .await?;
    r.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_stream_sends_changes_and_resumes_from_last_event_id() -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let pg = PgCluster::start_with_replica().await?;
    let r = start(&pg).await?;
    let open = |last: Option<String>| {
        let url = format!("{}/v1/polls/default/results/stream", r.base);
        async move {
            let mut req = hyper::Request::get(url);
            if let Some(id) = last {
                req = req.header("last-event-id", id);
            }
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Empty<bytes::Bytes>>();
            let resp = client
                .request(req.body(http_body_util::Empty::new())?)
                .await?;
            anyhow::ensure!(resp.headers()["content-type"] == "text/event-stream");
            anyhow::Ok(resp.into_body())
        }
    };
    // Reads frames until one holds a results event; returns (id, data).
    async fn next_event(
        body: &mut hyper::body::Incoming,
        limit: Duration,
    ) -> anyhow::Result<(String, serde_json::Value)> {
        let deadline = Instant::now() + limit;
        let mut buf = String::new();
        loop {
            let frame = tokio::time::timeout_at(deadline.into(), body.frame())
                .await?
                .expect("stream open")?;
            if let Some(data) = frame.data_ref() {
                buf.push_str(std::str::from_utf8(data)?);
            }
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                if event.contains("event: results") {
                    let id = event
                        .lines()
                        .find_map(|l| l.strip_prefix("id: "))
                        .unwrap()
                        .to_string();
                    let data = event
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .unwrap();
                    return Ok((id, serde_json::from_str(data)?));
                }
            }
        }
    }
    let mut body = open(None).await?;
    let (id0, first) = next_event(&mut body, Duration::from_secs(5)).await?;
    assert_eq!(first["counts"]["a"], 0);
    pg.client()
        .await?
        .batch_execute("UPDATE tally_parts SET count = 3 WHERE option = 'a'")
        .await?;
    let (id1, second) = next_event(&mut body, Duration::from_secs(2)).await?;
    assert_eq!(second["counts"]["a"], 3);
    assert_ne!(id0, id1);
    // Resuming with the latest id sends nothing until the next change; an old id gets the current counts at once.
    let mut resumed = open(Some(id1.clone())).await?;
    let mut stale = open(Some(id0)).await?;
    let (_, caught_up) = next_event(&mut stale, Duration::from_secs(2)).await?;
    assert_eq!(caught_up["counts"]["a"], 3);
    pg.client()
        .await?
        .batch_execute("UPDATE tally_parts SET count = 4 WHERE option = 'a'")
        .await?;
    let (_, after) = next_event(&mut resumed, Duration::from_secs(2)).await?;
    assert_eq!(
        after["counts"]["a"], 4,
        "a resumed stream must not repeat what it had seen"
    );
    drop((body, resumed, stale));
    r.stop().await
}

#[tokio::test]
async fn errors_are_json_with_the_right_status() -> anyhow::Result<()> {
    let pg = PgCluster::start_with_replica().await?;
    let r = start(&pg).await?;
    let unknown = r.client.get("/v1/polls/nope/results").await?;
    assert_eq!(
        (unknown.status.as_u16(), unknown.error_code().as_str()),
        (404, "unknown_poll")
    );
    let stream = r.client.get("/v1/polls/nope/results/stream").await?;
    assert_eq!(stream.status, 404);
    let path = r.client.get("/v1/polls/default/nothing").await?;
    assert_eq!(
        (path.status.as_u16(), path.error_code().as_str()),
        (404, "not_found")
    );
    let method = r
        .client
        .request(hyper::Method::POST, "/v1/polls/default/results", &[], "")
        .await?;
    assert_eq!(
        (method.status.as_u16(), method.error_code().as_str()),
        (405, "method_not_allowed")
    );
    let polls = r.client.get("/v1/polls").await?.json();
    assert_eq!(polls["polls"][0]["id"], "default");
    let page = r.client.get("/").await?;
    assert!(
        page.text().contains("EventSource")
            && !page.text().contains("http://")
            && !page.text().contains("https://")
    );
    r.stop().await
}

#[tokio::test]
async fn a_hidden_poll_is_kept_from_the_public_until_revealed_then_shows_its_certified_result(
) -> anyhow::Result<()> {
    const OPERATOR: &str = "control-room-token-0123456789";
    let pg = PgCluster::start_with_replica().await?;
    let mut client = pg.client().await?;
    let mut poll = model::Poll::new("hidden", &["x", "y"])?;
    poll.hidden = true;
    db::create_poll(&mut client, &poll).await?;
    client
        .batch_execute(
            "INSERT INTO ballots (poll_id, voter_id, option, vote_id, cast_at, region)
             VALUES ('hidden', 'v1', 'x', gen_random_uuid(), 1, 'eu-west-1');
             UPDATE tally_parts SET count = 1 WHERE poll_id = 'hidden' AND option = 'x'",
        )
        .await?;
    pg.wait_replica_caught_up(Duration::from_secs(10)).await?;
    let r = start_with(&pg, "eu-west-1", Some(OPERATOR)).await?;
    let public = |path: &'static str| {
        let c = r.client.clone();
        async move { c.get(path).await }
    };
    let operator = |path: &'static str| {
        let c = r.client.clone();
        let auth = format!("Bearer {OPERATOR}");
        async move {
            c.request(hyper::Method::GET, path, &[("authorization", &auth)], "")
                .await
        }
    };
    wait_for(Duration::from_secs(10), || async {
        Ok(operator("/v1/polls/hidden/results").await?.status == 200)
    })
    .await?;
    for path in [
        "/v1/polls/hidden/results",
        "/v1/polls/hidden/results/stream",
    ] {
        let refused = public(path).await?;
        assert_eq!(refused.status, 403, "{path}: {}", refused.text());
        assert_eq!(refused.error_code(), "results_hidden");
    }
    let wrong = r
        .client
        .request(
            hyper::Method::GET,
            "/v1/polls/hidden/results",
            &[("authorization", "Bearer not-the-operator-token!!")],
            "",
        )
        .await?;
    assert_eq!(wrong.status, 403, "a wrong token sees nothing");
    // The control room sees the live counts; the public list says the poll exists.
    let live = operator("/v1/polls/hidden/results").await?.json();
    assert_eq!(live["counts"]["x"], 1);
    let list = public("/v1/polls").await?.json();
    assert!(
        list["polls"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == "hidden" && p["hidden"] == true),
        "{list}"
    );

    // Certified final with counts frozen, then revealed: the public gets exactly those.
    client
        .batch_execute(
            r#"UPDATE polls SET closes_at = now() - interval '1 minute', final_at = now(),
                      final_counts = '{"x": 1, "y": 0}', digest = 'abc' WHERE id = 'hidden';
               UPDATE tally_parts SET count = 5 WHERE poll_id = 'hidden' AND option = 'y'"#,
        )
        .await?;
    db::reveal_poll(&client, "hidden").await?;
    pg.wait_replica_caught_up(Duration::from_secs(10)).await?;
    wait_for(Duration::from_secs(10), || async {
        Ok(public("/v1/polls/hidden/results").await?.status == 200)
    })
    .await?;
    let revealed = public("/v1/polls/hidden/results").await?.json();
    assert_eq!(revealed["state"], "final");
    assert_eq!(revealed["counts"]["x"], 1);
    assert_eq!(
        revealed["counts"]["y"], 0,
        "the frozen counts, not the tallies: {revealed}"
    );
    assert_eq!(revealed["digest"], "abc");
    assert!(revealed["final_at"].is_string() && revealed["closes_at"].is_string());
    r.stop().await
}
