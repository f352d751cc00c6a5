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
