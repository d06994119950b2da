//! The RDS driver: reads the replicas as RDS describes them and as their servers answer, lets
//! [`crate::choose`] pick one, and promotes it (`PromoteReadReplica`). RDS cannot re-point the
//! other replicas to it, nor fence an old primary in a lost region; the report says what is left
//! for the operator (docs/operations.md, "Failing over on RDS").

use std::time::Duration;

use aws_sdk_rds::Client;
use serde::Serialize;

use crate::choose::{choose, Candidate};
use crate::ReplicationError;

/// One replica to consider: its region, its instance identifier and, optionally, a URL its
/// server answers on, to read how much WAL it has received.
#[derive(Debug, Clone)]
pub struct Replica {
    pub region: String,
    pub instance: String,
    pub url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub platform: &'static str,
    pub dry_run: bool,
    pub candidates: Vec<Described>,
    /// The replica promoted (or, dry, that would be).
    pub promoted: Option<Candidate>,
    /// What RDS does not do and the operator must.
    pub next: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Described {
    #[serde(flatten)]
    pub candidate: Candidate,
    pub status: String,
    pub replica_of: Option<String>,
    pub endpoint: Option<String>,
}

/// An RDS client for `region`; `endpoint` replaces AWS's (a local moto server in tests).
pub async fn client(region: &str, endpoint: Option<&str>) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_string()));
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    Client::new(&loader.load().await)
}

fn aws(e: impl std::fmt::Display) -> ReplicationError {
    ReplicationError::Platform(e.to_string())
}

/// Describes every replica, chooses one and, unless `dry_run`, promotes it.
pub async fn promote(
    replicas: &[Replica],
    endpoint: Option<&str>,
    dry_run: bool,
) -> Result<Report, ReplicationError> {
    let mut described = Vec::new();
    for r in replicas {
        let rds = client(&r.region, endpoint).await;
        let out = rds
            .describe_db_instances()
            .db_instance_identifier(&r.instance)
            .send()
            .await
            .map_err(|e| {
                ReplicationError::Platform(format!(
                    "describing {} in {}: {}",
                    r.instance,
                    r.region,
                    aws_sdk_rds::error::DisplayErrorContext(&e)
                ))
            })?;
        let instance = out.db_instances().first().ok_or_else(|| {
            ReplicationError::Platform(format!("no instance {} in {}", r.instance, r.region))
        })?;
        let status = instance
            .db_instance_status()
            .unwrap_or("unknown")
            .to_string();
        let replica_of = instance
            .read_replica_source_db_instance_identifier()
            .map(str::to_string);
        let received_lsn = match &r.url {
            Some(url) => received(url).await,
            None => None,
        };
        described.push(Described {
            candidate: Candidate {
                region: r.region.clone(),
                instance: r.instance.clone(),
                available: status == "available",
                replica: replica_of.is_some(),
                received_lsn,
            },
            status,
            replica_of,
            endpoint: instance
                .endpoint()
                .and_then(|e| e.address())
                .map(str::to_string),
        });
    }
    let candidates: Vec<Candidate> = described.iter().map(|d| d.candidate.clone()).collect();
    let Some(chosen) = choose(&candidates).cloned() else {
        return Err(ReplicationError::Platform(
            "no available read replica to promote".into(),
        ));
    };
    if !dry_run {
        client(&chosen.region, endpoint)
            .await
            .promote_read_replica()
            .db_instance_identifier(&chosen.instance)
            .send()
            .await
            .map_err(|e| aws(aws_sdk_rds::error::DisplayErrorContext(&e)))?;
    }
    let others: Vec<&str> = candidates
        .iter()
        .filter(|c| c.instance != chosen.instance)
        .map(|c| c.region.as_str())
        .collect();
    let next = vec![
        format!(
            "the writers find {} by their multi-host URL (target_session_attrs=read-write); nothing to re-point",
            chosen.instance
        ),
        format!(
            "RDS cannot re-point a replica: create read replicas of {} in {} and the old primary's region when it returns, then apply terraform with it as the primary",
            chosen.instance,
            others.join(", ")
        ),
    ];
    Ok(Report {
        platform: "rds",
        dry_run,
        candidates: described,
        promoted: Some(chosen),
        next,
    })
}

/// The WAL a replica's server says it has received; nothing if it does not answer as a replica.
async fn received(url: &str) -> Option<u64> {
    let config: tokio_postgres::Config = url.parse().ok()?;
    let connected = tokio::time::timeout(Duration::from_secs(5), config.connect(tls::postgres()));
    let (client, connection) = connected.await.ok()?.ok()?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text",
            &[],
        )
        .await
        .ok()?;
    if !row.get::<_, bool>(0) {
        return None;
    }
    let lsn: Option<String> = row.get(1);
    db::parse_lsn(&lsn?)
}
