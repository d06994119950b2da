//! Route53's answer, computed: which host a client at a location gets for a name, given the
//! records and the health of each region. moto stores records but does not answer queries, so
//! local runs route voters with this function; it follows Route53's documented rules:
//!
//! - geolocation: the most specific record that matches (country, then continent, then the
//!   default record); one guarded by an unhealthy health check is passed over for the next less
//!   specific one; no match and no default is no answer;
//! - failover: the PRIMARY while its health check passes, else the SECONDARY when it has no
//!   health check or its check passes, else (both unhealthy) the PRIMARY;
//! - a CNAME to another name of the zone is resolved in turn, as a resolver would.

use model::RegionName;

use crate::records::{Failover, Geo, Record, Routing};
use crate::topology::{Region, Topology};

/// Resolvers give up on CNAME chains longer than this.
const MAX_CNAME_DEPTH: usize = 16;

/// Where a client is, as Route53 geolocates its resolver (or its EDNS client subnet).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Location {
    pub continent: Option<String>,
    pub country: Option<String>,
}

impl Location {
    pub fn continent(code: &str) -> Self {
        Location {
            continent: Some(code.into()),
            country: None,
        }
    }
}

/// The host `name` resolves to for a client at `client`, or `None` when Route53 would give no
/// answer (no record matches, or a CNAME loop).
pub fn answer(
    records: &[Record],
    healthy: &dyn Fn(&RegionName) -> bool,
    client: &Location,
    name: &str,
) -> Option<String> {
    let mut name = name.to_ascii_lowercase();
    for _ in 0..MAX_CNAME_DEPTH {
        let set: Vec<&Record> = records.iter().filter(|r| r.name == name).collect();
        if set.is_empty() {
            // Not a name of the zone: the host the chain ends at.
            return Some(name);
        }
        name = choose(&set, healthy, client)?.value.clone();
    }
    None
}

/// The region whose ingest a voter at `client` is sent to.
pub fn route<'t>(
    topology: &'t Topology,
    records: &[Record],
    healthy: &dyn Fn(&RegionName) -> bool,
    client: &Location,
) -> Option<&'t Region> {
    let host = answer(records, healthy, client, &topology.zone.vote_name())?;
    topology.region_of_endpoint(&host)
}

fn passes(r: &Record, healthy: &dyn Fn(&RegionName) -> bool) -> bool {
    r.health_check.as_ref().is_none_or(healthy)
}

fn choose<'r>(
    set: &[&'r Record],
    healthy: &dyn Fn(&RegionName) -> bool,
    client: &Location,
) -> Option<&'r Record> {
    match &set[0].routing {
        Routing::Simple => Some(set[0]),
        Routing::Geo(_) => {
            let matching = |want: &Geo| {
                set.iter()
                    .copied()
                    .find(|r| matches!(&r.routing, Routing::Geo(g) if g == want))
            };
            let country = client.country.clone().map(Geo::Country);
            let continent = client.continent.clone().map(Geo::Continent);
            let candidates: Vec<&Record> = [country, continent, Some(Geo::Default)]
                .iter()
                .flatten()
                .filter_map(matching)
                .collect();
            candidates
                .iter()
                .copied()
                .find(|r| passes(r, healthy))
                .or_else(|| candidates.first().copied())
        }
        Routing::Failover(_) => {
            let role = |want| {
                set.iter()
                    .copied()
                    .find(|r| r.routing == Routing::Failover(want))
            };
            let primary = role(Failover::Primary);
            let secondary = role(Failover::Secondary);
            match (primary, secondary) {
                (Some(p), _) if passes(p, healthy) => Some(p),
                (_, Some(s)) if passes(s, healthy) => Some(s),
                (p, s) => p.or(s),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::records;
    use crate::topology::{Endpoints, HealthCheckSettings, Zone, CONTINENTS};
    use proptest::prelude::*;

    fn region(name: &str) -> RegionName {
        RegionName::new(name).unwrap()
    }

    fn routed(t: &Topology, unhealthy: &[&str], client: &Location) -> Option<String> {
        let rs = records(t);
        let healthy = |r: &RegionName| !unhealthy.contains(&r.as_str());
        route(t, &rs, &healthy, client).map(|r| r.name.to_string())
    }

    #[test]
    fn europeans_go_to_eu_west_1_and_to_its_failover_target_when_it_is_down() {
        let t = Topology::standard();
        let eu = Location::continent("EU");
        assert_eq!(routed(&t, &[], &eu).as_deref(), Some("eu-west-1"));
        assert_eq!(
            routed(&t, &["eu-west-1"], &eu).as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            routed(&t, &["eu-west-1", "us-east-1"], &eu).as_deref(),
            Some("ap-southeast-1")
        );
        assert_eq!(
            routed(&t, &["ap-southeast-1"], &Location::continent("OC")).as_deref(),
            Some("us-east-1")
        );
    }

    #[test]
    fn unknown_locations_get_the_default() {
        let t = Topology::standard();
        assert_eq!(
            routed(&t, &[], &Location::continent("AN")).as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            routed(&t, &[], &Location::default()).as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            routed(&t, &["us-east-1"], &Location::default()).as_deref(),
            Some("eu-west-1")
        );
    }

    #[test]
    fn a_country_record_beats_its_continent() {
        let mut t = Topology::standard();
        t.regions[1].countries.push("GB".into());
        t.validate().unwrap();
        let gb = Location {
            continent: Some("EU".into()),
            country: Some("GB".into()),
        };
        let name = t.regions[1].name.to_string();
        assert_eq!(routed(&t, &[], &gb), Some(name));
    }

    #[test]
    fn a_name_outside_the_zone_is_its_own_answer_and_a_loop_is_no_answer() {
        let rec = |name: &str, value: &str| Record {
            name: name.into(),
            set_identifier: None,
            routing: Routing::Simple,
            health_check: None,
            ttl: 60,
            value: value.into(),
        };
        let rs = vec![rec("a.z", "b.z"), rec("b.z", "a.z")];
        let all = |_: &RegionName| true;
        assert_eq!(
            answer(&rs, &all, &Location::default(), "elsewhere.example"),
            Some("elsewhere.example".into())
        );
        assert_eq!(answer(&rs, &all, &Location::default(), "a.z"), None);
    }

    /// A topology of `n` regions: continents dealt out by `owners` (None: unserved), the default
    /// region, and each region's failover order as a rotation of the others.
    fn generated(n: usize, owners: &[Option<usize>], default: usize, turns: &[usize]) -> Topology {
        let names: Vec<String> = (0..n).map(|i| format!("region-{i}")).collect();
        let regions = (0..n)
            .map(|i| {
                let mut others: Vec<RegionName> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| region(&names[j]))
                    .collect();
                let turn = turns[i] % others.len().max(1);
                others.rotate_left(turn);
                Region {
                    name: region(&names[i]),
                    primary: i == 0,
                    default: i == default,
                    continents: CONTINENTS
                        .iter()
                        .zip(owners)
                        .filter(|(_, o)| **o == Some(i))
                        .map(|(c, _)| c.to_string())
                        .collect(),
                    countries: vec![],
                    shards: 1,
                    failover: others,
                    endpoints: Endpoints {
                        ingest: format!("ingest.{}.example", names[i]),
                        results: format!("results.{}.example", names[i]),
                        postgres: format!("pg.{}.example", names[i]),
                    },
                }
            })
            .collect();
        Topology {
            zone: Zone {
                zone: "z.example".into(),
                vote: "vote".into(),
                ttl: 60,
                health_check: HealthCheckSettings {
                    path: "/readyz".into(),
                    port: 443,
                    interval_seconds: 10,
                    failure_threshold: 3,
                },
            },
            regions,
        }
    }

    fn topologies() -> impl Strategy<Value = (Topology, Vec<bool>, usize)> {
        (1usize..6).prop_flat_map(|n| {
            (
                proptest::collection::vec(proptest::option::of(0..n), CONTINENTS.len()),
                0..n,
                proptest::collection::vec(0usize..6, n),
                proptest::collection::vec(any::<bool>(), n),
                0..CONTINENTS.len(),
            )
                .prop_filter_map(
                    "every region serves someone",
                    move |(owners, d, turns, health, c)| {
                        let t = generated(n, &owners, d, &turns);
                        t.validate().ok()?;
                        Some((t, health, c))
                    },
                )
        })
    }

    proptest! {
        /// The voter's own region while it is healthy, else the first healthy region of its
        /// failover order; locations no region claims follow the default region's order.
        #[test]
        fn voters_go_to_the_first_healthy_region_in_their_order((t, health, c) in topologies()) {
            let rs = records(&t);
            let healthy = |r: &RegionName| {
                health[t.regions.iter().position(|x| &x.name == r).unwrap()]
            };
            let client = Location::continent(CONTINENTS[c]);
            let home = t
                .regions
                .iter()
                .find(|r| r.continents.iter().any(|x| x == CONTINENTS[c]))
                .or_else(|| t.regions.iter().find(|r| r.default))
                .unwrap();
            let order: Vec<&RegionName> = std::iter::once(&home.name).chain(&home.failover).collect();
            let got = route(&t, &rs, &healthy, &client).expect("an answer").name.clone();
            match order.iter().find(|r| healthy(r)) {
                Some(first_healthy) => prop_assert_eq!(&got, *first_healthy),
                // Everything down: Route53 answers the last pair's PRIMARY; someone in the order.
                None => prop_assert!(order.contains(&&got)),
            }
        }

        /// With every region healthy, nobody leaves their own region.
        #[test]
        fn all_healthy_is_pure_geography((t, _health, c) in topologies()) {
            let rs = records(&t);
            let client = Location::continent(CONTINENTS[c]);
            let got = route(&t, &rs, &|_| true, &client).unwrap();
            let claimed = t.regions.iter().find(|r| r.continents.iter().any(|x| x == CONTINENTS[c]));
            prop_assert_eq!(got, claimed.unwrap_or_else(|| t.regions.iter().find(|r| r.default).unwrap()));
        }
    }
}
