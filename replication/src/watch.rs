//! The driver around [`Failover`]: probes every server each interval, exports what it saw, and
//! carries out the actions the decision asks for.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::failover::{Action, Failover, Observation};
use crate::fence;
use crate::ReplicationError;

/// Environment variables for the watcher's settings (each also a flag of `tally replication`).
pub const ENV_POSTGRES_SERVERS: &str = "TALLY_POSTGRES_SERVERS";
pub const ENV_DATA_DIRS: &str = "TALLY_DATA_DIRS";
pub const ENV_PROBE_INTERVAL_MS: &str = "TALLY_PROBE_INTERVAL_MS";
pub const ENV_FAILOVER_MISSES: &str = "TALLY_FAILOVER_MISSES";
pub const ENV_FAILOVER: &str = "TALLY_FAILOVER";
pub const ENV_REPLICA_ROUTES: &str = "TALLY_REPLICA_ROUTES";

/// Time between probe rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(500);
/// A server that does not connect and answer within this counts as a failed probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// One PostgreSQL server of the topology.
#[derive(Debug, Clone)]
pub struct Server {
    pub region: String,
    /// A superuser connection string (promotion and re-pointing need one).
    pub url: String,
    /// Its data directory, when it runs on this machine: fencing then stops it and leaves it
    /// set to come back as a replica.
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub servers: Vec<Server>,
    pub interval: Duration,
    pub misses_before_failover: u32,
    /// Carry out failovers (else only watch and report).
    pub failover: bool,
    /// Where a region's replica reaches another region's server when not at the server's own
    /// address (the local stack's WAN links); re-pointing a replica uses these.
    pub routes: Vec<Route>,
}

/// Region `from`'s way to region `to`'s server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub from: String,
    pub to: String,
    pub host: String,
    pub port: u16,
}

impl Config {
    fn route(&self, from: &str, to: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.from == from && r.to == to)
    }
}

/// The replication slot (and standby name) of a region's server.
pub fn slot_name(region: &str) -> String {
    region.replace('-', "_")
}

/// What the watcher last saw, for `/readyz` and reports.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct View {
    pub primary: Option<String>,
    pub degraded: bool,
    pub failovers: u64,
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerView {
    pub region: String,
    pub reachable: bool,
    pub in_recovery: bool,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
}

struct Probe {
    server: Server,
    config: tokio_postgres::Config,
    client: Option<Client>,
}

impl Probe {
    async fn client(&mut self) -> Result<&Client, ReplicationError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            let (client, conn) = self.config.connect(tls::postgres()).await?;
            tokio::spawn(conn);
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just connected"))
    }

    /// `ports`: which region each upstream port a replica may name belongs to, as seen from
    /// this server (servers' own ports, and this region's routes).
    async fn observe(&mut self, ports: &[(String, u16)]) -> (Observation, Option<f64>) {
        let region = self.server.region.clone();
        let seen = tokio::time::timeout(PROBE_TIMEOUT, async {
            let client = self.client().await?;
            let row = client.query_one(PROBE, &[]).await?;
            let lag = db::freshness(client).await?.lag_ms;
            Ok::<_, ReplicationError>((row, lag))
        })
        .await;
        match seen {
            Ok(Ok((row, lag_ms))) => {
                let conninfo: String = row.get(2);
                let upstream = conninfo_port(&conninfo)
                    .and_then(|p| ports.iter().find(|(_, port)| *port == p))
                    .map(|(r, _)| r.clone());
                (
                    Observation {
                        region,
                        reachable: true,
                        in_recovery: row.get(0),
                        lsn: row.get::<_, i64>(1).max(0) as u64,
                        upstream,
                    },
                    lag_ms.map(|ms| ms / 1000.0),
                )
            }
            _ => {
                self.client = None;
                (
                    Observation {
                        region,
                        reachable: false,
                        in_recovery: false,
                        lsn: 0,
                        upstream: None,
                    },
                    None,
                )
            }
        }
    }
}

const PROBE: &str = "
SELECT pg_is_in_recovery(),
       ((CASE WHEN pg_is_in_recovery()
              THEN COALESCE(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())
              ELSE pg_current_wal_lsn() END) - '0/0'::pg_lsn)::int8,
       current_setting('primary_conninfo')";

fn conninfo_port(conninfo: &str) -> Option<u16> {
    conninfo
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("port="))
        .and_then(|p| p.trim_matches('\'').parse().ok())
}

fn port_of(url: &str) -> Option<u16> {
    let config: tokio_postgres::Config = url.parse().ok()?;
    config.get_ports().first().copied()
}

/// Probes, decides and acts every interval until `stop`; publishes each round's view.
pub async fn run_loop(
    config: Config,
    view: watch::Sender<View>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), ReplicationError> {
    let mut probes = Vec::new();
    let mut ports = Vec::new();
    for s in &config.servers {
        let mut pg: tokio_postgres::Config =
            s.url.parse().map_err(|e: tokio_postgres::Error| {
                ReplicationError::Config(format!("{}: {e}", s.region))
            })?;
        pg.connect_timeout(PROBE_TIMEOUT);
        ports.push((s.region.clone(), port_of(&s.url).unwrap_or(5432)));
        probes.push(Probe {
            server: s.clone(),
            config: pg,
            client: None,
        });
    }
    let mut decision = Failover::new(config.misses_before_failover);
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return Ok(()),
        }
        let mut round = Vec::new();
        let mut lags = Vec::new();
        for p in &mut probes {
            let mut seen_from_here = ports.clone();
            seen_from_here.extend(
                config
                    .routes
                    .iter()
                    .filter(|r| r.from == p.server.region)
                    .map(|r| (r.to.clone(), r.port)),
            );
            let (o, lag) = p.observe(&seen_from_here).await;
            round.push(o);
            lags.push(lag);
        }
        let actions = decision.observe(&round);
        publish(&round, &lags, &decision, &view);
        if !config.failover {
            continue;
        }
        for action in actions {
            let started = Instant::now();
            tracing::warn!(?action, "replication action");
            match act(&config, &probes, &action).await {
                Ok(()) => {
                    metrics::counter!("tally_replication_actions_total", "action" => kind(&action), "outcome" => "done").increment(1);
                    tracing::warn!(
                        ?action,
                        seconds = started.elapsed().as_secs_f64(),
                        "replication action done"
                    );
                }
                Err(e) => {
                    metrics::counter!("tally_replication_actions_total", "action" => kind(&action), "outcome" => "failed").increment(1);
                    tracing::error!(?action, error = %e, "replication action failed");
                }
            }
        }
    }
}

fn kind(a: &Action) -> &'static str {
    match a {
        Action::Fence { .. } => "fence",
        Action::Promote { .. } => "promote",
        Action::Follow { .. } => "follow",
    }
}

fn publish(
    round: &[Observation],
    lags: &[Option<f64>],
    decision: &Failover,
    view: &watch::Sender<View>,
) {
    let primary_lsn = round
        .iter()
        .find(|o| Some(o.region.as_str()) == decision.primary() && o.reachable)
        .map(|o| o.lsn);
    let mut servers = Vec::new();
    for (o, lag) in round.iter().zip(lags) {
        let role = if Some(o.region.as_str()) == decision.primary() {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("tally_replication_primary", "region" => o.region.clone()).set(role);
        metrics::gauge!("tally_replication_up", "region" => o.region.clone()).set(if o.reachable {
            1.0
        } else {
            0.0
        });
        let lag_bytes = (o.reachable && o.in_recovery)
            .then(|| primary_lsn.map(|p| p.saturating_sub(o.lsn)))
            .flatten();
        if o.in_recovery && o.reachable {
            if let Some(b) = lag_bytes {
                metrics::gauge!("tally_replication_lag_bytes", "region" => o.region.clone())
                    .set(b as f64);
            }
            if let Some(s) = lag {
                metrics::gauge!("tally_replication_lag_seconds", "region" => o.region.clone())
                    .set(*s);
            }
        }
        servers.push(ServerView {
            region: o.region.clone(),
            reachable: o.reachable,
            in_recovery: o.in_recovery,
            lag_bytes,
            lag_seconds: *lag,
        });
    }
    metrics::gauge!("tally_replication_failovers").set(decision.failovers as f64);
    view.send_replace(View {
        primary: decision.primary().map(str::to_string),
        degraded: decision.degraded(),
        failovers: decision.failovers,
        servers,
    });
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

async fn act(config: &Config, probes: &[Probe], action: &Action) -> Result<(), ReplicationError> {
    let server = |region: &str| {
        probes
            .iter()
            .find(|p| p.server.region == region)
            .ok_or_else(|| ReplicationError::Config(format!("no server for {region}")))
    };
    let connect = |p: &Probe| {
        let config = p.config.clone();
        async move {
            let (client, conn) = config.connect(tls::postgres()).await?;
            tokio::spawn(conn);
            Ok::<_, ReplicationError>(client)
        }
    };
    match action {
        Action::Fence { region } => {
            let p = server(region)?;
            // Reachable: refuse writes at once and end the sessions that might make them.
            if let Ok(Ok(c)) = tokio::time::timeout(PROBE_TIMEOUT, connect(p)).await {
                let _ = each(
                    &c,
                    &[
                        "ALTER SYSTEM SET default_transaction_read_only = on".into(),
                        "SELECT pg_reload_conf()".into(),
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                          WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                            .into(),
                    ],
                )
                .await;
            }
            // On this machine: stop it, and make it come back as a replica.
            if let Some(dir) = &p.server.data_dir {
                fence::stop_now(dir);
                fence::fence_dir(dir)?;
            }
            Ok(())
        }
        Action::Promote { region } => {
            let c = connect(server(region)?).await?;
            c.query_one("SELECT pg_promote(true, 60)", &[]).await?;
            c.batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
                .await?;
            asynchronous(&c).await
        }
        Action::Follow { replica, primary } => {
            let slot = slot_name(replica);
            let p = server(primary)?;
            let c = connect(p).await?;
            c.execute(
                "SELECT pg_create_physical_replication_slot($1)
                  WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&slot],
            )
            .await?;
            let (host, port) = match config.route(replica, primary) {
                Some(route) => (route.host.clone(), route.port),
                None => {
                    let host = match p.config.get_hosts().first() {
                        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                        _ => "127.0.0.1".into(),
                    };
                    (host, port_of(&p.server.url).unwrap_or(5432))
                }
            };
            let user = p.config.get_user().unwrap_or("postgres");
            let conninfo = format!("host={host} port={port} user={user} application_name={slot}");
            let r = connect(server(replica)?).await?;
            each(
                &r,
                &[
                    format!("ALTER SYSTEM SET primary_conninfo = {}", quote(&conninfo)),
                    format!("ALTER SYSTEM SET primary_slot_name = {}", quote(&slot)),
                    "SELECT pg_reload_conf()".into(),
                ],
            )
            .await?;
            Ok(())
        }
    }
}

/// Makes commits on `primary` wait for no other server, as RDS's cross-region replicas do not;
/// undoes the synchronous standby setting of stacks made before. What a failover can lose is
/// then only commits whose votes are still in Redis: the aggregators acknowledge a batch only
/// once a replica has replayed it (`aggregator::replay`).
pub async fn asynchronous(primary: &Client) -> Result<(), ReplicationError> {
    each(
        primary,
        &[
            "ALTER SYSTEM RESET synchronous_standby_names".into(),
            "SELECT pg_reload_conf()".into(),
        ],
    )
    .await
}

/// Runs statements one call each: ALTER SYSTEM refuses to run inside a multi-statement batch.
async fn each(client: &Client, statements: &[String]) -> Result<(), ReplicationError> {
    for s in statements {
        client.batch_execute(s).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_port_is_read_from_the_conninfo() {
        assert_eq!(
            conninfo_port("user=postgres host=127.0.0.1 port=5433 sslmode=prefer"),
            Some(5433)
        );
        assert_eq!(conninfo_port("host=127.0.0.1 port='6001'"), Some(6001));
        assert_eq!(conninfo_port(""), None);
        assert_eq!(
            port_of("postgres://postgres@127.0.0.1:7001/tally"),
            Some(7001)
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote("a'b"), "'a''b'");
    }
}
