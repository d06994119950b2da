//! Which replica a managed platform's promotion takes, without IO: the candidates as the
//! platform and the servers described them in, the one to promote out. As `failover` does for
//! the local stack: the available replica that has received the most WAL, since it holds every
//! commit any other holds; among equals (or where WAL could not be read), the order the operator
//! gave.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub region: String,
    /// The platform's name for it (an RDS instance identifier).
    pub instance: String,
    /// The platform says it is running and can be promoted.
    pub available: bool,
    /// The platform says it replicates from a primary.
    pub replica: bool,
    /// The WAL it has received, when its server answered (`pg_last_wal_receive_lsn()`).
    pub received_lsn: Option<u64>,
}

/// The candidate to promote, if any can be.
pub fn choose(candidates: &[Candidate]) -> Option<&Candidate> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.available && c.replica)
        // Most WAL first (unknown below any known), then the earliest given.
        .max_by_key(|(i, c)| (c.received_lsn.map_or(0, |l| l + 1), std::cmp::Reverse(*i)))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn candidate(i: usize, available: bool, replica: bool, lsn: Option<u64>) -> Candidate {
        Candidate {
            region: format!("r{i}"),
            instance: format!("i{i}"),
            available,
            replica,
            received_lsn: lsn,
        }
    }

    #[test]
    fn the_most_wal_wins_then_the_order_given() {
        let c = [
            candidate(0, true, true, None),
            candidate(1, true, true, Some(10)),
            candidate(2, true, true, Some(10)),
            candidate(3, false, true, Some(99)),
            candidate(4, true, false, Some(99)),
        ];
        assert_eq!(choose(&c).unwrap().region, "r1");
        assert_eq!(choose(&c[..1]).unwrap().region, "r0");
        assert_eq!(choose(&c[3..]), None);
    }

    proptest! {
        #[test]
        fn the_choice_is_an_eligible_replica_with_no_eligible_one_ahead(
            specs in proptest::collection::vec((any::<bool>(), any::<bool>(), proptest::option::of(0u64..5)), 0..6),
        ) {
            let c: Vec<Candidate> = specs.iter().enumerate()
                .map(|(i, &(a, r, l))| candidate(i, a, r, l)).collect();
            let eligible: Vec<&Candidate> = c.iter().filter(|c| c.available && c.replica).collect();
            match choose(&c) {
                None => prop_assert!(eligible.is_empty()),
                Some(chosen) => {
                    prop_assert!(chosen.available && chosen.replica);
                    let rank = |c: &Candidate| c.received_lsn.map_or(0, |l| l + 1);
                    prop_assert!(eligible.iter().all(|e| rank(e) <= rank(chosen)));
                    let first_best = eligible.iter().find(|e| rank(e) == rank(chosen)).unwrap();
                    prop_assert_eq!(&first_best.region, &chosen.region);
                }
            }
        }
    }
}
