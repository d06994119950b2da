//! Choosing where to read from: the first source in preference order that answers and is fresh
//! enough; failing that, the freshest that answers. Pure, so the rule is tested on its own.

use std::time::Duration;

/// What one probe of a source found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    Down,
    /// Answered; `lag_ms` is `None` when the server cannot tell how stale it is.
    Up {
        lag_ms: Option<f64>,
    },
}

/// The index of the source to serve from, or `None` if none answers.
pub fn choose(probes: &[Probe], max_lag: Duration) -> Option<usize> {
    let bound = max_lag.as_secs_f64() * 1000.0;
    let fresh = probes
        .iter()
        .position(|p| matches!(p, Probe::Up { lag_ms: Some(l) } if *l <= bound));
    fresh.or_else(|| {
        probes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p {
                Probe::Up { lag_ms } => Some((i, lag_ms.unwrap_or(f64::INFINITY))),
                Probe::Down => None,
            })
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .map(|(i, _)| i)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOUND: Duration = Duration::from_secs(5);

    #[test]
    fn prefers_the_first_fresh_source_then_the_freshest() {
        use Probe::*;
        assert_eq!(
            choose(&[Up { lag_ms: Some(1.0) }, Up { lag_ms: Some(0.0) }], BOUND),
            Some(0)
        );
        assert_eq!(choose(&[Down, Up { lag_ms: Some(10.0) }], BOUND), Some(1));
        assert_eq!(
            choose(
                &[
                    Up {
                        lag_ms: Some(9_000.0)
                    },
                    Up { lag_ms: Some(0.0) }
                ],
                BOUND
            ),
            Some(1)
        );
        assert_eq!(
            choose(
                &[
                    Up { lag_ms: None },
                    Up {
                        lag_ms: Some(7_000.0)
                    }
                ],
                BOUND
            ),
            Some(1)
        );
        assert_eq!(
            choose(
                &[
                    Up {
                        lag_ms: Some(8_000.0)
                    },
                    Up {
                        lag_ms: Some(7_000.0)
                    }
                ],
                BOUND
            ),
            Some(1)
        );
        assert_eq!(choose(&[Up { lag_ms: None }], BOUND), Some(0));
        assert_eq!(choose(&[Down, Down], BOUND), None);
    }

    fn probe() -> impl Strategy<Value = Probe> {
        prop_oneof![
            Just(Probe::Down),
            Just(Probe::Up { lag_ms: None }),
            (0.0f64..20_000.0).prop_map(|l| Probe::Up { lag_ms: Some(l) }),
        ]
    }

    proptest! {
        #[test]
        fn never_picks_a_down_source_and_never_skips_an_earlier_fresh_one(probes in proptest::collection::vec(probe(), 0..6)) {
            match choose(&probes, BOUND) {
                None => prop_assert!(probes.iter().all(|p| *p == Probe::Down)),
                Some(i) => {
                    prop_assert!(probes[i] != Probe::Down);
                    let fresh = |p: &Probe| matches!(p, Probe::Up { lag_ms: Some(l) } if *l <= 5_000.0);
                    if let Some(first_fresh) = probes.iter().position(fresh) {
                        prop_assert_eq!(i, first_fresh);
                    }
                }
            }
        }
    }
}
