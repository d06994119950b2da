//! The failover decision, without IO: fed what each server said on one probe round, it answers
//! which actions to take. The driver (`watch`) does the probing and the actions.
//!
//! Replication is asynchronous, as RDS's across regions is; the aggregators take a batch's votes
//! out of Redis only once a replica has replayed its commit. So the replica that has received the
//! most WAL holds every commit whose votes have left Redis, and whatever it lacks is still queued
//! and is applied again. That one is promoted, and only after the old primary is fenced, so that
//! at no time can two servers take writes.

use serde::Serialize;

/// Consecutive failed probes of the primary before it is declared gone.
pub const DEFAULT_MISSES_BEFORE_FAILOVER: u32 = 3;
/// Probe rounds a promotion may take before the decision is made again.
pub const PROMOTION_ROUNDS: u32 = 20;

/// One server, as one probe round saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub region: String,
    /// Did it answer the probe?
    pub reachable: bool,
    pub in_recovery: bool,
    /// WAL it holds: written on a primary, received and flushed on a replica.
    pub lsn: u64,
    /// The region of the server a replica is configured to stream from.
    pub upstream: Option<String>,
}

impl Observation {
    fn writable(&self) -> bool {
        self.reachable && !self.in_recovery
    }

    fn replica(&self) -> bool {
        self.reachable && self.in_recovery
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Make sure it cannot take writes: stop it and have it come back as a replica.
    Fence { region: String },
    /// Promote it (`pg_promote`).
    Promote { region: String },
    /// Point a replica at the primary (a slot there, then its `primary_conninfo`).
    Follow { replica: String, primary: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Watching {
        primary: Option<String>,
        misses: u32,
    },
    Promoting {
        new: String,
        rounds: u32,
    },
}

#[derive(Debug, Clone)]
pub struct Failover {
    misses_before_failover: u32,
    state: State,
    /// Failovers decided so far.
    pub failovers: u64,
}

impl Failover {
    pub fn new(misses_before_failover: u32) -> Self {
        Failover {
            misses_before_failover: misses_before_failover.max(1),
            state: State::Watching {
                primary: None,
                misses: 0,
            },
            failovers: 0,
        }
    }

    /// The server taken to be the primary (the one being promoted, during a promotion).
    pub fn primary(&self) -> Option<&str> {
        match &self.state {
            State::Watching { primary, .. } => primary.as_deref(),
            State::Promoting { new, .. } => Some(new),
        }
    }

    /// Is the primary missing right now (failed probes, or a promotion under way)?
    pub fn degraded(&self) -> bool {
        !matches!(
            self.state,
            State::Watching {
                misses: 0,
                primary: Some(_)
            }
        )
    }

    /// One probe round in, the actions it calls for out.
    pub fn observe(&mut self, round: &[Observation]) -> Vec<Action> {
        let find = |region: &str| round.iter().find(|o| o.region == region);
        match self.state.clone() {
            State::Promoting { new, rounds } => {
                if find(&new).is_some_and(Observation::writable) {
                    self.state = State::Watching {
                        primary: Some(new),
                        misses: 0,
                    };
                    return self.observe(round);
                }
                self.state = if rounds + 1 >= PROMOTION_ROUNDS {
                    // The promotion did not take: decide again, from scratch.
                    State::Watching {
                        primary: Some(new),
                        misses: self.misses_before_failover,
                    }
                } else {
                    State::Promoting {
                        new,
                        rounds: rounds + 1,
                    }
                };
                Vec::new()
            }
            State::Watching { primary: None, .. } => {
                // At start: the writable server with the most WAL is the primary; any other
                // writable one is a zombie.
                let Some(first) = round.iter().filter(|o| o.writable()).max_by_key(|o| o.lsn)
                else {
                    return Vec::new();
                };
                self.state = State::Watching {
                    primary: Some(first.region.clone()),
                    misses: 0,
                };
                self.observe(round)
            }
            State::Watching {
                primary: Some(primary),
                misses,
            } => {
                if find(&primary).is_some_and(Observation::writable) {
                    self.state = State::Watching {
                        primary: Some(primary.clone()),
                        misses: 0,
                    };
                    return tidy(round, &primary);
                }
                let misses = misses + 1;
                self.state = State::Watching {
                    primary: Some(primary.clone()),
                    misses,
                };
                if misses < self.misses_before_failover {
                    return Vec::new();
                }
                // The replica with the most WAL; ties go to the first in topology order.
                let Some(best) = round
                    .iter()
                    .filter(|o| o.replica())
                    .rev()
                    .max_by_key(|o| o.lsn)
                else {
                    return Vec::new();
                };
                let best = best.region.clone();
                self.failovers += 1;
                self.state = State::Promoting {
                    new: best.clone(),
                    rounds: 0,
                };
                let mut actions = vec![
                    Action::Fence { region: primary },
                    Action::Promote {
                        region: best.clone(),
                    },
                ];
                actions.extend(
                    round
                        .iter()
                        .filter(|o| o.replica() && o.region != best)
                        .map(|o| Action::Follow {
                            replica: o.region.clone(),
                            primary: best.clone(),
                        }),
                );
                actions
            }
        }
    }
}

/// With the primary healthy: fence any other writable server, and point every replica that
/// streams from elsewhere at the primary.
fn tidy(round: &[Observation], primary: &str) -> Vec<Action> {
    let mut out = Vec::new();
    for o in round.iter().filter(|o| o.region != primary) {
        if o.writable() {
            out.push(Action::Fence {
                region: o.region.clone(),
            });
        } else if o.replica() && o.upstream.as_deref() != Some(primary) {
            out.push(Action::Follow {
                replica: o.region.clone(),
                primary: primary.into(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-1"];

    fn obs(
        region: &str,
        reachable: bool,
        in_recovery: bool,
        lsn: u64,
        upstream: Option<&str>,
    ) -> Observation {
        Observation {
            region: region.into(),
            reachable,
            in_recovery,
            lsn,
            upstream: upstream.map(Into::into),
        }
    }

    fn healthy() -> Vec<Observation> {
        vec![
            obs("us-east-1", true, false, 100, None),
            obs("eu-west-1", true, true, 90, Some("us-east-1")),
            obs("ap-southeast-1", true, true, 95, Some("us-east-1")),
        ]
    }

    #[test]
    fn a_healthy_cluster_needs_nothing() {
        let mut f = Failover::new(3);
        for _ in 0..10 {
            assert_eq!(f.observe(&healthy()), vec![]);
        }
        assert_eq!(f.primary(), Some("us-east-1"));
        assert!(!f.degraded());
    }

    #[test]
    fn a_dead_primary_is_replaced_by_the_replica_with_the_most_wal_after_the_misses() {
        let mut f = Failover::new(3);
        f.observe(&healthy());
        let mut dead = healthy();
        dead[0].reachable = false;
        assert_eq!(f.observe(&dead), vec![]);
        assert_eq!(f.observe(&dead), vec![]);
        assert!(f.degraded());
        assert_eq!(
            f.observe(&dead),
            vec![
                Action::Fence {
                    region: "us-east-1".into()
                },
                Action::Promote {
                    region: "ap-southeast-1".into()
                },
                Action::Follow {
                    replica: "eu-west-1".into(),
                    primary: "ap-southeast-1".into()
                },
            ]
        );
        assert_eq!(f.primary(), Some("ap-southeast-1"));
        // Promotion takes a round or two; nothing is decided twice meanwhile.
        assert_eq!(f.observe(&dead), vec![]);
        let mut promoted = dead.clone();
        promoted[2].in_recovery = false;
        promoted[1].upstream = Some("ap-southeast-1".into());
        assert_eq!(f.observe(&promoted), vec![]);
        assert!(!f.degraded());
        assert_eq!(f.failovers, 1);
        // The old primary comes back as a replica of the new one: nothing to do.
        promoted[0] = obs("us-east-1", true, true, 90, Some("ap-southeast-1"));
        assert_eq!(f.observe(&promoted), vec![]);
    }

    #[test]
    fn a_zombie_primary_is_fenced_and_a_stray_replica_repointed() {
        let mut f = Failover::new(3);
        f.observe(&healthy());
        let mut round = healthy();
        round[1] = obs("eu-west-1", true, false, 120, None);
        round[2].upstream = Some("eu-west-1".into());
        assert_eq!(
            f.observe(&round),
            vec![
                Action::Fence {
                    region: "eu-west-1".into()
                },
                Action::Follow {
                    replica: "ap-southeast-1".into(),
                    primary: "us-east-1".into()
                },
            ]
        );
    }

    #[test]
    fn with_no_replica_reachable_it_waits() {
        let mut f = Failover::new(1);
        f.observe(&healthy());
        let down: Vec<Observation> = healthy()
            .into_iter()
            .map(|mut o| {
                o.reachable = false;
                o
            })
            .collect();
        for _ in 0..5 {
            assert_eq!(f.observe(&down), vec![]);
        }
        assert_eq!(f.primary(), Some("us-east-1"));
    }

    fn rounds() -> impl Strategy<Value = Vec<Vec<Observation>>> {
        let server = |i: usize| {
            (any::<bool>(), prop::bool::weighted(0.8), 0u64..1000)
                .prop_map(move |(up, rec, lsn)| obs(REGIONS[i], up, rec, lsn, Some(REGIONS[0])))
        };
        prop::collection::vec(
            (server(0), server(1), server(2)).prop_map(|(a, b, c)| vec![a, b, c]),
            1..60,
        )
    }

    proptest! {
        /// Whatever the servers say: a promotion only ever follows the misses, fences the old
        /// primary first, picks a replica with the most WAL among those reachable, and never
        /// picks while the taken primary answers as writable.
        #[test]
        fn promotions_are_safe(rounds in rounds(), misses in 1u32..5) {
            let mut f = Failover::new(misses);
            for round in rounds {
                let before = f.primary().map(str::to_string);
                let actions = f.observe(&round);
                let promoted: Vec<&str> = actions.iter().filter_map(|a| match a {
                    Action::Promote { region } => Some(region.as_str()),
                    _ => None,
                }).collect();
                prop_assert!(promoted.len() <= 1);
                if let Some(p) = promoted.first() {
                    let old = before.expect("a promotion replaces a known primary");
                    prop_assert!(!round.iter().any(|o| o.region == old && o.writable()));
                    prop_assert_eq!(&actions[0], &Action::Fence { region: old });
                    let chosen = round.iter().find(|o| o.region == *p).unwrap();
                    prop_assert!(chosen.replica());
                    let most = round.iter().filter(|o| o.replica()).map(|o| o.lsn).max().unwrap();
                    prop_assert_eq!(chosen.lsn, most);
                }
            }
        }
    }
}
