//! What `tally regions sync` must change, decided without IO: the zone's records and health
//! checks as they are, against what the topology calls for, in, a change set out. The same
//! change set is what `--dry-run` prints.

use serde::Serialize;

use crate::records::Record;
use crate::topology::Topology;

/// One Route53 health check: the ingest endpoint of a region, probed over HTTPS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub region: String,
    pub fqdn: String,
    pub path: String,
    pub port: u16,
    pub interval_seconds: u32,
    pub failure_threshold: u32,
}

/// The health checks the topology calls for, one per region.
pub fn health_checks(topology: &Topology) -> Vec<HealthCheck> {
    let hc = &topology.zone.health_check;
    topology
        .regions
        .iter()
        .map(|r| HealthCheck {
            region: r.name.to_string(),
            fqdn: r.endpoints.ingest.clone(),
            path: hc.path.clone(),
            port: hc.port,
            interval_seconds: hc.interval_seconds,
            failure_threshold: hc.failure_threshold,
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    CreateZone {
        zone: String,
    },
    CreateHealthCheck {
        check: HealthCheck,
    },
    /// Port, path and threshold can change in place (Route53 fixes the interval at creation).
    UpdateHealthCheck {
        id: String,
        check: HealthCheck,
    },
    DeleteHealthCheck {
        id: String,
        fqdn: String,
    },
    CreateRecord {
        record: Record,
    },
    UpsertRecord {
        record: Record,
    },
    DeleteRecord {
        record: Record,
    },
}

/// Health checks: one per region is kept (found by the endpoint it probes), any other probing an
/// endpoint of ours that no region has any more is deleted. `existing` is (id, check).
pub fn plan_health_checks(
    desired: &[HealthCheck],
    existing: &[(String, HealthCheck)],
) -> Vec<Change> {
    let mut out = Vec::new();
    for want in desired {
        match existing.iter().find(|(_, have)| have.fqdn == want.fqdn) {
            None => out.push(Change::CreateHealthCheck {
                check: want.clone(),
            }),
            Some((id, have)) => {
                let same = have.path == want.path
                    && have.port == want.port
                    && have.failure_threshold == want.failure_threshold;
                if !same {
                    out.push(Change::UpdateHealthCheck {
                        id: id.clone(),
                        check: want.clone(),
                    });
                }
            }
        }
    }
    for (id, have) in existing {
        // The driver names the region of a check it created (its caller reference says so).
        let ours = !have.region.is_empty();
        if ours && !desired.iter().any(|w| w.fqdn == have.fqdn) {
            out.push(Change::DeleteHealthCheck {
                id: id.clone(),
                fqdn: have.fqdn.clone(),
            });
        }
    }
    out
}

/// Records: keyed by name and set identifier. A record the topology no longer calls for is
/// deleted, but only under the vote name: the rest of the zone is not ours.
pub fn plan_records(desired: &[Record], existing: &[Record]) -> Vec<Change> {
    let key = |r: &Record| (r.name.clone(), r.set_identifier.clone());
    let mut out = Vec::new();
    // Deletions first: a record changing its routing policy must leave before its new self
    // arrives, and Route53 applies a batch in order.
    for have in existing {
        if !desired.iter().any(|w| key(w) == key(have)) {
            out.push(Change::DeleteRecord {
                record: have.clone(),
            });
        }
    }
    for want in desired {
        match existing.iter().find(|h| key(h) == key(want)) {
            None => out.push(Change::CreateRecord {
                record: want.clone(),
            }),
            Some(have) if have != want => out.push(Change::UpsertRecord {
                record: want.clone(),
            }),
            Some(_) => {}
        }
    }
    out
}

/// One line per change, for people.
pub fn describe(change: &Change) -> String {
    let record = |verb: &str, r: &Record| {
        let how = match &r.routing {
            crate::records::Routing::Simple => String::new(),
            crate::records::Routing::Geo(g) => format!(" geolocation {g:?}"),
            crate::records::Routing::Failover(f) => format!(" failover {f:?}"),
        };
        let check = r
            .health_check
            .as_ref()
            .map(|h| format!(" (health check {h})"))
            .unwrap_or_default();
        format!("{verb} CNAME {}{how} -> {}{check}", r.name, r.value)
    };
    match change {
        Change::CreateZone { zone } => format!("create hosted zone {zone}"),
        Change::CreateHealthCheck { check } => format!(
            "create health check {} https://{}:{}{} every {} s, {} failures",
            check.region,
            check.fqdn,
            check.port,
            check.path,
            check.interval_seconds,
            check.failure_threshold
        ),
        Change::UpdateHealthCheck { id, check } => format!(
            "update health check {id} ({}): port {}, path {}, {} failures",
            check.region, check.port, check.path, check.failure_threshold
        ),
        Change::DeleteHealthCheck { id, fqdn } => format!("delete health check {id} ({fqdn})"),
        Change::CreateRecord { record: r } => record("create", r),
        Change::UpsertRecord { record: r } => record("update", r),
        Change::DeleteRecord { record: r } => record("delete", r),
    }
}

/// Is `name` the vote name or under it (the part of the zone `sync` manages)?
pub fn managed(topology: &Topology, name: &str) -> bool {
    let vote = topology.zone.vote_name();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == vote || name.ends_with(&format!(".{vote}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{records, Routing};

    #[test]
    fn an_empty_zone_gets_everything_and_a_matching_zone_nothing() {
        let t = Topology::standard();
        let want = records(&t);
        let changes = plan_records(&want, &[]);
        assert_eq!(changes.len(), want.len());
        assert!(changes
            .iter()
            .all(|c| matches!(c, Change::CreateRecord { .. })));
        assert_eq!(plan_records(&want, &want), vec![]);
        let checks = health_checks(&t);
        assert_eq!(plan_health_checks(&checks, &[]).len(), 3);
        let existing: Vec<(String, HealthCheck)> = checks
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("hc-{i}"), c.clone()))
            .collect();
        assert_eq!(plan_health_checks(&checks, &existing), vec![]);
    }

    #[test]
    fn only_the_difference_is_sent() {
        let t = Topology::standard();
        let want = records(&t);
        let mut have = want.clone();
        have[0].ttl += 1;
        let stale = Record {
            name: "old.vote.tally.example.com".into(),
            set_identifier: None,
            routing: Routing::Simple,
            health_check: None,
            ttl: 60,
            value: "gone.example.com".into(),
        };
        have.push(stale.clone());
        let changes = plan_records(&want, &have);
        assert_eq!(
            changes,
            vec![
                Change::DeleteRecord { record: stale },
                Change::UpsertRecord {
                    record: want[0].clone()
                },
            ]
        );
        let mut checks = health_checks(&t);
        let existing: Vec<(String, HealthCheck)> = checks
            .iter()
            .map(|c| ("id".to_string(), c.clone()))
            .collect();
        checks[1].failure_threshold = 5;
        assert_eq!(
            plan_health_checks(&checks, &existing),
            vec![Change::UpdateHealthCheck {
                id: "id".into(),
                check: checks[1].clone()
            }]
        );
    }

    #[test]
    fn only_names_under_the_vote_name_are_managed() {
        let t = Topology::standard();
        assert!(managed(&t, "vote.tally.example.com."));
        assert!(managed(&t, "then-1.eu-west-1.vote.tally.example.com"));
        assert!(!managed(&t, "tally.example.com."));
        assert!(!managed(&t, "evote.tally.example.com"));
    }
}
