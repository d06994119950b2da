//! Acknowledging to Redis only what survives the primary. Replication to other regions is
//! asynchronous (as RDS's cross-region replicas are), so a commit can exist on the primary alone;
//! were its votes then deleted from Redis and the primary's region lost, the promoted replica
//! would never count them. So a batch's in-flight lists are acknowledged only once
//! `wait_replicas` replicas have replayed its commit. Meanwhile the lanes write on: only the
//! acknowledgement waits.
//!
//! A commit is named by its timeline and LSN on the primary that took it. A replica's replay
//! position counts only on the same timeline (`pg_stat_wal_receiver.received_tli`): after a
//! promotion, positions on the new timeline say nothing of the old one's commits. A wait that a
//! newer timeline has superseded gives up; its lists stay in Redis and are applied again on the
//! new primary, which changes nothing if the commit survived.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use db::parse_lsn;
use tokio::sync::{watch, Notify};

/// Where a commit is: the primary's timeline when it committed, and a WAL position at or after
/// its commit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub timeline: u32,
    pub lsn: u64,
}

impl Commit {
    /// From `pg_walfile_name(pg_current_wal_lsn())` (its first eight hex digits are the
    /// timeline) and `pg_current_wal_lsn()`, as text.
    pub fn parse(walfile: &str, lsn: &str) -> Option<Self> {
        Some(Commit {
            timeline: timeline(walfile)?,
            lsn: parse_lsn(lsn)?,
        })
    }
}

/// The timeline a WAL file's name starts with (`00000003000000000000000A`: 3).
fn timeline(walfile: &str) -> Option<u32> {
    u32::from_str_radix(walfile.get(..8)?, 16).ok()
}

/// One replica's replay position on the timeline it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub timeline: u32,
    pub replayed: u64,
}

/// What waiting on a commit came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enough replicas replayed it: acknowledge.
    Replayed,
    /// A newer timeline exists: the commit may be gone; do not acknowledge.
    Superseded,
}

/// The decision, without IO: has `commit` been replayed by `needed` replicas, given their
/// positions and the newest timeline seen anywhere? `None`: not yet, keep waiting.
pub fn judge(
    commit: Commit,
    needed: usize,
    positions: &[Position],
    newest: u32,
) -> Option<Outcome> {
    let replayed = positions
        .iter()
        .filter(|p| p.timeline == commit.timeline && p.replayed >= commit.lsn)
        .count();
    if replayed >= needed {
        Some(Outcome::Replayed)
    } else if newest > commit.timeline {
        Some(Outcome::Superseded)
    } else {
        None
    }
}

/// The replicas' replay positions, kept fresh while anything waits on them.
pub struct Replay {
    needed: usize,
    positions: watch::Sender<Vec<Position>>,
    /// The newest timeline any commit or replica showed.
    newest: AtomicU32,
    waiting: AtomicUsize,
    wake: Notify,
}

impl Replay {
    pub fn new(needed: usize) -> Arc<Self> {
        Arc::new(Replay {
            needed,
            positions: watch::channel(Vec::new()).0,
            newest: AtomicU32::new(0),
            waiting: AtomicUsize::new(0),
            wake: Notify::new(),
        })
    }

    /// A writer committed on `timeline`.
    pub fn saw(&self, timeline: u32) {
        self.newest.fetch_max(timeline, Ordering::Relaxed);
    }

    /// Until `needed` replicas replayed `commit`, or a newer timeline superseded it.
    pub async fn wait(&self, commit: Commit) -> Outcome {
        self.saw(commit.timeline);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
        let mut positions = self.positions.subscribe();
        let outcome = loop {
            let decided = judge(
                commit,
                self.needed,
                &positions.borrow_and_update(),
                self.newest.load(Ordering::Relaxed),
            );
            if let Some(outcome) = decided {
                break outcome;
            }
            // The sender lives as long as `self`.
            let _ = positions.changed().await;
        };
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        outcome
    }

    fn publish(&self, positions: Vec<Position>) {
        for p in &positions {
            self.saw(p.timeline);
        }
        self.positions.send_replace(positions);
    }
}

/// How often the replicas are asked while a commit waits.
pub const POLL_EVERY: Duration = Duration::from_millis(5);

/// Asks every replica among `postgres_url`'s hosts where it has replayed to, every
/// [`POLL_EVERY`] while a commit waits, until `stop`.
pub async fn watch_replicas(
    replay: Arc<Replay>,
    postgres_url: String,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(config) = postgres_url.parse::<tokio_postgres::Config>() else {
        return;
    };
    let mut servers: Vec<Server> = each_host(&config)
        .into_iter()
        .map(|config| Server {
            config,
            client: None,
        })
        .collect();
    loop {
        if replay.waiting.load(Ordering::Acquire) == 0 {
            tokio::select! {
                _ = replay.wake.notified() => {}
                _ = stop.changed() => return,
            }
            continue;
        }
        let mut positions = Vec::new();
        for s in &mut servers {
            match s.position().await {
                Some(Seen::Replica(p)) => positions.push(p),
                Some(Seen::Primary { timeline }) => replay.saw(timeline),
                None => {}
            }
        }
        replay.publish(positions);
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One connection configuration per host of a multi-host URL, taking any server.
fn each_host(config: &tokio_postgres::Config) -> Vec<tokio_postgres::Config> {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let mut one = tokio_postgres::Config::new();
            if let Some(user) = config.get_user() {
                one.user(user);
            }
            if let Some(password) = config.get_password() {
                one.password(password);
            }
            if let Some(dbname) = config.get_dbname() {
                one.dbname(dbname);
            }
            one.ssl_mode(config.get_ssl_mode())
                .channel_binding(config.get_channel_binding())
                .application_name("tally-aggregator-replay")
                .connect_timeout(Duration::from_secs(1));
            match host {
                tokio_postgres::config::Host::Tcp(h) => one.host(h),
                tokio_postgres::config::Host::Unix(p) => one.host_path(p),
            };
            // One port for all hosts, or one each.
            one.port(ports.get(i).or(ports.first()).copied().unwrap_or(5432));
            one
        })
        .collect()
}

struct Server {
    config: tokio_postgres::Config,
    client: Option<tokio_postgres::Client>,
}

/// What one server said: a replica's replay position and the timeline it receives (nothing
/// from a replica not streaming: its position may belong to a past timeline's server), or a
/// primary's timeline, which tells waiters on older timelines that their commits may be gone
/// even while nothing is written.
const POSITION: &str = "SELECT pg_is_in_recovery(),
                               (SELECT r.received_tli::int8 FROM pg_stat_wal_receiver r
                                 WHERE r.status = 'streaming'),
                               pg_last_wal_replay_lsn()::text";
const TIMELINE: &str = "SELECT pg_walfile_name(pg_current_wal_lsn())";

enum Seen {
    Replica(Position),
    Primary { timeline: u32 },
}

impl Server {
    async fn position(&mut self) -> Option<Seen> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let connected =
                tokio::time::timeout(Duration::from_secs(1), self.config.connect(tls::postgres()))
                    .await;
            let Ok(Ok((client, connection))) = connected else {
                return None;
            };
            tokio::spawn(connection);
            self.client = Some(client);
        }
        match self.ask().await {
            Ok(seen) => seen,
            Err(e) => {
                tracing::debug!(error = %e, "asking a server where it replayed to failed");
                self.client = None;
                None
            }
        }
    }

    async fn ask(&self) -> Result<Option<Seen>, tokio_postgres::Error> {
        let client = self.client.as_ref().expect("connected above");
        let row = client.query_one(POSITION, &[]).await?;
        if !row.get::<_, bool>(0) {
            let walfile: String = client.query_one(TIMELINE, &[]).await?.get(0);
            return Ok(timeline(&walfile).map(|timeline| Seen::Primary { timeline }));
        }
        let (timeline, lsn): (Option<i64>, Option<String>) = (row.get(1), row.get(2));
        let position = (|| {
            Some(Position {
                timeline: u32::try_from(timeline?).ok()?,
                replayed: parse_lsn(&lsn?)?,
            })
        })();
        Ok(position.map(Seen::Replica))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn positions_and_walfiles_are_read() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("B374D848"), None);
        assert_eq!(
            Commit::parse("00000003000000000000000A", "0/A000028"),
            Some(Commit {
                timeline: 3,
                lsn: 0x0A00_0028
            })
        );
        assert_eq!(Commit::parse("0003", "0/1"), None);
    }

    fn at(timeline: u32, replayed: u64) -> Position {
        Position { timeline, replayed }
    }

    #[test]
    fn a_commit_counts_as_replayed_only_on_its_own_timeline() {
        let commit = Commit {
            timeline: 1,
            lsn: 100,
        };
        assert_eq!(judge(commit, 1, &[at(1, 99)], 1), None);
        assert_eq!(judge(commit, 1, &[at(1, 100)], 1), Some(Outcome::Replayed));
        assert_eq!(judge(commit, 2, &[at(1, 150), at(1, 99)], 1), None);
        // Past the commit's position, but on the timeline of a later primary.
        assert_eq!(
            judge(commit, 1, &[at(2, 500)], 2),
            Some(Outcome::Superseded)
        );
        assert_eq!(judge(commit, 1, &[], 2), Some(Outcome::Superseded));
        assert_eq!(judge(commit, 1, &[], 1), None);
    }

    proptest! {
        /// Replayed means: at least `needed` replicas on the commit's timeline at or past it.
        #[test]
        fn replayed_exactly_when_enough_replicas_passed_it(
            lsn in 0u64..1000,
            needed in 1usize..3,
            positions in proptest::collection::vec((1u32..3, 0u64..1000), 0..4),
        ) {
            let commit = Commit { timeline: 1, lsn };
            let positions: Vec<Position> = positions.into_iter().map(|(t, r)| at(t, r)).collect();
            let passed = positions.iter().filter(|p| p.timeline == 1 && p.replayed >= lsn).count();
            let newest = positions.iter().map(|p| p.timeline).max().unwrap_or(1);
            let outcome = judge(commit, needed, &positions, newest);
            prop_assert_eq!(outcome == Some(Outcome::Replayed), passed >= needed);
            if passed < needed {
                prop_assert_eq!(outcome == Some(Outcome::Superseded), newest > 1);
            }
        }
    }
}
