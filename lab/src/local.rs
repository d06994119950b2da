//! `tally local up|status|down`: three regions on this machine from the installed servers. A
//! PostgreSQL primary in the primary region and a streaming replica in each other one, Redis
//! shards per region, and ingest, aggregator and reader processes per region. Everything lives in
//! one directory; ports are chosen once and kept in its `stack.json`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use regions::Topology;
use serde::{Deserialize, Serialize};
use servers::{free_port, pid_alive, Fsync, Moto, PgBin, Postgres, Prometheus, Redis, StopMode};

/// The polls the stack creates and a load votes in, with how popular each is; options within a poll are skewed too
/// (the first twice as popular as the second, three times the third, ...).
pub const POLLS: &[(&str, &[&str], f64)] = &[
    ("default", &["a", "b"], 0.6),
    (
        "song-contest",
        &["norway", "sweden", "italy", "spain", "ukraine"],
        0.3,
    ),
    ("best-host", &["ana", "ben", "chloe"], 0.1),
];

const STATE_FILE: &str = "stack.json";
/// How long a role process gets to answer `/readyz` after it starts.
const ROLE_READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a port a dead process held may take to come free.
const PORT_RELEASED_WITHIN: Duration = Duration::from_secs(3);
/// How long a role process gets to exit after SIGTERM before it is killed.
const ROLE_STOP_WITHIN: Duration = Duration::from_secs(30);
pub const ROLES: [&str; 3] = ["ingest", "aggregator", "reader"];
/// The clusters' alert rules (a PrometheusRule); the local Prometheus evaluates the same ones.
const PROMETHEUS_RULE: &str = include_str!("../../k8s/base/observe/prometheus-rule.yaml");

/// The rule file inside a PrometheusRule: its `spec`, one indentation level out.
fn rule_file(prometheus_rule: &str) -> String {
    let mut lines = prometheus_rule.lines().skip_while(|l| *l != "spec:");
    lines.next();
    lines
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// The stack's directory: `--dir`, else `$TALLY_DIR`, else the user's data dir. As root that is
/// `/var/lib/tally`, because PostgreSQL runs as the `postgres` user and cannot enter `/root`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TALLY_DIR") {
        return PathBuf::from(d);
    }
    if servers::running_as_root() {
        return PathBuf::from("/var/lib/tally/local");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("tally/local")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stack {
    pub dir: PathBuf,
    pub regions: Vec<RegionPorts>,
    /// Prometheus's port (it runs when Prometheus is installed).
    #[serde(default = "free_port")]
    pub prometheus: u16,
    /// `tally replication`'s port: one watcher for all regions' servers.
    #[serde(default = "free_port")]
    pub replication: u16,
    /// moto's port: the local Route53 (it runs when moto is installed).
    #[serde(default = "free_port")]
    pub moto: u16,
    /// `tally wan`'s control port.
    #[serde(default = "free_port")]
    pub wan: u16,
    /// `tally idp`'s port: the identity provider whose key set ingest verifies voters' tokens with.
    #[serde(default = "free_port")]
    pub idp: u16,
    /// One-way delay on every link between regions, in milliseconds.
    #[serde(default)]
    pub wan_ms: u64,
    /// Every cross-region connection goes through one of these (empty on stacks made before
    /// links existed: those connect directly).
    #[serde(default)]
    pub links: Vec<WanLink>,
    /// Redis Sentinels watching every shard and failing it over to its replica (empty on stacks
    /// made before replicas: their shards are single servers, reached directly).
    #[serde(default)]
    pub sentinels: Vec<u16>,
}

/// Region `from`'s way to region `to`'s PostgreSQL server: `tally wan` listens on `port`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WanLink {
    pub from: String,
    pub to: String,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegionPorts {
    pub name: String,
    /// Did the stack start with this region's server as the primary? After a failover the
    /// primary is elsewhere: [`Stack::primary`] says where.
    pub primary: bool,
    pub postgres: u16,
    /// Each shard's first primary, in shard order (Sentinel may have promoted its replica since:
    /// [`Stack::shard_primary`] says which serves now).
    pub redis: Vec<u16>,
    /// Each shard's replicas, in shard order.
    #[serde(default)]
    pub redis_replicas: Vec<Vec<u16>>,
    pub ingest: u16,
    pub aggregator: u16,
    pub reader: u16,
    /// The region's further aggregators, worker 1 onwards (`tally local up --aggregators N`).
    #[serde(default)]
    pub more_aggregators: Vec<u16>,
}

impl RegionPorts {
    pub fn role_port(&self, role: &str) -> u16 {
        match role {
            "ingest" => self.ingest,
            "aggregator" => self.aggregator,
            "reader" => self.reader,
            _ => aggregator_worker(role)
                .and_then(|k| self.more_aggregators.get(k - 1).copied())
                .unwrap_or(self.reader),
        }
    }

    /// Every role process of the region, by the name its pid and log files carry: the three
    /// roles, then the further aggregators (`aggregator-1`, ...).
    pub fn processes(&self) -> Vec<String> {
        ROLES
            .iter()
            .map(|r| r.to_string())
            .chain((1..=self.more_aggregators.len()).map(aggregator_name))
            .collect()
    }

    /// Aggregators the region runs.
    pub fn aggregators(&self) -> usize {
        1 + self.more_aggregators.len()
    }
}

/// The process name of a region's aggregator `k` (0 is `aggregator`, as before there were more).
pub fn aggregator_name(k: usize) -> String {
    match k {
        0 => "aggregator".into(),
        k => format!("aggregator-{k}"),
    }
}

/// Which aggregator a process name is, if it is one.
fn aggregator_worker(name: &str) -> Option<usize> {
    match name {
        "aggregator" => Some(0),
        _ => name.strip_prefix("aggregator-")?.parse().ok(),
    }
}

/// The subcommand that runs a process of the stack.
fn command_of(name: &str) -> &str {
    if aggregator_worker(name).is_some() {
        "aggregator"
    } else {
        name
    }
}

impl Stack {
    pub fn load(dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = dir.join(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                Ok(Some(serde_json::from_str(&text).with_context(|| {
                    format!("{} is damaged", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// The stack in `dir`, or an error saying to run `tally local up` first.
    pub fn require(dir: &Path) -> anyhow::Result<Self> {
        Self::load(dir)?.with_context(|| {
            format!(
                "no local stack in {}; run `tally local up` first",
                dir.display()
            )
        })
    }

    fn plan(dir: &Path, topology: &Topology) -> Self {
        // Ports are drawn at random; none may be drawn twice within one stack.
        let mut taken = std::collections::HashSet::new();
        let mut port = || loop {
            let p = free_port();
            if taken.insert(p) {
                return p;
            }
        };
        let regions = topology
            .regions
            .iter()
            .map(|r| RegionPorts {
                name: r.name.to_string(),
                primary: r.primary,
                postgres: port(),
                redis: (0..r.shards).map(|_| port()).collect(),
                redis_replicas: (0..r.shards)
                    .map(|_| (0..REPLICAS_PER_SHARD).map(|_| port()).collect())
                    .collect(),
                ingest: port(),
                aggregator: port(),
                reader: port(),
                more_aggregators: Vec::new(),
            })
            .collect::<Vec<RegionPorts>>();
        let mut links = Vec::new();
        for from in &regions {
            for to in regions.iter().filter(|to| to.name != from.name) {
                links.push(WanLink {
                    from: from.name.clone(),
                    to: to.name.clone(),
                    port: port(),
                });
            }
        }
        Stack {
            dir: dir.to_path_buf(),
            regions,
            prometheus: port(),
            replication: port(),
            moto: port(),
            wan: port(),
            idp: port(),
            wan_ms: 0,
            links,
            sentinels: (0..SENTINELS).map(|_| port()).collect(),
        }
    }

    /// Every port the stack has chosen.
    fn ports(&self) -> Vec<u16> {
        let mut ports = vec![
            self.prometheus,
            self.replication,
            self.moto,
            self.wan,
            self.idp,
        ];
        ports.extend(&self.sentinels);
        ports.extend(self.links.iter().map(|l| l.port));
        for r in &self.regions {
            ports.extend([r.postgres, r.ingest, r.aggregator, r.reader]);
            ports.extend(r.redis.iter().chain(r.redis_replicas.iter().flatten()));
            ports.extend(&r.more_aggregators);
        }
        ports
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = self.dir.join(STATE_FILE);
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The region called `name`, or an error naming the ones there are.
    pub fn region(&self, name: &str) -> anyhow::Result<&RegionPorts> {
        self.regions
            .iter()
            .find(|r| r.name == name)
            .with_context(|| {
                let names: Vec<&str> = self.regions.iter().map(|r| r.name.as_str()).collect();
                format!(
                    "no region {name} in the local stack (it has {})",
                    names.join(", ")
                )
            })
    }

    /// The region whose server is the primary now: the one set up as a primary, not as a
    /// replica (`tally replication` fences a failed primary into a replica before it promotes
    /// another, so there is one), else the one the stack started with.
    pub fn primary(&self) -> &RegionPorts {
        let pg_dir = |r: &RegionPorts| self.dir.join("pg").join(&r.name);
        self.regions
            .iter()
            .find(|r| {
                let dir = pg_dir(r);
                dir.join("PG_VERSION").exists() && !dir.join("standby.signal").exists()
            })
            .or_else(|| self.regions.iter().find(|r| r.primary))
            .expect("a stack has a primary region")
    }

    pub fn moto(&self) -> Moto {
        Moto::new(self.dir.join("moto"), self.moto)
    }

    pub fn prometheus(&self) -> Prometheus {
        Prometheus::new(self.dir.join("prometheus"), self.prometheus)
    }

    /// Scrapes every role of every region each second (the local stack is for watching things
    /// move), and evaluates the alert rules the clusters use.
    fn prometheus_config(&self) -> String {
        let mut out = String::from(
            "# Written by `tally local up`.\nglobal:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - rules.yml\nscrape_configs:\n",
        );
        for (job, port) in [("replication", self.replication), ("wan", self.wan)] {
            out += &format!(
                "  - job_name: tally-{job}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n"
            );
        }
        for role in ROLES {
            out += &format!(
                "  - job_name: tally-{role}\n    honor_labels: true\n    static_configs:\n"
            );
            for r in &self.regions {
                let mut ports = vec![r.role_port(role)];
                if role == "aggregator" {
                    ports.extend(&r.more_aggregators);
                }
                for port in ports {
                    out += &format!(
                        "      - targets: [\"127.0.0.1:{port}\"]\n        labels: {{region: {}}}\n",
                        r.name
                    );
                }
            }
        }
        out
    }

    pub fn postgres(&self, bin: &PgBin, r: &RegionPorts) -> Postgres {
        Postgres::new(bin.clone(), self.dir.join("pg").join(&r.name), r.postgres)
    }

    /// Every Redis server of a region: each shard's first primary, then each shard's replica.
    pub fn redis(&self, r: &RegionPorts, fsync: Fsync) -> Vec<Redis> {
        (0..r.redis.len())
            .flat_map(|i| self.shard_servers(r, i, fsync))
            .collect()
    }

    /// Shard `i`'s servers: its first primary, then its replicas (on stacks made with them).
    pub fn shard_servers(&self, r: &RegionPorts, i: usize, fsync: Fsync) -> Vec<Redis> {
        let dir = self.dir.join("redis");
        let primary = Redis {
            fsync,
            ..Redis::new(dir.join(format!("{}-{i}", r.name)), r.redis[i])
        };
        let replicas = r.redis_replicas.get(i).into_iter().flatten();
        std::iter::once(primary)
            .chain(replicas.enumerate().map(|(k, &port)| {
                Redis {
                    fsync,
                    ..Redis::new(dir.join(format!("{}-{i}-replica-{k}", r.name)), port)
                }
                .replica_of(r.redis[i])
            }))
            .collect()
    }

    /// The name Sentinel knows shard `i` of region `r` by.
    pub fn shard_name(r: &RegionPorts, i: usize) -> String {
        format!("{}-{i}", r.name)
    }

    pub fn sentinels(&self) -> Vec<servers::Sentinel> {
        let shards: Vec<(String, u16)> = self
            .regions
            .iter()
            .flat_map(|r| (0..r.redis.len()).map(move |i| (Self::shard_name(r, i), r.redis[i])))
            .collect();
        self.sentinels
            .iter()
            .enumerate()
            .map(|(k, &port)| servers::Sentinel {
                dir: self.dir.join("redis").join(format!("sentinel-{k}")),
                port,
                shards: shards.clone(),
                quorum: SENTINELS / 2 + 1,
                down_after: SENTINEL_DOWN_AFTER,
            })
            .collect()
    }

    /// The port of shard `i`'s primary now: the one the sentinels name, else its first.
    pub fn shard_primary(&self, r: &RegionPorts, i: usize) -> u16 {
        let name = Self::shard_name(r, i);
        self.sentinels()
            .iter()
            .find_map(|s| s.primary_port(&name))
            .unwrap_or(r.redis[i])
    }

    /// Direct URLs of the region's shards' primaries now, for the operator's tools.
    pub fn primary_redis_urls(&self, r: &RegionPorts) -> Vec<String> {
        (0..r.redis.len())
            .map(|i| Self::redis_url(self.shard_primary(r, i)))
            .collect()
    }

    /// The URL a role reaches shard `i` by: through the sentinels when the stack has them, so a
    /// failover is followed; else the server itself.
    fn role_redis_url(&self, r: &RegionPorts, i: usize) -> String {
        if self.sentinels.is_empty() {
            return Self::redis_url(r.redis[i]);
        }
        let sentinels: Vec<String> = self
            .sentinels
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!(
            "sentinel://{}/{}",
            sentinels.join(","),
            Self::shard_name(r, i)
        )
    }

    /// The port region `from` reaches `to`'s server on: its own region's directly, another's
    /// through the link between them.
    pub fn pg_port(&self, from: &str, to: &RegionPorts) -> u16 {
        self.links
            .iter()
            .find(|l| l.from == from && l.to == to.name)
            .map_or(to.postgres, |l| l.port)
    }

    fn pg_url(port: u16, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{port}/{}", db::DATABASE)
    }

    /// A Redis shard of the stack, by its port.
    pub fn redis_url(port: u16) -> String {
        format!("redis://127.0.0.1:{port}/")
    }

    /// The superuser URL of the primary's database: every server, whichever takes writes.
    pub fn primary_url(&self) -> String {
        self.writer_url(servers::SUPERUSER)
    }

    /// The superuser URL of one region's server.
    pub fn server_url(&self, r: &RegionPorts) -> String {
        Self::pg_url(r.postgres, servers::SUPERUSER)
    }

    /// Every region's server with `target_session_attrs=read-write`: whichever is primary.
    pub fn writer_url(&self, user: &str) -> String {
        self.writer_url_from(None, user)
    }

    /// [`Stack::writer_url`] as seen from inside region `from` (other regions' servers through
    /// the links), or from outside every region (the operator's tools: directly).
    fn writer_url_from(&self, from: Option<&str>, user: &str) -> String {
        let ports: Vec<String> = self
            .regions
            .iter()
            .map(|r| match from {
                Some(from) => self.pg_port(from, r),
                None => r.postgres,
            })
            .map(|p| p.to_string())
            .collect();
        let hosts = vec!["127.0.0.1"; ports.len()].join(",");
        format!(
            "host={hosts} port={} user={user} dbname={} target_session_attrs=read-write",
            ports.join(","),
            db::DATABASE
        )
    }

    /// A reader's sources: its own region's server, the other replicas, the primary last.
    fn reader_sources(&self, region: &RegionPorts) -> String {
        let primary = self.primary();
        let mut order: Vec<&RegionPorts> = vec![region];
        order.extend(
            self.regions
                .iter()
                .filter(|r| r.name != region.name && r.name != primary.name),
        );
        if region.name != primary.name {
            order.push(primary);
        }
        order
            .iter()
            .map(|r| {
                let port = self.pg_port(&region.name, r);
                format!("{}={}", r.name, Self::pg_url(port, db::READER_ROLE))
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn role_env(&self, r: &RegionPorts, role: &str) -> Vec<(&'static str, String)> {
        use aggregator::config::{ENV_LEASE_MS, ENV_WORKER_ID};
        use ingest::config::{
            ENV_IP_RATE, ENV_JWKS_UNKNOWN_KEY_REFETCH_S, ENV_JWKS_URL, ENV_JWT_AUDIENCE,
            ENV_JWT_ISSUER, ENV_POSTGRES_URL, ENV_REDIS_URLS, ENV_WAIT_REPLICAS,
        };
        use reader::config::ENV_POSTGRES_SOURCES;
        use web::{ENV_LISTEN, ENV_REGION};
        let redis = (0..r.redis.len())
            .map(|i| self.role_redis_url(r, i))
            .collect::<Vec<_>>()
            .join(",");
        let mut env = vec![
            (ENV_LISTEN, format!("127.0.0.1:{}", r.role_port(role))),
            (ENV_REGION, r.name.clone()),
        ];
        match role {
            "ingest" => {
                env.push((ENV_REDIS_URLS, redis));
                env.push((ENV_POSTGRES_URL, Self::pg_url(r.postgres, db::INGEST_ROLE)));
                // Simulated voters on one machine share one address; the per-voter limit still applies.
                env.push((ENV_IP_RATE, "0".into()));
                // Voters are who the local identity provider's tokens say, as in production.
                env.push((ENV_JWKS_URL, self.jwks_url()));
                env.push((ENV_JWT_ISSUER, harness::idp::LOCAL_ISSUER.into()));
                env.push((ENV_JWT_AUDIENCE, harness::idp::LOCAL_AUDIENCE.into()));
                // A key added to the local provider is taken at once.
                env.push((ENV_JWKS_UNKNOWN_KEY_REFETCH_S, "1".into()));
                // A vote is acknowledged once its shard's replica has it too.
                if !r.redis_replicas.is_empty() {
                    env.push((ENV_WAIT_REPLICAS, WAIT_REPLICAS.to_string()));
                }
            }
            "reader" => env.push((ENV_POSTGRES_SOURCES, self.reader_sources(r))),
            aggregator => {
                let k = aggregator_worker(aggregator).unwrap_or(0);
                env.push((ENV_REDIS_URLS, redis));
                env.push((
                    ENV_POSTGRES_URL,
                    self.writer_url_from(Some(&r.name), db::AGGREGATOR_ROLE),
                ));
                env.push((ENV_WORKER_ID, format!("{}-{k}", r.name)));
                env.push((ENV_LEASE_MS, LOCAL_LEASE.as_millis().to_string()));
                // Replication is asynchronous: a batch leaves Redis once a replica replayed it.
                env.push((aggregator::config::ENV_WAIT_REPLICAS, "1".into()));
            }
        }
        env
    }

    /// `tally replication`'s settings: every region's server, and where its data lives so a
    /// failed primary can be fenced.
    fn replication_env(&self) -> Vec<(&'static str, String)> {
        use replication::watch::{ENV_DATA_DIRS, ENV_POSTGRES_SERVERS, ENV_REPLICA_ROUTES};
        use web::ENV_LISTEN;
        let each = |f: &dyn Fn(&RegionPorts) -> String| {
            self.regions
                .iter()
                .map(|r| format!("{}={}", r.name, f(r)))
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            (ENV_LISTEN, format!("127.0.0.1:{}", self.replication)),
            (ENV_POSTGRES_SERVERS, each(&|r| self.server_url(r))),
            (
                ENV_DATA_DIRS,
                each(&|r| self.dir.join("pg").join(&r.name).display().to_string()),
            ),
            (
                ENV_REPLICA_ROUTES,
                self.links
                    .iter()
                    .map(|l| format!("{}>{}=127.0.0.1:{}", l.from, l.to, l.port))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]
    }

    /// `tally wan`'s settings: a link per ordered pair of regions, to the server of the second.
    fn wan_env(&self) -> Vec<(&'static str, String)> {
        use wan::{ENV_WAN_DELAY_MS, ENV_WAN_LINKS};
        use web::ENV_LISTEN;
        let links = self
            .links
            .iter()
            .filter_map(|l| {
                let to = self.regions.iter().find(|r| r.name == l.to)?;
                Some(format!(
                    "{}>{}@127.0.0.1:{}=127.0.0.1:{}",
                    l.from, l.to, l.port, to.postgres
                ))
            })
            .collect::<Vec<_>>()
            .join(",");
        vec![
            (ENV_LISTEN, format!("127.0.0.1:{}", self.wan)),
            (ENV_WAN_LINKS, links),
            (ENV_WAN_DELAY_MS, self.wan_ms.to_string()),
        ]
    }

    /// The local identity provider's key directory: one file a signing key.
    pub fn idp_dir(&self) -> PathBuf {
        self.dir.join("idp")
    }

    /// Where ingest fetches the identity provider's key set.
    pub fn jwks_url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.idp)
    }

    /// Tokens for simulated voters, signed by the provider's current key.
    pub fn tokens(&self) -> anyhow::Result<crate::idp::Tokens> {
        Ok(crate::idp::Tokens::new(crate::idp::signing_key(
            &self.idp_dir(),
        )?))
    }

    fn idp_env(&self) -> Vec<(&'static str, String)> {
        vec![
            (web::ENV_LISTEN, format!("127.0.0.1:{}", self.idp)),
            (
                crate::idp::ENV_IDP_KEYS,
                self.idp_dir().display().to_string(),
            ),
        ]
    }

    /// Sets the running `tally wan`'s delay to the stack's.
    fn apply_wan_delay(&self) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.wan);
        match servers::http_call(&addr, "POST", &format!("/delay?ms={}", self.wan_ms)) {
            Some(200) => Ok(()),
            other => bail!("tally wan on {addr} did not take the delay (answer: {other:?})"),
        }
    }

    fn pidfile(&self, region: &str, role: &str) -> PathBuf {
        self.dir.join("run").join(format!("{region}-{role}.pid"))
    }

    fn logfile(&self, region: &str, role: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{region}-{role}.log"))
    }

    pub fn role_pid(&self, region: &str, role: &str) -> Option<u32> {
        servers::read_pid(&self.pidfile(region, role))
    }

    pub fn role_running(&self, region: &str, role: &str) -> bool {
        self.role_pid(region, role).is_some_and(pid_alive)
    }
}

/// How `tally local up` brings the stack up.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// For the Redis servers this call starts.
    pub fsync: Fsync,
    /// Becomes the delay between regions: kept for later runs, applied at once to a running
    /// stack. `None` keeps the stack's.
    pub wan_ms: Option<u64>,
    /// Aggregators per region: kept for later runs; fewer than running stops the extra ones
    /// cleanly (another of the region adopts what they leave). `None` keeps the stack's.
    pub aggregators: Option<usize>,
}

impl Default for UpOptions {
    fn default() -> Self {
        Self {
            fsync: Fsync::Everysec,
            wan_ms: None,
            aggregators: None,
        }
    }
}

/// Redis Sentinels of a stack: three, so a failover needs two to agree, as a managed service's
/// control plane would.
const SENTINELS: usize = 3;
/// Replicas of each shard: two, as in the deployment, so a shard that lost its primary still
/// has a replica for ingest's writes to wait for.
const REPLICAS_PER_SHARD: usize = 2;
/// Replicas each of ingest's writes waits for before its votes are acknowledged.
const WAIT_REPLICAS: usize = 1;
/// How long a primary may not answer before the sentinels think it down.
const SENTINEL_DOWN_AFTER: Duration = Duration::from_millis(1500);
/// The local aggregators' lease: a worker gone for good is noticed within seconds.
const LOCAL_LEASE: Duration = Duration::from_secs(3);

/// Brings the stack up, or whatever part of it is down. Safe to run again.
pub fn up(dir: &Path, options: &UpOptions) -> anyhow::Result<Stack> {
    let (fsync, wan_ms) = (options.fsync, options.wan_ms);
    let topology = Topology::standard();
    topology.validate()?;
    let bin = PgBin::find()?;
    Redis::binary()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    for sub in ["pg", "redis", "run", "logs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    if servers::running_as_root() {
        // The postgres user must be able to reach its directories below ours.
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.as_path(), &dir.join("pg")] {
            let mode = std::fs::metadata(d)?.permissions().mode();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o711))?;
        }
    }
    let mut stack = match Stack::load(&dir)? {
        Some(s) => s,
        None => Stack::plan(&dir, &topology),
    };
    if let Some(ms) = wan_ms {
        wan::delay(ms)?;
        if stack.links.is_empty() && ms > 0 {
            bail!(
                "the stack in {} was made before links between regions existed; \
                 `tally local down` and remove the directory to make one with them",
                dir.display()
            );
        }
        stack.wan_ms = ms;
    }
    let mut retired = Vec::new();
    if let Some(n) = options.aggregators {
        if n == 0 {
            bail!("a region needs at least one aggregator");
        }
        let mut taken: std::collections::HashSet<u16> = stack.ports().into_iter().collect();
        for r in &mut stack.regions {
            while r.aggregators() > n {
                retired.push((r.name.clone(), aggregator_name(r.aggregators() - 1)));
                r.more_aggregators.pop();
            }
            while r.aggregators() < n {
                let port = loop {
                    let p = free_port();
                    if taken.insert(p) {
                        break p;
                    }
                };
                r.more_aggregators.push(port);
            }
        }
    }
    stack.save()?;
    for (region, name) in &retired {
        // A clean stop: it finishes its batches and releases its lease.
        stop_role(&stack, region, name);
    }

    // The links first: every cross-region connection, replication streams included, uses them.
    if !stack.links.is_empty() {
        if stack.role_running(GLOBAL, WAN) {
            stack.apply_wan_delay()?;
        } else {
            start_process(&stack, GLOBAL, WAN, stack.wan_env(), stack.wan)?;
            wait_ready(&stack, GLOBAL, WAN, stack.wan)?;
        }
    }

    // The identity provider before ingest, which will not take a vote until it has its keys.
    crate::idp::ensure_key(&stack.idp_dir())?;
    start_process(&stack, GLOBAL, IDP, stack.idp_env(), stack.idp)?;
    wait_ready(&stack, GLOBAL, IDP, stack.idp)?;

    // The primary first: whichever server is the primary now (after a failover, not the one
    // the stack started with). Replicas that exist start before anything writes, because every
    // commit waits for one of them.
    let primary_region = stack.primary().clone();
    let primary = stack.postgres(&bin, &primary_region);
    primary.init_primary()?;
    primary.start()?;
    for r in stack
        .regions
        .iter()
        .filter(|r| r.name != primary_region.name)
    {
        let server = stack.postgres(&bin, r);
        if !server.is_initialized() {
            continue;
        }
        let marker = replication::fence_marker(&server.data_dir);
        if marker.exists() {
            // A fenced former primary: undo what the new primary never received, then follow it.
            server.stop(StopMode::Immediate)?;
            server
                .rewind(
                    &primary,
                    stack.pg_port(&r.name, &primary_region),
                    &slot_name(&r.name),
                )
                .with_context(|| format!("rejoining {} as a replica", r.name))?;
            std::fs::remove_file(&marker)?;
        }
        server.start()?;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        db::ensure_database(&primary.admin_url(), db::DATABASE).await?;
        let mut client = db::connect(&stack.server_url(&primary_region)).await?;
        db::migrate(&mut client).await?;
        for (id, options, _) in POLLS {
            match db::create_poll(&mut client, &model::Poll::new(id, options)?).await {
                Ok(()) | Err(db::DbError::PollExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::Ok(())
    })
    .context("preparing the database")?;
    for r in stack
        .regions
        .iter()
        .filter(|r| r.name != primary_region.name)
    {
        let replica = stack.postgres(&bin, r);
        let via = stack.pg_port(&r.name, &primary_region);
        replica.init_replica(&primary, via, &slot_name(&r.name))?;
        replica.start()?;
    }
    rt.block_on(async {
        let client = db::connect(&stack.server_url(&primary_region)).await?;
        replication::asynchronous(&client).await?;
        anyhow::Ok(())
    })
    .context("setting replication asynchronous")?;
    for r in &stack.regions {
        for redis in stack.redis(r, fsync) {
            redis.start()?;
        }
    }
    for sentinel in stack.sentinels() {
        sentinel.start()?;
    }
    for r in &stack.regions {
        for name in r.processes() {
            start_role(&stack, r, &name)?;
        }
    }
    start_process(
        &stack,
        GLOBAL,
        REPLICATION,
        stack.replication_env(),
        stack.replication,
    )?;
    for r in &stack.regions {
        for name in r.processes() {
            wait_ready(&stack, &r.name, &name, r.role_port(&name))?;
        }
    }
    wait_ready(&stack, GLOBAL, REPLICATION, stack.replication)?;
    if Moto::binary().is_some() {
        stack.moto().start()?;
    }
    if Prometheus::binary().is_some() {
        let prometheus = stack.prometheus();
        std::fs::create_dir_all(&prometheus.dir)?;
        std::fs::write(prometheus.config_file(), stack.prometheus_config())?;
        std::fs::write(prometheus.dir.join("rules.yml"), rule_file(PROMETHEUS_RULE))?;
        prometheus.start()?;
    }
    Ok(stack)
}

/// The replication slot a region's replica streams through.
pub use replication::slot_name;

/// The pid and log files of processes that serve all regions are named after this.
pub const GLOBAL: &str = "global";
pub const REPLICATION: &str = "replication";
pub const WAN: &str = "wan";
pub const IDP: &str = "idp";

/// Starts a process of the region by its name (a role, or `aggregator-K`).
pub fn start_role(stack: &Stack, r: &RegionPorts, role: &str) -> anyhow::Result<()> {
    start_role_with(stack, r, role, Vec::new())
}

/// Starts a role with settings of its own on top of the stack's.
pub fn start_role_with(
    stack: &Stack,
    r: &RegionPorts,
    role: &str,
    extra: Vec<(&'static str, String)>,
) -> anyhow::Result<()> {
    let mut env = stack.role_env(r, role);
    env.extend(extra);
    start_process(stack, &r.name, role, env, r.role_port(role))
}

fn start_process(
    stack: &Stack,
    region: &str,
    role: &str,
    env: Vec<(&'static str, String)>,
    port: u16,
) -> anyhow::Result<()> {
    if let Some(pid) = stack.role_pid(region, role).filter(|&pid| pid_alive(pid)) {
        // One that `tally bad-input` paused and could not continue (killed outright) would
        // otherwise stay stopped for good.
        if servers::process_state(pid) == Some('T') {
            servers::signal(pid, "CONT");
        }
        return Ok(());
    }
    // A process just killed shows as a zombie once its main thread is gone, but its other
    // threads may hold its sockets a moment longer.
    let start = Instant::now();
    while !servers::port_is_free(port) {
        if start.elapsed() > PORT_RELEASED_WITHIN {
            bail!("port {port} for {region} {role} is already in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(stack.logfile(region, role))?;
    let exe = std::env::current_exe().context("locating the tally binary")?;
    use std::os::unix::process::CommandExt;
    let child = Command::new(exe)
        .arg(command_of(role))
        .envs(env)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C aimed at `tally local up` does not reach it.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {region} {role}"))?;
    std::fs::write(stack.pidfile(region, role), child.id().to_string())?;
    Ok(())
}

pub fn wait_ready(stack: &Stack, region: &str, role: &str, port: u16) -> anyhow::Result<()> {
    wait_answering(stack, region, role, port, "/readyz")
}

/// Until the process answers at all (`/healthz`), ready or not: one started to refuse, say.
pub fn wait_running(stack: &Stack, region: &str, role: &str, port: u16) -> anyhow::Result<()> {
    wait_answering(stack, region, role, port, "/healthz")
}

fn wait_answering(
    stack: &Stack,
    region: &str,
    role: &str,
    port: u16,
    path: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let url = format!("127.0.0.1:{port}");
    loop {
        if servers::http_status(&url, path) == Some(200) {
            return Ok(());
        }
        if !stack.role_running(region, role) {
            bail!(
                "{region} {role} exited during start-up: {}",
                last_line(&stack.logfile(region, role))
            );
        }
        if start.elapsed() > ROLE_READY_WITHIN {
            bail!(
                "{region} {role} was not ready within {}s: {}",
                ROLE_READY_WITHIN.as_secs(),
                last_line(&stack.logfile(region, role))
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(no log)".into())
}

/// Stops every process of the stack: ingest first (nothing new is acknowledged), aggregators
/// next (they finish their batches), then readers, Redis (its append-only file keeps any queued
/// votes for the next `up`), the replicas and the primary.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(stack) = Stack::load(dir)? else {
        return Ok(());
    };
    stack.prometheus().stop();
    stack.moto().stop();
    // The watchers first: servers stopping one by one must not look like failed primaries.
    stop_role(&stack, GLOBAL, REPLICATION);
    for sentinel in stack.sentinels() {
        sentinel.stop();
    }
    for role in ROLES {
        for r in &stack.regions {
            stop_role(&stack, &r.name, role);
            if role == "aggregator" {
                for k in 1..r.aggregators() {
                    stop_role(&stack, &r.name, &aggregator_name(k));
                }
            }
        }
    }
    for r in &stack.regions {
        for redis in stack.redis(r, Fsync::Everysec) {
            redis.stop()?;
        }
    }
    let bin = PgBin::find()?;
    let primary = stack.primary().name.clone();
    for r in stack.regions.iter().filter(|r| r.name != primary) {
        stack.postgres(&bin, r).stop(StopMode::Fast)?;
    }
    stack.postgres(&bin, stack.primary()).stop(StopMode::Fast)?;
    stop_role(&stack, GLOBAL, WAN);
    stop_role(&stack, GLOBAL, IDP);
    Ok(())
}

/// One more aggregator in `region`, started and ready; kept in the stack's file until
/// [`remove_aggregator`].
pub fn add_aggregator(dir: &Path, region: &str) -> anyhow::Result<Stack> {
    let mut stack = Stack::require(dir)?;
    let mut taken: std::collections::HashSet<u16> = stack.ports().into_iter().collect();
    let port = loop {
        let p = free_port();
        if taken.insert(p) {
            break p;
        }
    };
    let i = stack
        .regions
        .iter()
        .position(|r| r.name == region)
        .with_context(|| format!("no region {region} in the local stack"))?;
    stack.regions[i].more_aggregators.push(port);
    stack.save()?;
    let r = stack.regions[i].clone();
    let name = aggregator_name(r.aggregators() - 1);
    start_role(&stack, &r, &name)?;
    wait_ready(&stack, region, &name, port)?;
    Ok(stack)
}

/// Stops `region`'s last aggregator (cleanly, if it still runs) and forgets it.
pub fn remove_aggregator(dir: &Path, region: &str) -> anyhow::Result<()> {
    let mut stack = Stack::require(dir)?;
    let r = stack
        .regions
        .iter_mut()
        .find(|r| r.name == region)
        .with_context(|| format!("no region {region} in the local stack"))?;
    let Some(_) = r.more_aggregators.pop() else {
        return Ok(());
    };
    let name = aggregator_name(r.aggregators());
    stack.save()?;
    stop_role(&stack, region, &name);
    Ok(())
}

pub fn stop_role(stack: &Stack, region: &str, role: &str) {
    let Some(pid) = stack.role_pid(region, role) else {
        return;
    };
    if pid_alive(pid) {
        servers::signal(pid, "TERM");
        let start = Instant::now();
        while pid_alive(pid) && start.elapsed() < ROLE_STOP_WITHIN {
            std::thread::sleep(Duration::from_millis(20));
        }
        if pid_alive(pid) {
            servers::signal(pid, "KILL");
        }
    }
    let _ = std::fs::remove_file(stack.pidfile(region, role));
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub dir: PathBuf,
    pub regions: Vec<RegionStatus>,
    /// Prometheus scraping every role, when it is installed and running.
    pub prometheus_url: Option<String>,
    /// `tally replication`: `/status` is its view of every server, `/metrics` its lag gauges.
    pub replication_url: String,
    pub replication_running: bool,
    /// moto's Route53 endpoint, when moto is installed and running (`tally regions sync` uses it).
    pub route53_url: Option<String>,
    /// `tally wan`, which every cross-region connection goes through (`None`: a stack made
    /// before links, connecting directly).
    pub wan_url: Option<String>,
    pub wan_running: bool,
    /// One-way delay between regions.
    pub wan_ms: u64,
    /// The local identity provider's key set, which ingest verifies voters' tokens with
    /// (`tally local token --voter ID` prints a token it signed).
    pub jwks_url: String,
    pub idp_running: bool,
    /// The Redis Sentinels that fail shards over to their replicas.
    pub sentinel_urls: Vec<String>,
    pub sentinels_running: usize,
}

#[derive(Debug, Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub postgres_role: &'static str,
    pub ingest_url: String,
    pub reader_url: String,
    pub aggregator_url: String,
    pub metrics_urls: Vec<String>,
    pub postgres_url: String,
    /// Each shard's primary now.
    pub redis_urls: Vec<String>,
    /// Each shard's replica now (Sentinel promotes it when its primary fails).
    pub redis_replica_urls: Vec<String>,
    /// Bytes of WAL the primary has that this region's replica has not replayed (0 for the primary).
    pub replica_lag_bytes: Option<i64>,
    /// The replica's own measure of how stale it is, in milliseconds.
    pub replica_lag_ms: Option<f64>,
    pub processes: std::collections::BTreeMap<String, bool>,
}

pub fn status(dir: &Path) -> anyhow::Result<Status> {
    let stack = Stack::require(dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (lags, own): (Vec<db::ReplicaLag>, Vec<Option<db::Freshness>>) = rt.block_on(async {
        let lags = match db::connect(&stack.primary_url()).await {
            Ok(c) => db::replica_lags(&c).await.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let mut own = Vec::new();
        for r in &stack.regions {
            let seen = match db::connect(&stack.server_url(r)).await {
                Ok(c) => db::freshness(&c).await.ok(),
                Err(_) => None,
            };
            own.push(seen);
        }
        (lags, own)
    });
    let regions = stack
        .regions
        .iter()
        .zip(own)
        .map(|(r, seen)| {
            let http = |port: u16| format!("http://127.0.0.1:{port}");
            let primary = seen.as_ref().is_some_and(|f| !f.in_recovery);
            RegionStatus {
                name: r.name.clone(),
                postgres_role: match &seen {
                    Some(f) if !f.in_recovery => "primary",
                    Some(_) => "replica",
                    None => "down",
                },
                ingest_url: http(r.ingest),
                reader_url: http(r.reader),
                aggregator_url: http(r.aggregator),
                metrics_urls: [r.ingest, r.aggregator, r.reader]
                    .iter()
                    .map(|&p| format!("{}/metrics", http(p)))
                    .collect(),
                postgres_url: Stack::pg_url(r.postgres, servers::SUPERUSER),
                redis_urls: stack.primary_redis_urls(r),
                redis_replica_urls: (0..r.redis.len())
                    .flat_map(|i| {
                        let primary = stack.shard_primary(r, i);
                        stack
                            .shard_servers(r, i, Fsync::Everysec)
                            .into_iter()
                            .filter(move |s| s.port != primary)
                            .map(|s| Stack::redis_url(s.port))
                    })
                    .collect(),
                replica_lag_bytes: if primary {
                    Some(0)
                } else {
                    lags.iter()
                        .find(|l| l.slot == slot_name(&r.name))
                        .and_then(|l| l.lag_bytes)
                },
                replica_lag_ms: seen.and_then(|f| f.lag_ms),
                processes: r
                    .processes()
                    .into_iter()
                    .map(|name| {
                        let up = stack.role_running(&r.name, &name);
                        (name, up)
                    })
                    .collect(),
            }
        })
        .collect();
    let prometheus = stack.prometheus();
    Ok(Status {
        dir: stack.dir.clone(),
        regions,
        prometheus_url: prometheus.is_running().then(|| prometheus.url()),
        replication_url: format!("http://127.0.0.1:{}", stack.replication),
        replication_running: stack.role_running(GLOBAL, REPLICATION),
        route53_url: stack.moto().is_running().then(|| stack.moto().url()),
        wan_url: (!stack.links.is_empty()).then(|| format!("http://127.0.0.1:{}", stack.wan)),
        wan_running: stack.role_running(GLOBAL, WAN),
        wan_ms: stack.wan_ms,
        jwks_url: stack.jwks_url(),
        idp_running: stack.role_running(GLOBAL, IDP),
        sentinel_urls: stack
            .sentinels
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect(),
        sentinels_running: stack.sentinels().iter().filter(|s| s.is_running()).count(),
    })
}

pub fn print_status(s: &Status) {
    println!("local stack in {}", s.dir.display());
    for r in &s.regions {
        let lag = match (r.replica_lag_bytes, r.replica_lag_ms) {
            (Some(b), Some(ms)) => format!("{b} bytes, {ms:.0} ms"),
            (Some(b), None) => format!("{b} bytes"),
            (None, _) => "unknown (replica not streaming)".into(),
        };
        let down: Vec<&str> = r
            .processes
            .iter()
            .filter(|(_, up)| !**up)
            .map(|(n, _)| n.as_str())
            .collect();
        println!("{} ({}):", r.name, r.postgres_role);
        println!("  ingest     {}", r.ingest_url);
        println!("  results    {}/?poll=default", r.reader_url);
        println!("  aggregator {}", r.aggregator_url);
        println!("  postgres   {}  (replica lag: {lag})", r.postgres_url);
        println!("  redis      {}", r.redis_urls.join(" "));
        if !r.redis_replica_urls.is_empty() {
            println!("  replicas   {}", r.redis_replica_urls.join(" "));
        }
        if !down.is_empty() {
            println!("  NOT RUNNING: {}", down.join(", "));
        }
    }
    println!(
        "replication {}/status{}",
        s.replication_url,
        if s.replication_running {
            ""
        } else {
            "  NOT RUNNING"
        }
    );
    match &s.wan_url {
        Some(url) => println!(
            "wan {url}/status ({} ms each way between regions){}",
            s.wan_ms,
            if s.wan_running { "" } else { "  NOT RUNNING" }
        ),
        None => println!("wan none (this stack predates links: regions connect directly)"),
    }
    if !s.sentinel_urls.is_empty() {
        println!(
            "sentinels {} ({} of {} running; they fail a shard over to its replica)",
            s.sentinel_urls.join(" "),
            s.sentinels_running,
            s.sentinel_urls.len()
        );
    }
    println!(
        "idp {} (voters' tokens: `tally local token --voter ID`){}",
        s.jwks_url,
        if s.idp_running { "" } else { "  NOT RUNNING" }
    );
    match &s.route53_url {
        Some(url) => println!("route53 {url} (moto; `tally regions sync` writes the zone here)"),
        None => println!("route53 not running (install moto with scripts/setup --moto)"),
    }
    match &s.prometheus_url {
        Some(url) => println!(
            "prometheus {url} (every role, scraped each second; the clusters' alert rules)"
        ),
        None => println!("prometheus not running (install it with scripts/setup --prometheus)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_file_is_the_prometheus_rules_spec() {
        let rules = rule_file(PROMETHEUS_RULE);
        assert!(
            rules.starts_with("groups:\n  - name: tally.recording\n"),
            "{}",
            &rules[..80]
        );
        assert!(!rules.contains("kind: PrometheusRule"));
        assert_eq!(
            rules.matches("- alert: ").count(),
            PROMETHEUS_RULE.matches("- alert: ").count()
        );
    }
}
