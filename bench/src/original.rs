//! The original app's patterns, reproduced (not copied) so Tally can be measured against them in
//! one run: its vote service opened a new Redis connection and sent one `RPUSH` per request; its
//! worker popped one vote and wrote it with one `INSERT`, then `UPDATE` on conflict, per round trip.

use std::time::Instant;

use bytes::Bytes;
use hyper::{HeaderMap, StatusCode};
use model::Vote;
use tokio::net::TcpListener;

/// The original vote service: per request, a new Redis connection and one `RPUSH` of the vote
/// as JSON; `202` once Redis answered.
pub async fn vote_service(listener: TcpListener, redis_url: String) {
    let client = redis::Client::open(redis_url).expect("a valid Redis URL");
    crate::bare::serve(listener, move |headers: HeaderMap, body: Bytes| {
        let client = client.clone();
        async move {
            let voter = headers
                .get("x-voter-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("anonymous")
                .to_owned();
            let option = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["option"].as_str().map(str::to_owned));
            let stored = async {
                let mut con = client.get_multiplexed_async_connection().await?;
                let data = serde_json::json!({ "voter_id": voter, "vote": option }).to_string();
                redis::cmd("RPUSH")
                    .arg("votes")
                    .arg(data)
                    .query_async::<i64>(&mut con)
                    .await
            };
            match stored.await {
                Ok(_) => (
                    StatusCode::ACCEPTED,
                    Bytes::from_static(crate::bare::NIL_VOTE_ID),
                ),
                Err(_) => (StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"{}")),
            }
        }
    })
    .await
}

/// The original worker, reproduced: pop one vote, `INSERT`, and `UPDATE` when the voter exists.
pub async fn worker(
    pg: &harness::PgCluster,
    redis: &harness::RedisServer,
    votes: &[Vote],
) -> anyhow::Result<f64> {
    let client = pg.client().await?;
    client
        .batch_execute("CREATE TABLE votes (id text PRIMARY KEY, vote text NOT NULL)")
        .await?;
    let mut con = redis.connection().await?;
    const KEY: &str = "baseline:votes";
    for chunk in votes.chunks(10_000) {
        let payloads: Vec<Vec<u8>> = chunk.iter().map(model::wire::encode).collect();
        let _: () = redis::cmd("RPUSH")
            .arg(KEY)
            .arg(payloads)
            .query_async(&mut con)
            .await?;
    }
    let insert = client
        .prepare("INSERT INTO votes (id, vote) VALUES ($1, $2)")
        .await?;
    let update = client
        .prepare("UPDATE votes SET vote = $2 WHERE id = $1")
        .await?;
    let started = Instant::now();
    loop {
        let popped: Option<Vec<u8>> = redis::cmd("LPOP").arg(KEY).query_async(&mut con).await?;
        let Some(payload) = popped else { break };
        let v = model::wire::decode(&payload)?;
        let (id, vote) = (v.voter.as_str(), v.option.as_str());
        if client.execute(&insert, &[&id, &vote]).await.is_err() {
            client.execute(&update, &[&id, &vote]).await?;
        }
    }
    Ok(votes.len() as f64 / started.elapsed().as_secs_f64())
}
