//! A config file with a value in units the binary does not know: the `shoal` binary exits
//! with code 2 and one line naming the key, before it opens or binds anything.

use std::process::Command;

fn refused(role: &str, toml: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg(role)
        .arg("--config")
        .arg(&path)
        .env_remove("SHOAL_QUOTA_BYTES")
        .env_remove("SHOAL_LEASE_MS")
        .output()
        .expect("run shoal");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn a_value_in_unknown_units_names_the_key() {
    let err = refused("agent", "join_token = \"t\"\nquota_bytes = \"100 gigs\"\n");
    assert!(
        err.starts_with(r#"shoal: configuration: quota_bytes: unknown unit "gigs""#),
        "{err}"
    );
    assert!(err.contains(r#""512MiB""#), "says what is accepted: {err}");

    let err = refused(
        "coordinator",
        "join_token = \"t\"\nlease_ms = \"10 secs\"\n",
    );
    assert!(
        err.starts_with(r#"shoal: configuration: lease_ms: unknown unit "secs""#),
        "{err}"
    );
    assert!(err.contains(r#""1h30m""#), "says what is accepted: {err}");
}
