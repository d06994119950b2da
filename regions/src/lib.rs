//! The regions' topology: which regions exist, which one holds the primary, how many Redis
//! shards each runs and which replica serves its reads.
#![forbid(unsafe_code)]

use model::RegionName;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub name: RegionName,
    /// Does this region hold the PostgreSQL primary (the others hold streaming replicas)?
    pub primary: bool,
    /// How many Redis shards its ingest spreads votes over.
    pub shards: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("the topology has no regions")]
    Empty,
    #[error("exactly one region must hold the primary, found {0}")]
    PrimaryCount(usize),
    #[error("region {0} is listed twice")]
    Duplicate(String),
    #[error("region {0} has no Redis shards")]
    NoShards(String),
}

impl Topology {
    /// The three regions of the brief: us-east-1 with the primary and two shards, the others one each.
    pub fn standard() -> Self {
        let region = |name: &str, primary, shards| Region {
            name: RegionName::new(name).expect("static region name"),
            primary,
            shards,
        };
        Topology {
            regions: vec![
                region("us-east-1", true, 2),
                region("eu-west-1", false, 1),
                region("ap-southeast-1", false, 1),
            ],
        }
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        if self.regions.is_empty() {
            return Err(TopologyError::Empty);
        }
        let primaries = self.regions.iter().filter(|r| r.primary).count();
        if primaries != 1 {
            return Err(TopologyError::PrimaryCount(primaries));
        }
        for (i, r) in self.regions.iter().enumerate() {
            if self.regions[..i].iter().any(|o| o.name == r.name) {
                return Err(TopologyError::Duplicate(r.name.to_string()));
            }
            if r.shards == 0 {
                return Err(TopologyError::NoShards(r.name.to_string()));
            }
        }
        Ok(())
    }

    pub fn primary(&self) -> &Region {
        self.regions
            .iter()
            .find(|r| r.primary)
            .expect("validated topology has a primary")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_topology_is_valid() {
        let t = Topology::standard();
        t.validate().unwrap();
        assert_eq!(t.primary().name.as_str(), "us-east-1");
        assert!(t.primary().shards >= 2);
    }

    #[test]
    fn invalid_topologies_say_why() {
        let mut t = Topology::standard();
        t.regions[1].primary = true;
        assert_eq!(t.validate(), Err(TopologyError::PrimaryCount(2)));
        let mut t = Topology::standard();
        t.regions[2].name = t.regions[1].name.clone();
        assert_eq!(
            t.validate(),
            Err(TopologyError::Duplicate("eu-west-1".into()))
        );
        let mut t = Topology::standard();
        t.regions[0].shards = 0;
        assert_eq!(
            t.validate(),
            Err(TopologyError::NoShards("us-east-1".into()))
        );
        assert_eq!(
            Topology { regions: vec![] }.validate(),
            Err(TopologyError::Empty)
        );
    }
}
