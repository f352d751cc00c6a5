use super::*;

use Quantity::*;

fn ok(q: Quantity, text: &str) -> u64 {
    q.parse(text)
        .unwrap_or_else(|e| panic!("{text:?} as {q:?}: {e}"))
}

fn err(q: Quantity, text: &str) -> String {
    match q.parse(text) {
        Ok(v) => panic!("{text:?} as {q:?} parsed as {v}"),
        Err(e) => e,
    }
}

#[test]
fn durations() {
    assert_eq!(ok(Milliseconds, "250ms"), 250);
    assert_eq!(ok(Milliseconds, "30s"), 30_000);
    assert_eq!(ok(Milliseconds, "5m"), 300_000);
    assert_eq!(ok(Milliseconds, "1h"), 3_600_000);
    assert_eq!(ok(Milliseconds, "1m30s"), 90_000);
    assert_eq!(ok(Milliseconds, "1h 2m 3s 4ms"), 3_723_004);
    assert_eq!(ok(Milliseconds, "1.5s"), 1_500);
    assert_eq!(ok(Milliseconds, " 30 s "), 30_000);
    assert_eq!(ok(Milliseconds, "1000"), 1_000);
    assert_eq!(ok(Milliseconds, "0"), 0);
    assert_eq!(ok(Seconds, "2m"), 120);
    assert_eq!(ok(Seconds, "2000ms"), 2);
    assert_eq!(ok(Seconds, "45"), 45);
    assert_eq!(ok(Hours, "7d"), 168);
    assert_eq!(ok(Hours, "1d12h"), 36);
    assert_eq!(ok(Hours, "120m"), 2);
}

#[test]
fn durations_refused() {
    let e = err(Milliseconds, "30 sec");
    assert!(
        e.starts_with(r#"unknown unit "sec" in "30 sec"; write an integer (milliseconds)"#),
        "{e}"
    );
    assert!(err(Milliseconds, "1.5ms").starts_with("not a whole number of milliseconds"));
    assert!(err(Seconds, "1500ms").starts_with("not a whole number of seconds"));
    assert!(err(Hours, "90m").starts_with("not a whole number of hours"));
    assert!(err(Milliseconds, "30s1m").starts_with("units out of order"));
    assert!(err(Milliseconds, "1s1s").starts_with("units out of order"));
    assert!(err(Milliseconds, "1m30").starts_with("a number without a unit (30) among others"));
    assert!(err(Milliseconds, "-5s").starts_with("a negative value"));
    assert!(err(Milliseconds, "").starts_with("empty value"));
    assert!(err(Milliseconds, "  ").starts_with("empty value"));
    assert!(err(Milliseconds, "s").starts_with(r#"expected a number at "s""#));
    assert!(err(Milliseconds, ".5s").starts_with("expected a number"));
    assert!(err(Milliseconds, "1.s").starts_with("a decimal point without digits"));
    assert!(err(Milliseconds, "1.0000000001s").starts_with("more than 9 digits"));
    // `M` is mega, not minutes.
    assert!(err(Milliseconds, "5M").starts_with(r#"unknown unit "M""#));
    // Sizes are not durations.
    assert!(err(Milliseconds, "5MiB").starts_with(r#"unknown unit "MiB""#));
}

#[test]
fn sizes() {
    assert_eq!(ok(Bytes, "1048576"), 1 << 20);
    assert_eq!(ok(Bytes, "100GiB"), 100 << 30);
    assert_eq!(ok(Bytes, "512MiB"), 512 << 20);
    assert_eq!(ok(Bytes, "10GB"), 10_000_000_000);
    assert_eq!(ok(Bytes, "1.5GiB"), 3 << 29);
    assert_eq!(ok(Bytes, "4 KiB"), 4096);
    assert_eq!(ok(Bytes, "1kB"), 1000);
    assert_eq!(ok(Bytes, "1KB"), 1000);
    assert_eq!(ok(Bytes, "64B"), 64);
    assert_eq!(ok(Bytes, "2PiB"), 2 << 50);
    // Kubernetes quantities, as the chart's values are written.
    assert_eq!(ok(Bytes, "100Gi"), 100 << 30);
    assert_eq!(ok(Bytes, "500G"), 500_000_000_000);
    assert_eq!(ok(Bytes, "16Mi"), 16 << 20);
    assert_eq!(ok(Bytes, "1k"), 1000);
    assert_eq!(ok(Bytes, "15PiB"), 15 << 50);
    assert_eq!(ok(Bytes, "18446744073709551615"), u64::MAX);
    assert_eq!(ok(Bytes, "16383PiB"), 16383 << 50);
}

#[test]
fn sizes_refused() {
    let e = err(Bytes, "100Gx");
    assert!(
        e.starts_with(
            r#"unknown unit "Gx" in "100Gx"; write an integer (bytes) or a size such as "512MiB""#
        ),
        "{e}"
    );
    assert!(err(Bytes, "10Mb").starts_with(r#"unknown unit "Mb" (bytes are B)"#));
    assert!(err(Bytes, "10gb").starts_with(r#"unknown unit "gb""#));
    assert!(err(Bytes, "1.1KiB").starts_with("not a whole number of bytes"));
    assert!(err(Bytes, "0.5").starts_with("not a whole number of bytes"));
    assert!(err(Bytes, "1GiB512MiB").starts_with("more than one number"));
    assert!(err(Bytes, "-1GiB").starts_with("a negative value"));
    assert!(err(Bytes, "25MB/s").starts_with(r#"unknown unit "MB/s""#));
    assert!(err(Bytes, "30s").starts_with(r#"unknown unit "s""#));
    assert!(err(Bytes, "1e9").starts_with(r#"unknown unit "e""#));
    assert!(err(Bytes, "1 000").starts_with("more than one number"));
    assert!(err(Bytes, "1_000").starts_with(r#"unknown unit "_""#));
}

#[test]
fn overflow_is_an_error() {
    let max = format!("too large (at most {})", u64::MAX);
    assert!(err(Bytes, "18446744073709551616").starts_with(&max));
    assert!(err(Bytes, "16384PiB").starts_with(&max));
    assert!(err(Bytes, &"9".repeat(60)).starts_with(&max));
    assert!(err(Milliseconds, "999999999999999999d").starts_with(&max));
    assert!(err(Hours, &format!("{}h", u128::MAX)).starts_with(&max));
}

#[test]
fn rates() {
    assert_eq!(ok(BytesPerSecond, "25000000"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "25MB"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "25MB/s"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "25MiB/s"), 25 << 20);
    assert_eq!(ok(BytesPerSecond, "64Ki"), 64 << 10);
    assert_eq!(ok(BytesPerSecond, "200Mbit/s"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "200Mbit"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "200Mbps"), 25_000_000);
    assert_eq!(ok(BytesPerSecond, "10Gbit/s"), 1_250_000_000);
    assert_eq!(ok(BytesPerSecond, "1.5Gbps"), 187_500_000);
    assert_eq!(ok(BytesPerSecond, "8Kibit/s"), 1024);
    assert_eq!(ok(BytesPerSecond, "8bit"), 1);
}

#[test]
fn rates_refused() {
    let e = err(BytesPerSecond, "200Mb/s");
    assert!(
        e.starts_with(r#"unknown unit "Mb/s" (write B for bytes, or bit for bits)"#),
        "{e}"
    );
    assert!(e.contains(r#""200Mbit/s""#), "{e}");
    assert!(err(BytesPerSecond, "12bit").starts_with("not a whole number of bytes per second"));
    assert!(err(BytesPerSecond, "1Gbps/s").starts_with(r#"unknown unit "Gbps/s""#));
    assert!(err(BytesPerSecond, "/s").starts_with("expected a number"));
    assert!(err(BytesPerSecond, "5/s").starts_with(r#"unknown unit "/s""#));
    assert!(err(BytesPerSecond, "1MBps").starts_with(r#"unknown unit "MBps""#));
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Keys {
    #[serde(default, deserialize_with = "millis")]
    timeout_ms: u64,
    #[serde(default, deserialize_with = "bytes")]
    buffer_bytes: usize,
    #[serde(default, deserialize_with = "bytes")]
    small_bytes: u16,
    #[serde(default, deserialize_with = "bytes_per_sec")]
    limit_bytes_per_sec: u64,
    #[serde(default, deserialize_with = "hours")]
    retention_hours: u64,
    #[serde(default, deserialize_with = "secs")]
    wait_secs: u32,
}

fn keys(json: &str) -> Result<Keys, String> {
    serde_json::from_str(json).map_err(|e| e.to_string())
}

#[test]
fn serde_takes_integers_and_strings() {
    let k = keys(
        r#"{"timeout_ms": "1m30s", "buffer_bytes": "4MiB", "small_bytes": 512,
            "limit_bytes_per_sec": "200Mbit/s", "retention_hours": "7d", "wait_secs": "90"}"#,
    )
    .expect("parses");
    assert_eq!(k.timeout_ms, 90_000);
    assert_eq!(k.buffer_bytes, 4 << 20);
    assert_eq!(k.small_bytes, 512);
    assert_eq!(k.limit_bytes_per_sec, 25_000_000);
    assert_eq!(k.retention_hours, 168);
    assert_eq!(k.wait_secs, 90);
    assert_eq!(keys(r#"{"timeout_ms": 250}"#).expect("int").timeout_ms, 250);
    // A whole float (a YAML or TOML writer's 1e9) is that integer.
    assert_eq!(
        keys(r#"{"buffer_bytes": 1e9}"#)
            .expect("float")
            .buffer_bytes,
        1_000_000_000
    );
}

#[test]
fn serde_errors_say_what_is_accepted() {
    let e = keys(r#"{"timeout_ms": -5}"#).unwrap_err();
    assert!(
        e.starts_with("-5 is negative; write an integer (milliseconds)"),
        "{e}"
    );
    let e = keys(r#"{"timeout_ms": 1.5}"#).unwrap_err();
    assert!(
        e.starts_with("1.5 is not a whole number of milliseconds;"),
        "{e}"
    );
    let e = keys(r#"{"timeout_ms": true}"#).unwrap_err();
    assert!(
        e.contains("expected an integer (milliseconds) or a duration"),
        "{e}"
    );
    let e = keys(r#"{"small_bytes": "1MiB"}"#).unwrap_err();
    assert!(
        e.starts_with(r#""1MiB" (1048576) is too large: at most 65535 bytes"#),
        "{e}"
    );
    let e = keys(r#"{"small_bytes": 70000}"#).unwrap_err();
    assert!(
        e.starts_with("70000 is too large: at most 65535 bytes"),
        "{e}"
    );
    let e = keys(r#"{"buffer_bytes": 1e30}"#).unwrap_err();
    assert!(e.contains("too large"), "{e}");
    let e = keys(r#"{"buffer_bytes": "lots"}"#).unwrap_err();
    assert!(
        e.starts_with(r#"expected a number at "lots" in "lots"; write an integer (bytes)"#),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");
}
