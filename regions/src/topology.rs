//! The topology as data: `zone.toml` and one `<region>.toml` per region, loaded and validated
//! as a whole, so a mistake in one file is reported before anything acts on any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use model::RegionName;
use serde::{Deserialize, Serialize};

/// Route53's continent codes.
pub const CONTINENTS: [&str; 7] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA"];
/// The file in a topology directory that describes the zone; every other `*.toml` is a region.
pub const ZONE_FILE: &str = "zone.toml";

/// The topology this repository ships (`regions/*.toml`), built into the binary.
const STANDARD: [(&str, &str); 4] = [
    (ZONE_FILE, include_str!("../topology/zone.toml")),
    ("us-east-1.toml", include_str!("../topology/us-east-1.toml")),
    ("eu-west-1.toml", include_str!("../topology/eu-west-1.toml")),
    (
        "ap-southeast-1.toml",
        include_str!("../topology/ap-southeast-1.toml"),
    ),
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    pub zone: String,
    /// The label voters resolve under the zone (`vote` -> `vote.<zone>`).
    pub vote: String,
    pub ttl: u32,
    pub health_check: HealthCheckSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSettings {
    pub path: String,
    pub port: u16,
    pub interval_seconds: u32,
    pub failure_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub name: RegionName,
    /// Does this region hold the PostgreSQL primary (the others hold streaming replicas)?
    pub primary: bool,
    /// Does it answer locations no geolocation record matches?
    #[serde(default)]
    pub default: bool,
    /// Route53 continent codes whose voters it serves.
    #[serde(default)]
    pub continents: Vec<String>,
    /// ISO 3166-1 alpha-2 country codes it serves, overriding their continent's region.
    #[serde(default)]
    pub countries: Vec<String>,
    /// How many Redis shards its ingest spreads votes over.
    pub shards: u32,
    /// Where its voters go while it is unhealthy, first choice first.
    #[serde(default)]
    pub failover: Vec<RegionName>,
    pub endpoints: Endpoints,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    /// The host name of its ingest load balancer; its health check probes this.
    pub ingest: String,
    pub results: String,
    pub postgres: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub zone: Zone,
    pub regions: Vec<Region>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{0} has no {ZONE_FILE}")]
    NoZone(PathBuf),
    #[error("the topology has no regions")]
    Empty,
    #[error("exactly one region must hold the primary, found {0}")]
    PrimaryCount(usize),
    #[error("exactly one region must be the default, found {0}")]
    DefaultCount(usize),
    #[error("region {0} is listed twice")]
    Duplicate(String),
    #[error("region {region} is in {file}: a region's file is named after it")]
    FileName { region: String, file: String },
    #[error("region {0} has no Redis shards")]
    NoShards(String),
    #[error("region {0} serves nobody: no continents, no countries and not the default")]
    ServesNobody(String),
    #[error("{kind} {code} in region {region} is not a Route53 {kind} code")]
    BadLocation {
        kind: &'static str,
        code: String,
        region: String,
    },
    #[error("{kind} {code} is served twice: by {first} and by {second}")]
    ServedTwice {
        kind: &'static str,
        code: String,
        first: String,
        second: String,
    },
    #[error("region {region} fails over to {target}, which is not a region")]
    UnknownFailover { region: String, target: String },
    #[error("failover cycle: {0}")]
    FailoverCycle(String),
    #[error("region {0} has no failover target: its voters would have nowhere to go")]
    NoFailover(String),
    #[error("{field} {value:?} is not valid: {reason}")]
    BadSetting {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Topology {
    /// The three regions of the brief, as this repository's `regions/*.toml` describe them.
    pub fn standard() -> Self {
        let files = STANDARD
            .iter()
            .map(|(name, text)| (PathBuf::from(name), text.to_string()));
        Self::from_files(files).expect("the shipped topology is valid")
    }

    /// Reads `dir/zone.toml` and every other `dir/*.toml` as a region, and validates the whole.
    pub fn load(dir: &Path) -> Result<Self, TopologyError> {
        let read_err = |path: &Path, e: std::io::Error| TopologyError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| read_err(dir, e))? {
            let path = entry.map_err(|e| read_err(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
                let text = std::fs::read_to_string(&path).map_err(|e| read_err(&path, e))?;
                files.push((path, text));
            }
        }
        if !files.iter().any(|(p, _)| is_zone_file(p)) {
            return Err(TopologyError::NoZone(dir.to_path_buf()));
        }
        Self::from_files(files)
    }

    /// Parses a zone file and region files (path, contents) and validates them together.
    pub fn from_files(
        files: impl IntoIterator<Item = (PathBuf, String)>,
    ) -> Result<Self, TopologyError> {
        let mut zone = None;
        let mut regions = Vec::new();
        let mut files: Vec<(PathBuf, String)> = files.into_iter().collect();
        files.sort();
        for (path, text) in files {
            let parse_err = |e: toml::de::Error| TopologyError::Parse {
                path: path.clone(),
                reason: e.message().to_string(),
            };
            if is_zone_file(&path) {
                zone = Some(toml::from_str::<Zone>(&text).map_err(parse_err)?);
                continue;
            }
            let region: Region = toml::from_str(&text).map_err(parse_err)?;
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            if stem != region.name.as_str() {
                return Err(TopologyError::FileName {
                    region: region.name.to_string(),
                    file: path.display().to_string(),
                });
            }
            regions.push(region);
        }
        let zone = zone.ok_or_else(|| TopologyError::NoZone(PathBuf::from(".")))?;
        let mut topology = Topology { zone, regions };
        topology.validate()?;
        // The primary region first, then the regions it fails over to, in that order: how the
        // stack starts them and how reports list them.
        let order: Vec<RegionName> = std::iter::once(topology.primary().name.clone())
            .chain(topology.primary().failover.iter().cloned())
            .collect();
        topology.regions.sort_by_key(|r| {
            (
                order
                    .iter()
                    .position(|n| *n == r.name)
                    .unwrap_or(order.len()),
                r.name.clone(),
            )
        });
        Ok(topology)
    }

    pub fn validate(&self) -> Result<(), TopologyError> {
        self.zone.validate()?;
        if self.regions.is_empty() {
            return Err(TopologyError::Empty);
        }
        let primaries = self.regions.iter().filter(|r| r.primary).count();
        if primaries != 1 {
            return Err(TopologyError::PrimaryCount(primaries));
        }
        let defaults = self.regions.iter().filter(|r| r.default).count();
        if defaults != 1 {
            return Err(TopologyError::DefaultCount(defaults));
        }
        let mut served: BTreeMap<(&'static str, &str), &str> = BTreeMap::new();
        for (i, r) in self.regions.iter().enumerate() {
            let name = r.name.as_str();
            if self.regions[..i].iter().any(|o| o.name == r.name) {
                return Err(TopologyError::Duplicate(name.into()));
            }
            if r.shards == 0 {
                return Err(TopologyError::NoShards(name.into()));
            }
            if r.continents.is_empty() && r.countries.is_empty() && !r.default {
                return Err(TopologyError::ServesNobody(name.into()));
            }
            let locations = r.continents.iter().map(|c| ("continent", c));
            let locations = locations.chain(r.countries.iter().map(|c| ("country", c)));
            for (kind, code) in locations {
                let valid = match kind {
                    "continent" => CONTINENTS.contains(&code.as_str()),
                    _ => code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()),
                };
                if !valid {
                    return Err(TopologyError::BadLocation {
                        kind,
                        code: code.clone(),
                        region: name.into(),
                    });
                }
                if let Some(first) = served.insert((kind, code), name) {
                    return Err(TopologyError::ServedTwice {
                        kind,
                        code: code.clone(),
                        first: first.into(),
                        second: name.into(),
                    });
                }
            }
        }
        for r in &self.regions {
            let mut path = vec![r.name.as_str()];
            for target in &r.failover {
                if self.region(target.as_str()).is_none() {
                    return Err(TopologyError::UnknownFailover {
                        region: r.name.to_string(),
                        target: target.to_string(),
                    });
                }
                // A region in its own failover order, directly or twice over, would send its
                // voters round in a circle of CNAMEs once every region in it is unhealthy.
                let repeat = path.contains(&target.as_str());
                path.push(target.as_str());
                if repeat {
                    return Err(TopologyError::FailoverCycle(path.join(" -> ")));
                }
            }
            if r.failover.is_empty() && self.regions.len() > 1 {
                return Err(TopologyError::NoFailover(r.name.to_string()));
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

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name.as_str() == name)
    }

    /// The region whose ingest endpoint is `host`.
    pub fn region_of_endpoint(&self, host: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.endpoints.ingest == host)
    }
}

impl Zone {
    fn validate(&self) -> Result<(), TopologyError> {
        let bad = |field, value: &dyn ToString, reason| {
            Err(TopologyError::BadSetting {
                field,
                value: value.to_string(),
                reason,
            })
        };
        let is_dns_name = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        if !is_dns_name(self.zone.trim_end_matches('.')) {
            return bad("zone", &self.zone, "not a DNS name");
        }
        if !is_dns_name(&self.vote) || self.vote.contains('.') {
            return bad("vote", &self.vote, "not one DNS label");
        }
        if ![10, 30].contains(&self.health_check.interval_seconds) {
            return bad(
                "health_check.interval_seconds",
                &self.health_check.interval_seconds,
                "Route53 probes every 10 or 30 seconds",
            );
        }
        if !(1..=10).contains(&self.health_check.failure_threshold) {
            return bad(
                "health_check.failure_threshold",
                &self.health_check.failure_threshold,
                "Route53 accepts 1 to 10",
            );
        }
        if !self.health_check.path.starts_with('/') {
            return bad(
                "health_check.path",
                &self.health_check.path,
                "must start with /",
            );
        }
        Ok(())
    }

    /// The zone's name without the trailing dot.
    pub fn name(&self) -> &str {
        self.zone.trim_end_matches('.')
    }

    /// The name voters resolve.
    pub fn vote_name(&self) -> String {
        format!("{}.{}", self.vote, self.name())
    }
}

fn is_zone_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == ZONE_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standard_files() -> Vec<(PathBuf, String)> {
        STANDARD
            .iter()
            .map(|(n, t)| (PathBuf::from(n), t.to_string()))
            .collect()
    }

    fn with_region(edit: impl Fn(&mut toml::Table)) -> Result<Topology, TopologyError> {
        let mut files = standard_files();
        let (_, text) = files
            .iter_mut()
            .find(|(p, _)| p.as_os_str() == "eu-west-1.toml")
            .unwrap();
        let mut table: toml::Table = toml::from_str(text).unwrap();
        edit(&mut table);
        *text = toml::to_string(&table).unwrap();
        Topology::from_files(files)
    }

    fn strings(v: &[&str]) -> toml::Value {
        toml::Value::Array(
            v.iter()
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        )
    }

    #[test]
    fn the_shipped_topology_is_valid_and_the_files_on_disk_are_it() {
        let t = Topology::standard();
        assert_eq!(t.primary().name.as_str(), "us-east-1");
        let names: Vec<&str> = t.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["us-east-1", "eu-west-1", "ap-southeast-1"]);
        assert_eq!(t.regions.len(), 3);
        assert!(t.primary().shards >= 2);
        let on_disk =
            Topology::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("topology")).unwrap();
        assert_eq!(on_disk, t);
    }

    #[test]
    fn each_mistake_is_named() {
        let err = |e: Result<Topology, TopologyError>| e.unwrap_err().to_string();
        assert_eq!(
            err(with_region(|t| {
                t.insert("continents".into(), strings(&[]));
            })),
            "region eu-west-1 serves nobody: no continents, no countries and not the default"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("continents".into(), strings(&["EU", "NA"]));
            })),
            "continent NA is served twice: by eu-west-1 and by us-east-1"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("countries".into(), strings(&["de", "FR"]));
            })),
            "country de in region eu-west-1 is not a Route53 country code"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("failover".into(), strings(&["us-east-1", "eu-west-1"]));
            })),
            "failover cycle: eu-west-1 -> us-east-1 -> eu-west-1"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("failover".into(), strings(&["us-east-2"]));
            })),
            "region eu-west-1 fails over to us-east-2, which is not a region"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("failover".into(), strings(&[]));
            })),
            "region eu-west-1 has no failover target: its voters would have nowhere to go"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("primary".into(), toml::Value::Boolean(true));
            })),
            "exactly one region must hold the primary, found 2"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("default".into(), toml::Value::Boolean(true));
            })),
            "exactly one region must be the default, found 2"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("shards".into(), toml::Value::Integer(0));
            })),
            "region eu-west-1 has no Redis shards"
        );
        assert_eq!(
            err(with_region(|t| {
                t.insert("name".into(), toml::Value::String("eu-west-2".into()));
            })),
            "region eu-west-2 is in eu-west-1.toml: a region's file is named after it"
        );
        let e = err(with_region(|t| {
            t.insert("shard".into(), toml::Value::Integer(1));
        }));
        assert!(
            e.starts_with("eu-west-1.toml: unknown field `shard`"),
            "{e}"
        );
    }

    #[test]
    fn zone_settings_are_checked() {
        let mut t = Topology::standard();
        t.zone.health_check.interval_seconds = 5;
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "health_check.interval_seconds \"5\" is not valid: Route53 probes every 10 or 30 seconds"
        );
        let mut t = Topology::standard();
        t.zone.zone = "bad zone".into();
        assert!(t.validate().is_err());
    }

    #[test]
    fn a_directory_without_a_zone_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("tally-topology-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("us-east-1.toml"), STANDARD[1].1).unwrap();
        let e = Topology::load(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(e, TopologyError::NoZone(dir));
    }
}
