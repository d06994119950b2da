//! `tally replication promote --platform rds` against moto's RDS: a primary in us-east-1 and
//! cross-region read replicas, the replica whose server has received the most WAL chosen over
//! the operator's first preference, a dry run that changes nothing, and `PromoteReadReplica`
//! sent for the chosen one only.

mod common;

use std::io::{Read, Write};
use std::process::Output;

use common::command;
use harness::PgCluster;

struct Stop(servers::Moto);
impl Drop for Stop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn moto(dir: &std::path::Path) -> Stop {
    servers::Moto::binary()
        .expect("moto_server is not installed: run scripts/setup --moto and set TALLY_MOTO_SERVER");
    let m = servers::on_free_port(|port| {
        let m = servers::Moto::new(dir.join("moto"), port);
        m.start().map(|()| m)
    })
    .expect("starting moto");
    Stop(m)
}

/// One call of RDS's query API on moto, in `region`; the XML answer.
fn rds(endpoint: &str, region: &str, form: &str) -> String {
    let (ok, out) = call(endpoint, region, form);
    assert!(ok, "{form}: {out}");
    out
}

/// Whether RDS stops `instance`. It refuses for a read replica: moto keeps a promoted instance's
/// `ReadReplicaSourceDBInstanceIdentifier` (RDS clears it), so this is how a test sees that a
/// promotion happened.
fn can_stop(endpoint: &str, region: &str, instance: &str) -> bool {
    call(
        endpoint,
        region,
        &format!("Action=StopDBInstance&Version=2014-10-31&DBInstanceIdentifier={instance}"),
    )
    .0
}

fn call(endpoint: &str, region: &str, form: &str) -> (bool, String) {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    // moto picks the service and region from the credential scope.
    let request = format!(
        "POST / HTTP/1.1\r\nHost: {addr}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/rds/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.starts_with("HTTP/1.1 200"), out)
}

/// The instance it replicates from, as RDS describes it (`None`: it is a primary).
fn source_of(endpoint: &str, region: &str, instance: &str) -> Option<String> {
    let xml = rds(
        endpoint,
        region,
        &format!("Action=DescribeDBInstances&Version=2014-10-31&DBInstanceIdentifier={instance}"),
    );
    xml.split("<ReadReplicaSourceDBInstanceIdentifier>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .map(str::to_string)
}

fn promote(endpoint: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "replication",
        "promote",
        "--platform",
        "rds",
        "--endpoint-url",
        endpoint,
    ];
    all.extend_from_slice(args);
    command(&all)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap()
}

fn report(out: Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn the_replica_with_the_most_wal_is_promoted_and_only_it() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let moto = moto(tmp.path());
    let endpoint = moto.0.url();
    rds(
        &endpoint,
        "us-east-1",
        "Action=CreateDBInstance&Version=2014-10-31&DBInstanceIdentifier=tally-us-east-1&DBInstanceClass=db.r6g.large&Engine=postgres&AllocatedStorage=100&MasterUsername=tally_admin&MasterUserPassword=secretsecret",
    );
    for region in ["eu-west-1", "ap-southeast-1"] {
        rds(
            &endpoint,
            region,
            &format!("Action=CreateDBInstanceReadReplica&Version=2014-10-31&DBInstanceIdentifier=tally-{region}&SourceDBInstanceIdentifier=arn:aws:rds:us-east-1:123456789012:db:tally-us-east-1&DBInstanceClass=db.r6g.large"),
        );
        assert!(source_of(&endpoint, region, &format!("tally-{region}")).is_some());
    }
    // eu-west-1's server answers (a real streaming replica); ap-southeast-1's WAL is unknown,
    // so eu-west-1 is chosen though named second.
    let pg = PgCluster::start_with_replica().await?;
    pg.wait_replica_caught_up(std::time::Duration::from_secs(30))
        .await?;
    let eu = format!("eu-west-1=tally-eu-west-1={}", pg.replica_url());
    let candidates = [
        "--replica",
        "ap-southeast-1=tally-ap-southeast-1",
        "--replica",
        eu.as_str(),
    ];

    let dry = report(promote(
        &endpoint,
        &[&candidates[..], &["--dry-run", "--json"]].concat(),
    ));
    assert_eq!(dry["promoted"]["region"], "eu-west-1", "{dry}");
    assert_eq!(dry["dry_run"], true);
    assert!(
        dry["candidates"][1]["received_lsn"].as_u64().unwrap() > 0,
        "{dry}"
    );
    assert!(dry["candidates"][0]["received_lsn"].is_null(), "{dry}");
    assert!(
        !can_stop(&endpoint, "eu-west-1", "tally-eu-west-1"),
        "a dry run promoted"
    );

    let done = report(promote(&endpoint, &[&candidates[..], &["--json"]].concat()));
    assert_eq!(done["platform"], "rds");
    assert_eq!(done["promoted"]["instance"], "tally-eu-west-1", "{done}");
    assert!(done["next"].as_array().unwrap().len() >= 2, "{done}");
    assert!(!can_stop(
        &endpoint,
        "ap-southeast-1",
        "tally-ap-southeast-1"
    ));
    assert!(
        can_stop(&endpoint, "eu-west-1", "tally-eu-west-1"),
        "not promoted"
    );

    // What RDS now says decides: eu-west-1 is not available (stopped just now).
    let after = report(promote(
        &endpoint,
        &[&candidates[..], &["--dry-run", "--json"]].concat(),
    ));
    assert_eq!(after["promoted"]["region"], "ap-southeast-1", "{after}");

    // Bad input: a clear error, nothing promoted.
    let bad = promote(&endpoint, &["--replica", "eu-west-1"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("region=instance"));
    let unknown = promote(
        &endpoint,
        &[
            "--replica",
            "ap-southeast-1=tally-ap-southeast-1",
            "--replica",
            "eu-west-1=no-such-db",
        ],
    );
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no-such-db"));
    assert!(!can_stop(
        &endpoint,
        "ap-southeast-1",
        "tally-ap-southeast-1"
    ));
    Ok(())
}
