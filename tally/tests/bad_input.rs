//! `tally bad-input` on a real local stack: every hostile case answered with its 4xx (JSON where a
//! role answers), nothing stored, slow clients cut off, and the well-formed votes alongside at
//! no less than 80% of their rate alone (the median of seven rounds under attack, each against the
//! mean of the rounds alone either side of it, all with the aggregators paused and continued).

mod common;

use common::{ok, tally, StackDir};

#[test]
fn hostile_requests_get_their_4xx_store_nothing_and_do_not_slow_voters() {
    let _turn = common::one_stack_at_a_time();
    let stack = StackDir::new("tally-bad-input-");
    let dir = stack.dir();
    ok(&["local", "up", "--dir", dir]);

    let args = [
        "bad-input",
        "--json",
        "--seconds",
        "28",
        "--slow-connections",
        "60",
        "--dir",
        dir,
    ];
    let out = tally(&args);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });

    let cases = report["cases"].as_array().unwrap();
    let ingest_cases = cases.iter().filter(|c| c["target"] == "ingest").count();
    let reader_cases = cases.iter().filter(|c| c["target"] == "reader").count();
    assert!(ingest_cases >= 25 && reader_cases >= 9, "{report}");
    for c in cases {
        let expected = c["expected"].as_u64().unwrap();
        assert!((400..500).contains(&expected), "{c}");
        // Each case went to each of the three regions at least once.
        assert!(c["sent"].as_u64().unwrap() >= 3, "{c}");
        assert_eq!(c["wrong"], 0, "{c}");
        assert_eq!(
            c["answers"],
            serde_json::json!({ expected.to_string(): c["sent"] }),
            "{c}"
        );
    }
    let expected = |name: &str| {
        cases
            .iter()
            .find(|c| c["case"] == name && c["target"] == "ingest")
            .map(|c| c["expected"].as_u64().unwrap())
    };
    assert_eq!(expected("wrong-type-array"), Some(400));
    assert_eq!(expected("huge-body"), Some(413));
    assert_eq!(expected("stalled-body"), Some(408));
    assert_eq!(expected("header-flood"), Some(431));
    assert_eq!(expected("sql-in-option"), Some(422));

    assert_eq!(report["stored"], 0, "{report}");
    let loris = &report["slow_loris"];
    assert_eq!(loris["opened"], 60, "{report}");
    assert_eq!(loris["closed_by_server"], 60, "{report}");
    assert!(
        loris["longest_open_seconds"].as_f64().unwrap() < 13.0,
        "{report}"
    );

    let alone = report["alone"]["accepted"].as_u64().unwrap();
    assert!(alone > 1_000, "{report}");
    // Eight rounds alone take turns with seven under attack, each of which has one either side.
    let rates = |key: &str| -> Vec<f64> {
        report[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key}: {report}"))
            .iter()
            .map(|r| r.as_f64().unwrap())
            .collect()
    };
    let (alone_rates, attacked_rates) = (rates("alone_rates"), rates("under_attack_rates"));
    assert_eq!(
        (alone_rates.len(), attacked_rates.len()),
        (8, 7),
        "{report}"
    );
    // The attack is sized to the rate of the round alone before it (1% of it, at least one a second).
    let attack_rates = rates("attack_rates");
    assert_eq!(attack_rates.len(), 7, "{report}");
    for (attack, alone_before) in attack_rates.iter().zip(&alone_rates) {
        assert!(
            (attack - (alone_before * 0.01).max(1.0)).abs() < 1e-6,
            "{report}"
        );
    }
    // Each round's ratio is against the mean of its neighbours alone; the median of them is judged.
    let mut rounds = rates("round_ratios");
    assert_eq!(rounds.len(), 7, "{report}");
    for (i, ratio) in rounds.iter().enumerate() {
        let around = (alone_rates[i] + alone_rates[i + 1]) / 2.0;
        assert!(
            (ratio - attacked_rates[i] / around).abs() < 1e-9,
            "{report}"
        );
    }
    rounds.sort_by(f64::total_cmp);
    assert_eq!(
        report["rate_ratio"].as_f64().unwrap(),
        rounds[3],
        "{report}"
    );
    assert!(rounds[3] >= 0.8, "{report}");
    // What the attack costs the roles it reaches, per vote, in each phase.
    for phase in ["alone", "under_attack"] {
        let us = report[phase]["attacked_roles_cpu_us_per_vote"]
            .as_f64()
            .unwrap_or_else(|| panic!("no CPU a vote {phase}: {report}"));
        assert!(us > 0.0 && us < 10_000.0, "{phase}: {report}");
        // And how ingest's group commit fared, from its metrics: at least one vote a write, at
        // most a full batch.
        let per_write = report[phase]["votes_per_write"]
            .as_f64()
            .unwrap_or_else(|| panic!("no votes a write {phase}: {report}"));
        let most = ingest::config::DEFAULT_GROUP_MAX_VOTES as f64;
        assert!((1.0..=most).contains(&per_write), "{phase}: {report}");
        assert!(
            report[phase]["attacked_roles_preemptions_per_1k_votes"]
                .as_f64()
                .is_some_and(|n| n >= 0.0),
            "{phase}: {report}"
        );
    }
    // The aggregators, paused during every round of well-formed votes, run again.
    let aggregators = common::role_pids(stack.path(), "aggregator");
    assert_eq!(aggregators.len(), 3, "{aggregators:?}");
    for pid in aggregators {
        let state = servers::process_state(pid);
        assert!(
            matches!(state, Some(s) if s != 'T' && s != 'Z'),
            "aggregator {pid} left in state {state:?}"
        );
    }
    assert_eq!(report["passed"], true, "{report}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Interrupted while its first round has the aggregators paused, it continues them.
    let suite = common::command(&["bad-input", "--seconds", "70", "--dir", dir])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let aggregators = common::role_pids(stack.path(), "aggregator");
    let paused = |pid| servers::process_state(pid) == Some('T');
    common::wait_until(
        std::time::Duration::from_secs(60),
        || aggregators.iter().all(|&pid| paused(pid)),
        || "bad-input never paused the aggregators".into(),
    );
    common::interrupt(suite);
    for pid in aggregators {
        assert_ne!(
            servers::process_state(pid),
            Some('T'),
            "aggregator {pid} left stopped"
        );
    }
}
