//! Runs the built `shoal` binary as a user would.

use std::process::Command;

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

#[test]
fn demo_moves_and_verifies_every_copy() {
    let out = shoal()
        .args([
            "demo",
            "--agents",
            "3",
            "--size-mib",
            "8",
            "--link-mbps",
            "400",
        ])
        .output()
        .expect("run shoal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("every copy verified against sha256:"),
        "{stdout}"
    );
    assert!(stdout.contains("| 3 | 8 MiB |"), "{stdout}");
    assert!(
        stdout.contains("physical bound (blob / link) 0.17 s"),
        "{stdout}"
    );
    // Two targets got a whole copy each: seeder and peers together served at least two.
    let served: f64 = stdout
        .split("bytes served: seeder ")
        .nth(1)
        .map(|rest| {
            rest.split(" copies")
                .take(2)
                .map(|part| {
                    part.rsplit(' ')
                        .next()
                        .unwrap_or("")
                        .parse::<f64>()
                        .unwrap_or(0.0)
                })
                .sum()
        })
        .unwrap_or(0.0);
    assert!(served >= 2.0, "served {served} copies:\n{stdout}");
}

#[test]
fn usage_errors_exit_2_with_one_line() {
    let out = shoal()
        .args(["demo", "--agents", "1"])
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--agents"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = shoal().args(["status"]).output().expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let out = shoal().arg("--help").output().expect("run shoal");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));

    let out = shoal()
        .args(["--log-level", "loud", "agents"])
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loud"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    let out = shoal()
        .args(["agents", "-o", "xml"])
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));

    // The whole cluster is never a default: --to is spelled out.
    let digest = format!("sha256:{}", "ab".repeat(32));
    for args in [
        vec!["distribute", digest.as_str()],
        vec!["preheat", "ghcr.io/org/app:v1"],
    ] {
        let out = shoal().args(&args).output().expect("run shoal");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--to"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    }
}

/// `shoal completions SHELL` prints a script that knows the subcommands and their flags.
#[test]
fn completions_know_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = shoal()
            .args(["completions", shell])
            .output()
            .expect("run shoal");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["distribute", "preheat", "containerd-config", "log-level"] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let out = shoal()
        .args(["completions", "cmd.exe"])
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_bad_configuration_value_exits_2_and_names_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shoal()
        .args([
            "coordinator",
            "--join-token",
            "t",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--state-dir")
        .arg(dir.path())
        .env("SHOAL_LEASE_MS", "soon")
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("lease_ms"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "join_token = \"t\"\nquota_gb = 5\n").expect("write");
    let out = shoal()
        .arg("agent")
        .arg("--config")
        .arg(&file)
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("quota_gb"), "{stderr}");

    let out = shoal()
        .args(["coordinator", "--listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(dir.path())
        .env_remove("SHOAL_JOIN_TOKEN")
        .output()
        .expect("run shoal");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("join_token"));
}
