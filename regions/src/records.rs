//! The Route53 records a topology calls for: pure data, the same for `tally regions sync` (which
//! makes the zone hold exactly these) and for the answer function (which routes voters over them).
//!
//! Voters resolve `vote.<zone>`. Its geolocation records send each continent or country to its
//! region's failover name, `<region>.vote.<zone>`, and the default record sends everyone else to
//! the default region's. A failover name is a PRIMARY/SECONDARY pair: the region's ingest guarded
//! by its health check, else the next name down the region's failover order. The last pair's
//! SECONDARY is the last target itself, so a chain of any length ends in a host, never a loop.

use model::RegionName;
use serde::Serialize;

use crate::topology::{Region, Topology};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Geo {
    Country(String),
    Continent(String),
    /// Route53's `*` country: every location no other geolocation record matches.
    Default,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Failover {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Routing {
    Simple,
    Geo(Geo),
    Failover(Failover),
}

/// One CNAME record set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Record {
    /// Fully qualified, lower case, without the trailing dot.
    pub name: String,
    /// Route53's `SetIdentifier`: tells apart records of one name (none for a simple record).
    pub set_identifier: Option<String>,
    pub routing: Routing,
    /// The region whose ingest health check guards this record.
    pub health_check: Option<RegionName>,
    pub ttl: u32,
    /// The CNAME's target.
    pub value: String,
}

/// The failover name of `region`'s `level`th choice (0: itself, 1: its first failover target, ...).
pub fn failover_name(topology: &Topology, region: &RegionName, level: usize) -> String {
    let base = format!("{region}.{}", topology.zone.vote_name());
    match level {
        0 => base,
        k => format!("then-{k}.{base}"),
    }
}

/// Every record the topology calls for, sorted.
pub fn records(topology: &Topology) -> Vec<Record> {
    let ttl = topology.zone.ttl;
    let vote = topology.zone.vote_name();
    let mut out = Vec::new();
    for r in &topology.regions {
        let target = failover_name(topology, &r.name, 0);
        let geo = r
            .countries
            .iter()
            .map(|c| Geo::Country(c.clone()))
            .chain(r.continents.iter().map(|c| Geo::Continent(c.clone())))
            .chain(r.default.then_some(Geo::Default));
        for g in geo {
            let id = match &g {
                Geo::Country(c) => format!("country-{c}"),
                Geo::Continent(c) => format!("continent-{c}"),
                Geo::Default => "default".into(),
            };
            out.push(Record {
                name: vote.clone(),
                set_identifier: Some(id),
                routing: Routing::Geo(g),
                health_check: None,
                ttl,
                value: target.clone(),
            });
        }
        out.extend(failover_chain(topology, r));
    }
    out.sort();
    out
}

fn failover_chain(topology: &Topology, r: &Region) -> Vec<Record> {
    let ttl = topology.zone.ttl;
    let choices: Vec<&RegionName> = std::iter::once(&r.name).chain(&r.failover).collect();
    let host = |name: &RegionName| {
        topology
            .region(name.as_str())
            .expect("validated failover target")
            .endpoints
            .ingest
            .clone()
    };
    if choices.len() == 1 {
        return vec![Record {
            name: failover_name(topology, &r.name, 0),
            set_identifier: None,
            routing: Routing::Simple,
            health_check: None,
            ttl,
            value: host(&r.name),
        }];
    }
    let mut out = Vec::new();
    for level in 0..choices.len() - 1 {
        let name = failover_name(topology, &r.name, level);
        out.push(Record {
            name: name.clone(),
            set_identifier: Some(format!("{}-primary", r.name)),
            routing: Routing::Failover(Failover::Primary),
            health_check: Some(choices[level].clone()),
            ttl,
            value: host(choices[level]),
        });
        let last = level + 2 == choices.len();
        out.push(Record {
            name,
            set_identifier: Some(format!("{}-secondary", r.name)),
            routing: Routing::Failover(Failover::Secondary),
            health_check: last.then(|| choices[level + 1].clone()),
            ttl,
            value: if last {
                host(choices[level + 1])
            } else {
                failover_name(topology, &r.name, level + 1)
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_zone_has_geo_records_and_failover_pairs() {
        let t = Topology::standard();
        let rs = records(&t);
        let geo: Vec<_> = rs
            .iter()
            .filter(|r| matches!(r.routing, Routing::Geo(_)))
            .collect();
        // Six continents and one default.
        assert_eq!(geo.len(), 7);
        assert!(geo.iter().all(|r| r.name == "vote.tally.example.com"));
        // Two levels of PRIMARY/SECONDARY per region: itself, then its first target, then its second.
        let pairs = rs
            .iter()
            .filter(|r| matches!(r.routing, Routing::Failover(_)))
            .count();
        assert_eq!(pairs, 3 * 2 * 2);
        let eu = rs
            .iter()
            .find(|r| {
                r.name == "eu-west-1.vote.tally.example.com"
                    && r.routing == Routing::Failover(Failover::Secondary)
            })
            .unwrap();
        assert_eq!(eu.value, "then-1.eu-west-1.vote.tally.example.com");
        assert_eq!(eu.health_check, None);
        let ids: std::collections::HashSet<_> =
            rs.iter().map(|r| (&r.name, &r.set_identifier)).collect();
        assert_eq!(ids.len(), rs.len(), "name and set identifier are unique");
    }
}
