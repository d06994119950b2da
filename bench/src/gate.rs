//! The regression gate: compares the latest criterion run of every hot-path bench with a saved
//! baseline (`cargo bench -- --save-baseline NAME` once, then `cargo bench` for the change) and
//! fails on a slowdown beyond a threshold. Criterion reports regressions but never fails a build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// A slowdown this large fails the gate unless told otherwise: above the run-to-run noise of the
/// hot paths on a shared 2-core machine, below any change worth noticing.
pub const DEFAULT_THRESHOLD_PERCENT: f64 = 10.0;

/// Where criterion keeps a bench's most recent run.
const LATEST: &str = "new";

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("no criterion results in {}: run `cargo bench -p bench` first", .0.display())]
    NoResults(PathBuf),
    #[error("no bench has both a baseline {baseline:?} and a newer run in {}; save one with `cargo bench -p bench -- --save-baseline {baseline}`", dir.display())]
    NoBaseline { baseline: String, dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a criterion estimate: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the threshold must be a positive percentage, not {0}")]
    Threshold(f64),
}

/// One bench's median time per iteration, before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    pub bench: String,
    pub baseline_ns: f64,
    pub latest_ns: f64,
    /// Positive: slower.
    pub percent: f64,
    pub regressed: bool,
}

/// The decision, pure: which benches slowed down by more than `threshold_percent`.
pub fn compare(
    baseline: &BTreeMap<String, f64>,
    latest: &BTreeMap<String, f64>,
    threshold_percent: f64,
) -> Vec<Change> {
    baseline
        .iter()
        .filter_map(|(bench, &before)| {
            let after = *latest.get(bench)?;
            let percent = (after / before - 1.0) * 100.0;
            Some(Change {
                bench: bench.clone(),
                baseline_ns: before,
                latest_ns: after,
                percent,
                regressed: percent > threshold_percent,
            })
        })
        .collect()
}

/// Reads criterion's results under `dir` (usually `target/criterion`) and compares them.
pub fn run(dir: &Path, baseline: &str, threshold_percent: f64) -> Result<Vec<Change>, GateError> {
    if !(threshold_percent > 0.0 && threshold_percent.is_finite()) {
        return Err(GateError::Threshold(threshold_percent));
    }
    if !dir.is_dir() {
        return Err(GateError::NoResults(dir.to_owned()));
    }
    let (mut before, mut after) = (BTreeMap::new(), BTreeMap::new());
    collect(dir, dir, baseline, &mut before, &mut after)?;
    let changes = compare(&before, &after, threshold_percent);
    if changes.is_empty() {
        return Err(GateError::NoBaseline {
            baseline: baseline.to_owned(),
            dir: dir.to_owned(),
        });
    }
    Ok(changes)
}

/// Every bench directory below `at` that holds a `<baseline>/estimates.json` or a
/// `new/estimates.json`: its median, keyed by the bench's path (`group/function`).
fn collect(
    root: &Path,
    at: &Path,
    baseline: &str,
    before: &mut BTreeMap<String, f64>,
    after: &mut BTreeMap<String, f64>,
) -> Result<(), GateError> {
    let entries = std::fs::read_dir(at).map_err(|source| GateError::Read {
        path: at.to_owned(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "report" {
            continue;
        }
        let bench = || {
            at.strip_prefix(root)
                .unwrap_or(at)
                .to_string_lossy()
                .into_owned()
        };
        if name == baseline && path.join("estimates.json").is_file() {
            before.insert(bench(), median_ns(&path.join("estimates.json"))?);
        } else if name == LATEST && path.join("estimates.json").is_file() {
            after.insert(bench(), median_ns(&path.join("estimates.json"))?);
        } else {
            collect(root, &path, baseline, before, after)?;
        }
    }
    Ok(())
}

/// The median, not the mean: one descheduled sample on a shared machine moves the mean.
fn median_ns(path: &Path) -> Result<f64, GateError> {
    #[derive(serde::Deserialize)]
    struct Estimates {
        median: Estimate,
    }
    #[derive(serde::Deserialize)]
    struct Estimate {
        point_estimate: f64,
    }
    let text = std::fs::read(path).map_err(|source| GateError::Read {
        path: path.to_owned(),
        source,
    })?;
    let e: Estimates = serde_json::from_slice(&text).map_err(|source| GateError::Parse {
        path: path.to_owned(),
        source,
    })?;
    Ok(e.median.point_estimate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn times(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn only_a_slowdown_beyond_the_threshold_regresses() {
        let before = times(&[
            ("vote/decode", 100.0),
            ("vote/shard_of", 10.0),
            ("aggregator/copy", 1000.0),
        ]);
        let after = times(&[
            ("vote/decode", 109.0),
            ("vote/shard_of", 12.0),
            ("aggregator/copy", 500.0),
        ]);
        let changes = compare(&before, &after, 10.0);
        let regressed: Vec<&str> = changes
            .iter()
            .filter(|c| c.regressed)
            .map(|c| c.bench.as_str())
            .collect();
        assert_eq!(regressed, ["vote/shard_of"]);
        assert!(
            (changes
                .iter()
                .find(|c| c.bench == "aggregator/copy")
                .unwrap()
                .percent
                + 50.0)
                .abs()
                < 1e-9
        );
    }

    #[test]
    fn benches_missing_on_either_side_are_not_compared() {
        let changes = compare(
            &times(&[("a", 1.0), ("b", 1.0)]),
            &times(&[("b", 5.0), ("c", 1.0)]),
            10.0,
        );
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].bench, "b");
    }

    #[test]
    fn criterion_layout_is_read_and_bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, median: f64| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(
                p,
                format!(
                    r#"{{"mean":{{"point_estimate":1.0}},"median":{{"point_estimate":{median}}}}}"#
                ),
            )
            .unwrap();
        };
        write("vote/decode/main/estimates.json", 50.0);
        write("vote/decode/new/estimates.json", 80.0);
        write("vote/decode/base/estimates.json", 79.0);
        std::fs::create_dir_all(dir.path().join("report")).unwrap();
        let changes = run(dir.path(), "main", 10.0).unwrap();
        assert_eq!(changes.len(), 1);
        let c = &changes[0];
        assert_eq!(
            (c.bench.as_str(), c.baseline_ns, c.latest_ns, c.regressed),
            ("vote/decode", 50.0, 80.0, true)
        );
        assert!((c.percent - 60.0).abs() < 1e-9);
        assert!(matches!(
            run(dir.path(), "nope", 10.0),
            Err(GateError::NoBaseline { .. })
        ));
        assert!(matches!(
            run(dir.path(), "main", -1.0),
            Err(GateError::Threshold(_))
        ));
        assert!(matches!(
            run(&dir.path().join("missing"), "main", 10.0),
            Err(GateError::NoResults(_))
        ));
        std::fs::write(dir.path().join("vote/decode/new/estimates.json"), "{").unwrap();
        assert!(matches!(
            run(dir.path(), "main", 10.0),
            Err(GateError::Parse { .. })
        ));
    }
}
