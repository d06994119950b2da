//! `tally regions sync` against a real moto server: the first run builds the zone, the second
//! sends nothing, and what moto holds (read over its own REST API, not through Tally) is what
//! the topology files call for.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use regions::records::{Geo, Routing};

fn ok(args: &[&str], endpoint: &str) -> String {
    let out = common::command(args)
        .args(["--endpoint-url", endpoint])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_PROFILE")
        .output()
        .expect("running tally");
    common::succeeded(args, out)
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

struct Stop(servers::Moto);
impl Drop for Stop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

fn moto(dir: &std::path::Path) -> Option<Stop> {
    servers::Moto::binary()?;
    let m = servers::on_free_port(|port| {
        let m = servers::Moto::new(dir.join("moto"), port);
        m.start().map(|()| m)
    })
    .expect("starting moto");
    Some(Stop(m))
}

/// `GET path` on moto's Route53 REST API, the XML body.
fn get(endpoint: &str, path: &str) -> String {
    // moto picks the service from the credential scope: without one it answers as S3.
    let auth = "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/route53/aws4_request, SignedHeaders=host, Signature=0\r\n";
    common::http_get(endpoint.trim_start_matches("http://"), path, auth)
}

/// Every `<tag>...</tag>` in `xml`, in order.
fn all<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    xml.split(open.as_str())
        .skip(1)
        .filter_map(|s| s.split(close.as_str()).next())
        .collect()
}

fn one<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    all(xml, tag).into_iter().next()
}

#[test]
fn sync_twice_sends_nothing_the_second_time_and_moto_holds_the_topology() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(moto) = moto(tmp.path()) else {
        panic!("moto_server is not installed: run scripts/setup --moto and set TALLY_MOTO_SERVER");
    };
    let endpoint = moto.0.url();
    let dry = ok(&["regions", "sync", "--dry-run"], &endpoint);
    let planned: usize = last_line(&dry)
        .trim_end_matches(" changes")
        .parse()
        .unwrap();
    let topology = regions::Topology::standard();
    let want = regions::records(&topology);
    // The zone, a health check per region, every record.
    assert_eq!(planned, 1 + 3 + want.len(), "{dry}");
    // A dry run sends nothing: the next dry run plans the same.
    assert_eq!(
        last_line(&ok(&["regions", "sync", "--dry-run"], &endpoint)),
        format!("{planned} changes")
    );

    let first = ok(&["regions", "sync"], &endpoint);
    assert_eq!(last_line(&first), format!("{planned} changes"), "{first}");
    let second = ok(&["regions", "sync"], &endpoint);
    assert_eq!(second.trim(), "0 changes");

    // What moto holds, read over its REST API.
    let zones = get(&endpoint, "/2013-04-01/hostedzone");
    let zone_id = one(&zones, "Id")
        .unwrap()
        .trim_start_matches("/hostedzone/");
    assert_eq!(one(&zones, "Name"), Some("tally.example.com."));
    let rrsets = get(
        &endpoint,
        &format!("/2013-04-01/hostedzone/{zone_id}/rrset"),
    );
    let checks = get(&endpoint, "/2013-04-01/healthcheck");
    let check_fqdns: BTreeSet<&str> = all(&checks, "FullyQualifiedDomainName")
        .into_iter()
        .collect();
    let ingest: BTreeSet<&str> = topology
        .regions
        .iter()
        .map(|r| r.endpoints.ingest.as_str())
        .collect();
    assert_eq!(check_fqdns, ingest, "one health check per region's ingest");

    let held: BTreeSet<(String, String, String)> = all(&rrsets, "ResourceRecordSet")
        .into_iter()
        .filter(|rs| one(rs, "Type") == Some("CNAME"))
        .map(|rs| {
            let id = one(rs, "SetIdentifier").unwrap_or("").to_string();
            let name = one(rs, "Name").unwrap().trim_end_matches('.').to_string();
            let value = one(rs, "Value").unwrap().trim_end_matches('.').to_string();
            (name, id, value)
        })
        .collect();
    let wanted: BTreeSet<(String, String, String)> = want
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.set_identifier.clone().unwrap_or_default(),
                r.value.clone(),
            )
        })
        .collect();
    assert_eq!(held, wanted);
    // The geolocation records carry their continent, the default record the `*` country.
    let europe = want
        .iter()
        .find(|r| r.routing == Routing::Geo(Geo::Continent("EU".into())))
        .unwrap();
    let europe_xml = all(&rrsets, "ResourceRecordSet")
        .into_iter()
        .find(|rs| one(rs, "SetIdentifier") == europe.set_identifier.as_deref())
        .unwrap();
    assert_eq!(one(europe_xml, "ContinentCode"), Some("EU"));
    assert!(rrsets.contains("<CountryCode>*</CountryCode>"));
    assert!(all(&rrsets, "Failover").contains(&"PRIMARY"));

    // A changed topology: only the difference goes out, then the zone is in step again.
    let changed = tmp.path().join("topology");
    std::fs::create_dir_all(&changed).unwrap();
    for entry in
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../regions/topology")).unwrap()
    {
        let path = entry.unwrap().path();
        std::fs::copy(&path, changed.join(path.file_name().unwrap())).unwrap();
    }
    let eu = changed.join("eu-west-1.toml");
    let text = std::fs::read_to_string(&eu).unwrap();
    std::fs::write(&eu, text.replace("countries = []", "countries = [\"IN\"]")).unwrap();
    let dir = changed.to_str().unwrap();
    let diff = ok(&["regions", "sync", "--regions", dir], &endpoint);
    assert_eq!(last_line(&diff), "1 changes", "{diff}");
    assert!(
        diff.contains("create CNAME vote.tally.example.com geolocation Country(\"IN\")"),
        "{diff}"
    );
    assert_eq!(
        ok(&["regions", "sync", "--regions", dir], &endpoint).trim(),
        "0 changes"
    );
    // And back: the record goes again.
    assert_eq!(last_line(&ok(&["regions", "sync"], &endpoint)), "1 changes");
}

#[test]
fn a_bad_topology_is_refused_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("zone.toml"),
        include_str!("../../regions/topology/zone.toml"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("us-east-1.toml"),
        include_str!("../../regions/topology/us-east-1.toml").replace(
            "failover = [\"eu-west-1\", \"ap-southeast-1\"]",
            "failover = [\"us-east-1\"]",
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["regions", "sync", "--regions", tmp.path().to_str().unwrap()])
        .args(["--endpoint-url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "tally: invalid configuration: failover cycle: us-east-1 -> us-east-1"
    );
}

#[test]
fn route_answers_like_route53() {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["regions", "route", "--unhealthy", "eu-west-1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("EU -> us-east-1"), "{text}");
    assert!(text.contains("AS -> ap-southeast-1"), "{text}");
    assert!(text.contains("AN -> us-east-1"), "{text}");
}
