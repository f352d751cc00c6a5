//! The container image `scripts/build-image.py` builds without Docker: the same binary gives
//! the same image digest; the image holds the binary, its libraries, CA roots and the
//! non-root user, and nothing else (no shell); it runs as 65532 from its own files alone
//! (chroot), and skopeo reads it as an OCI image with the Dockerfile's user and entrypoint.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); scripts/test-all.sh installs it"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the image of the test's `shoal` binary into `dir/out` (and `dir/out.tar`); returns
/// the manifest digest the script prints.
fn build(dir: &Path) -> String {
    let out = run(
        Command::new("python3")
            .arg(repo().join("scripts/build-image.py"))
            .args([
                "--binary",
                env!("CARGO_BIN_EXE_shoal"),
                "--tag",
                "ci",
                "--level",
                "1",
            ])
            .arg("--out")
            .arg(dir.join("out"))
            .arg("--archive")
            .arg(dir.join("out.tar"))
            .env("SOURCE_DATE_EPOCH", "1764806400"),
        "scripts/build-image.py",
    );
    out.trim().to_string()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn the_image_is_reproducible_minimal_and_runs_as_non_root() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let digest = build(a.path());
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(build(b.path()), digest, "two builds, two digests");
    assert_eq!(
        std::fs::read(a.path().join("out.tar")).expect("archive"),
        std::fs::read(b.path().join("out.tar")).expect("archive"),
        "the archives differ"
    );

    // What is in it: the binary, its libraries, CA roots, the user; no shell.
    let index = json(&std::fs::read_to_string(a.path().join("out/index.json")).expect("index"));
    let blob = |d: &str| {
        a.path()
            .join("out/blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let manifest = json(&std::fs::read_to_string(blob(&digest)).expect("manifest"));
    let layer = blob(manifest["layers"][0]["digest"].as_str().expect("layer"));
    let listing = run(Command::new("tar").arg("tzf").arg(&layer), "tar");
    let files: Vec<&str> = listing.lines().filter(|l| !l.ends_with('/')).collect();
    for want in [
        "usr/local/bin/shoal",
        "etc/passwd",
        "etc/group",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(files.contains(&want), "{want} missing: {files:?}");
    }
    let others: Vec<&&str> = (files.iter())
        .filter(|f| !f.starts_with("usr/local/bin/") && !f.starts_with("etc/"))
        .filter(|f| !(f.starts_with("lib") && f.contains(".so")))
        .collect();
    assert!(others.is_empty(), "unexpected files: {others:?}");
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with("/sh") || f.ends_with("bash"))
    );

    // It runs from its own files alone, as the non-root user.
    let root = a.path().join("rootfs");
    std::fs::create_dir(&root).expect("rootfs");
    run(
        Command::new("tar")
            .arg("xzf")
            .arg(&layer)
            .arg("-C")
            .arg(&root),
        "tar",
    );
    let version = run(
        Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&root)
            .args(["/usr/local/bin/shoal", "--version"]),
        "chroot",
    );
    assert_eq!(
        version.trim(),
        format!("shoal {}", env!("CARGO_PKG_VERSION")),
        "{version}"
    );

    // An OCI image skopeo reads, with the Dockerfile's user and entrypoint.
    let layout = format!("oci:{}:ci", a.path().join("out").display());
    let config = json(&run(
        Command::new("skopeo").args(["inspect", "--config", &layout]),
        "skopeo",
    ));
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/shoal"])
    );
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(config["architecture"], arch);
    let archive = format!("oci-archive:{}", a.path().join("out.tar").display());
    let inspected = json(&run(
        Command::new("skopeo").args(["inspect", &archive]),
        "skopeo",
    ));
    assert_eq!(inspected["Digest"], digest.as_str());
}
