//! Who votes from where: the share of voters on each continent, and where Route53 sends them
//! while every region is healthy. The capacity model sizes regions by it; the lab's simulated
//! voters follow it.

use crate::{route, Location, Record, Topology};

/// Where voters are, and their share of all votes.
pub const VOTER_MIX: &[(&str, f64)] = &[
    ("NA", 0.30),
    ("SA", 0.08),
    ("EU", 0.27),
    ("AF", 0.05),
    ("AS", 0.25),
    ("OC", 0.05),
];

/// The region Route53 sends voters of `continent` to while every region is healthy.
pub fn home_region(topology: &Topology, records: &[Record], continent: &str) -> String {
    route(
        topology,
        records,
        &|_| true,
        &Location::continent(continent),
    )
    .map(|r| r.name.to_string())
    .unwrap_or_else(|| topology.primary().name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_voter_mix_covers_everyone_and_lands_where_the_topology_says() {
        let total: f64 = VOTER_MIX.iter().map(|(_, s)| s).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let t = Topology::standard();
        let records = crate::records(&t);
        assert_eq!(home_region(&t, &records, "EU"), "eu-west-1");
        assert_eq!(home_region(&t, &records, "SA"), "us-east-1");
        assert_eq!(home_region(&t, &records, "OC"), "ap-southeast-1");
    }
}
