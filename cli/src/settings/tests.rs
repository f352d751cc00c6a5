//! Configuration files as the binaries load them: integers, and strings with units.

use std::path::PathBuf;

use shoal_agent::AgentConfig;
use shoal_coordinator::CoordinatorConfig;

use super::load;

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn agent_keys_take_units() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(
        &dir,
        "agent.toml",
        r#"
join_token = "t"
quota_bytes = "100GiB"
upload_limit_bytes_per_sec = "200Mbit/s"
download_limit_bytes_per_sec = "25MiB/s"
request_timeout_ms = "1m30s"
max_upload_wait_ms = "750ms"
socket_buffer_bytes = "4Mi"
chunk_size = "4MiB"

[mirror]
manifest_cache_ttl_ms = "1m"
manifest_cache_bytes = "64MiB"
fallback_after_ms = "1.5s"

[origin]
manifest_max_bytes = "4MiB"
connect_timeout_ms = "5s"
request_timeout_ms = "30s"
max_retry_wait_ms = "1m"
min_bytes_per_sec = "64KiB"
min_rate_window_ms = "30s"
"#,
    );
    let c: AgentConfig = load(Some(&path), &[]).expect("loads");
    c.validate().expect("valid");
    assert_eq!(c.quota_bytes, 100 << 30);
    assert_eq!(c.upload_limit_bytes_per_sec, 25_000_000);
    assert_eq!(c.download_limit_bytes_per_sec, 25 << 20);
    assert_eq!(c.request_timeout_ms, 90_000);
    assert_eq!(c.max_upload_wait_ms, 750);
    assert_eq!(c.socket_buffer_bytes, 4 << 20);
    assert_eq!(c.chunk_size, 4 << 20);
    assert_eq!(c.mirror.manifest_cache_ttl_ms, 60_000);
    assert_eq!(c.mirror.manifest_cache_bytes, 64 << 20);
    assert_eq!(c.mirror.fallback_after_ms, 1_500);
    assert_eq!(c.origin.manifest_max_bytes, 4 << 20);
    assert_eq!(c.origin.connect_timeout_ms, 5_000);
    assert_eq!(c.origin.request_timeout_ms, 30_000);
    assert_eq!(c.origin.max_retry_wait_ms, 60_000);
    assert_eq!(c.origin.min_bytes_per_sec, 64 << 10);
    assert_eq!(c.origin.min_rate_window_ms, 30_000);
    // Printed (and handed to the chart's readers) as integers, as before.
    let printed = serde_json::to_value(&c).expect("serializes");
    assert_eq!(printed["quota_bytes"], serde_json::json!(100u64 << 30));
    assert_eq!(
        printed["mirror"]["fallback_after_ms"],
        serde_json::json!(1_500)
    );
}

#[test]
fn coordinator_keys_take_units_and_integers_still_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(
        &dir,
        "coordinator.toml",
        r#"
join_token = "t"
lease_ms = "10s"
heartbeat_ms = 2000
job_retention_hours = "7d"
stripe_seed_min_bytes = "1GB"
max_api_request_bytes = "16MiB"
max_session_message_bytes = "8MiB"

[origin]
request_timeout_ms = 45000
"#,
    );
    let c: CoordinatorConfig = load(Some(&path), &[]).expect("loads");
    c.validate().expect("valid");
    assert_eq!(c.lease_ms, 10_000);
    assert_eq!(c.heartbeat_ms, 2_000);
    assert_eq!(c.job_retention_hours, 168);
    assert_eq!(c.stripe_seed_min_bytes, 1_000_000_000);
    assert_eq!(c.max_api_request_bytes, 16 << 20);
    assert_eq!(c.max_session_message_bytes, 8 << 20);
    assert_eq!(c.origin.request_timeout_ms, 45_000);
}

#[test]
fn string_overrides_take_units_and_plain_numbers() {
    // Flags and `SHOAL_` variables reach the loader as strings.
    let c: AgentConfig = load(
        None,
        &[
            ("quota_bytes", Some("1.5GiB".into())),
            ("request_timeout_ms", Some("20000".into())),
        ],
    )
    .expect("loads");
    assert_eq!(c.quota_bytes, 3 << 29);
    assert_eq!(c.request_timeout_ms, 20_000);
}

fn load_error<T>(text: &str) -> String
where
    T: serde::de::DeserializeOwned + serde::Serialize + Default + std::fmt::Debug,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let path = file(&dir, "bad.toml", text);
    let err = load::<T>(Some(&path), &[]).expect_err("refused");
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[test]
fn a_bad_value_is_one_line_naming_the_key() {
    let err = load_error::<AgentConfig>("quota_bytes = \"100Gx\"\n");
    assert!(
        err.starts_with(
            r#"configuration: quota_bytes: unknown unit "Gx" in "100Gx"; write an integer (bytes) or a size such as "512MiB""#
        ),
        "{err}"
    );
    let err = load_error::<AgentConfig>("[mirror]\nfallback_after_ms = \"30 sec\"\n");
    assert!(
        err.starts_with(r#"configuration: mirror.fallback_after_ms: unknown unit "sec""#),
        "{err}"
    );
    let err = load_error::<AgentConfig>("upload_limit_bytes_per_sec = \"200Mb/s\"\n");
    assert!(
        err.starts_with(
            r#"configuration: upload_limit_bytes_per_sec: unknown unit "Mb/s" (write B for bytes, or bit for bits)"#
        ),
        "{err}"
    );
    let err = load_error::<CoordinatorConfig>("lease_ms = -5\n");
    assert!(
        err.starts_with("configuration: lease_ms: -5 is negative;"),
        "{err}"
    );
    let err = load_error::<CoordinatorConfig>("job_retention_hours = \"90m\"\n");
    assert!(
        err.starts_with(
            r#"configuration: job_retention_hours: not a whole number of hours in "90m""#
        ),
        "{err}"
    );
    let err = load_error::<AgentConfig>("chunk_size = \"8GiB\"\n");
    assert!(
        err.starts_with(
            r#"configuration: chunk_size: "8GiB" (8589934592) is too large: at most 4294967295 bytes"#
        ),
        "{err}"
    );
    let err =
        load_error::<AgentConfig>("[origin]\nmanifest_max_bytes = \"99999999999999999999\"\n");
    assert!(
        err.starts_with(
            "configuration: origin.manifest_max_bytes: too large (at most 18446744073709551615)"
        ),
        "{err}"
    );
}
