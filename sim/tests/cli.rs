//! The `shoal-sim` binary as a user runs it: bad usage exits 2 with one clear line; a run
//! prints the table and PASS/FAIL per goal, and exits 0 when every goal passes.

use std::process::Command;

fn sim(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal-sim"))
        .args(args)
        .output()
        .expect("run shoal-sim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_usage_exits_2_naming_the_problem() {
    for (args, says) in [
        (&["nope"][..], "unknown scenario \"nope\""),
        (&[][..], "no scenario given"),
        (
            &["peak", "--seed", "x"][..],
            "--seed: \"x\" is not a number",
        ),
        (&["peak", "--only", "magic"][..], "--only: unknown strategy"),
        (&["peak", "--fast"][..], "unknown flag --fast"),
    ] {
        let (code, stdout, stderr) = sim(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(stderr.contains("usage: shoal-sim"), "{args:?}: {stderr}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
    }
}

/// The coordinator model's own arguments: bad ones exit 2 before any row; good ones print
/// one row per combination.
#[test]
fn control_prints_a_row_per_combination_and_refuses_bad_shapes() {
    for (args, says) in [
        (
            &["control", "--agents", "x"][..],
            "--agents: \"x\" is not a number",
        ),
        (
            &["control", "--blob-size", "3 parsecs"][..],
            "is not a size",
        ),
        (
            &["control", "--agents", "1"][..],
            "--agents must be 2 or more",
        ),
        (
            &["control", "--cpu-slowdown", "0.5"][..],
            "the CPU slowdown 1 or more",
        ),
        (
            &["control", "--beat-borderline", "2"][..],
            "is a chance, from 0 to 1",
        ),
        (
            &["control", "--cost", "lunch=3"][..],
            "no cost called \"lunch\"",
        ),
        (
            &["control", "--cost", "want"][..],
            "is not NAME=MICROSECONDS",
        ),
        (&["control", "--fast"][..], "unexpected argument \"--fast\""),
    ] {
        let (code, stdout, stderr) = sim(args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            !stdout.contains("| 1 |"),
            "{args:?} printed a row: {stdout}"
        );
    }
    let args = [
        "control",
        "--agents",
        "300,400",
        "--shards",
        "1,2",
        "--blob-size",
        "8MiB",
    ];
    let (code, stdout, stderr) = sim(&args);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| 3") || l.starts_with("| 4"))
        .collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    assert!(rows[0].starts_with("| 300 | 1 | 1 | 8 MiB |"), "{stdout}");
    assert!(rows[3].starts_with("| 400 | 1 | 2 | 8 MiB |"), "{stdout}");
    assert!(
        rows.iter()
            .all(|r| r.contains("| 299 |") || r.contains("| 399 |")),
        "{stdout}"
    );
}

#[test]
fn a_run_prints_the_table_and_judges_its_goals() {
    let (code, stdout, stderr) = sim(&["random-faults", "--seed", "3", "--check"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for strategy in [
        "| random-faults | shoal |",
        "| random-faults | single origin |",
        "| random-faults | random mesh |",
    ] {
        assert!(stdout.contains(strategy), "{stdout}");
    }
    assert!(
        stdout.contains("PASS random-faults: every live host completes (true)"),
        "{stdout}"
    );
    assert!(stdout.contains("peak memory"), "{stdout}");
}
