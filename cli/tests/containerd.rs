//! `shoal containerd-config` as an init container runs it: real files in a directory, read
//! back with a TOML parser the way containerd reads them.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .expect("run shoal")
}

fn read_hosts(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(toml::from_str(&text)?)
}

/// The capabilities of the `[host."<mirror>"]` table.
fn mirror_capabilities(hosts: &toml::Table, mirror: &str) -> Vec<String> {
    let host = hosts
        .get("host")
        .and_then(|h| h.as_table())
        .expect("a [host] table");
    host.get(mirror)
        .and_then(|m| m.get("capabilities"))
        .and_then(|c| c.as_array())
        .expect("capabilities of the mirror")
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn writes_one_hosts_file_per_registry_and_the_default() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs.d");
    let out = shoal(&[
        "containerd-config",
        "--registry",
        "docker.io",
        "--registry",
        "registry.example:5000",
        "--default",
        "--dir",
        certs.to_str().context("utf8")?,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    let docker = read_hosts(&certs.join("docker.io/hosts.toml"))?;
    assert_eq!(
        docker.get("server").and_then(|s| s.as_str()),
        Some("https://registry-1.docker.io")
    );
    assert_eq!(
        mirror_capabilities(&docker, "http://127.0.0.1:7403"),
        ["pull", "resolve"]
    );
    let hosts = docker.get("host").and_then(|h| h.as_table());
    assert_eq!(
        hosts.map(|h| h.len()),
        Some(1),
        "a new file's one host is the mirror"
    );

    let private = read_hosts(&certs.join("registry.example:5000/hosts.toml"))?;
    assert_eq!(
        private.get("server").and_then(|s| s.as_str()),
        Some("https://registry.example:5000")
    );
    assert_eq!(
        mirror_capabilities(&private, "http://127.0.0.1:7403"),
        ["pull", "resolve"]
    );

    // `_default` has no server: containerd falls back to the registry the image names.
    let default = read_hosts(&certs.join("_default/hosts.toml"))?;
    assert!(default.get("server").is_none(), "{default:?}");
    assert_eq!(
        mirror_capabilities(&default, "http://127.0.0.1:7403"),
        ["pull", "resolve"]
    );

    // Each written path is printed; no temporary file is left behind.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    for entry in std::fs::read_dir(certs.join("docker.io"))? {
        let name = entry?.file_name();
        assert_eq!(name, "hosts.toml", "stray file {name:?}");
    }
    Ok(())
}

#[test]
fn adds_the_mirror_to_an_existing_file_and_keeps_what_it_says() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("ghcr.io/hosts.toml");
    std::fs::create_dir_all(file.parent().context("parent")?)?;
    std::fs::write(
        &file,
        "server = \"https://ghcr-proxy.internal\"\nca = \"/etc/certs/ca.pem\"\n\n\
         [host.\"https://other.internal\"]\n  capabilities = [\"pull\"]\n",
    )?;
    let dir_arg = dir.path().to_str().context("utf8")?;
    let config = |extra: &[&str]| -> Result<()> {
        let mut args = vec!["containerd-config", "--registry", "ghcr.io"];
        args.extend(["--mirror", "http://10.1.2.3:7403", "--dir", dir_arg]);
        args.extend(extra);
        let out = shoal(&args);
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    config(&[])?;
    let hosts = read_hosts(&file)?;
    assert_eq!(
        hosts.get("server").and_then(|s| s.as_str()),
        Some("https://ghcr-proxy.internal"),
        "the file's own server stays"
    );
    assert_eq!(
        hosts.get("ca").and_then(|s| s.as_str()),
        Some("/etc/certs/ca.pem")
    );
    assert_eq!(
        mirror_capabilities(&hosts, "http://10.1.2.3:7403"),
        ["pull", "resolve"]
    );
    assert_eq!(
        mirror_capabilities(&hosts, "https://other.internal"),
        ["pull"]
    );
    let text = std::fs::read_to_string(&file)?;
    assert!(
        text.find("10.1.2.3").context("ours")? < text.find("other.internal").context("theirs")?,
        "the mirror is tried first: {text}"
    );

    // --remove takes only the mirror out.
    config(&["--remove"])?;
    let hosts = read_hosts(&file)?;
    let host_table = hosts
        .get("host")
        .and_then(|h| h.as_table())
        .context("hosts")?;
    assert!(
        !host_table.contains_key("http://10.1.2.3:7403"),
        "{hosts:?}"
    );
    assert!(
        host_table.contains_key("https://other.internal"),
        "{hosts:?}"
    );
    assert!(hosts.contains_key("ca"), "{hosts:?}");
    Ok(())
}

#[test]
fn bad_registry_names_exit_2_with_one_line_and_write_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let target = dir.path().to_str().context("utf8")?;
    for bad in [
        "../escape",
        "https://docker.io",
        "bad_name.io",
        "host:99999",
    ] {
        let out = shoal(&["containerd-config", "--registry", bad, "--dir", target]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{bad}: {stderr}");
        assert!(stderr.contains("registry"), "{bad}: {stderr}");
    }
    let out = shoal(&["containerd-config", "--dir", target]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--registry"));
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "nothing written");
    Ok(())
}

/// `--hold`, as the chart's sidecar runs it: the files are there while it runs, and at
/// SIGTERM the mirror is taken out again (a file that was the user's before keeps what it
/// said; a file of its own is deleted) and it exits 0.
#[test]
fn hold_writes_then_takes_the_mirror_out_at_sigterm() -> Result<()> {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs.d");
    let users = certs.join("ghcr.io/hosts.toml");
    std::fs::create_dir_all(users.parent().context("parent")?)?;
    let before = "server = \"https://ghcr.io\"\nca = \"/etc/ssl/ghcr.pem\"\n";
    std::fs::write(&users, before)?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "containerd-config",
            "--registry",
            "ghcr.io",
            "--default",
            "--hold",
        ])
        .arg("--dir")
        .arg(&certs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let own = certs.join("_default/hosts.toml");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(own.exists() && std::fs::read_to_string(&users)?.contains("127.0.0.1:7403")) {
        ensure!(Instant::now() < deadline, "--hold never wrote its files");
        ensure!(child.try_wait()?.is_none(), "--hold exited before a signal");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still running, files still there: it holds.
    std::thread::sleep(Duration::from_millis(300));
    ensure!(child.try_wait()?.is_none(), "--hold exited before a signal");
    assert_eq!(
        mirror_capabilities(&read_hosts(&own)?, "http://127.0.0.1:7403"),
        ["pull", "resolve"]
    );

    let pid = i32::try_from(child.id())?;
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(killed.success(), "kill -TERM failed");
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "--hold after SIGTERM: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!own.exists(), "a file of its own is deleted at SIGTERM");
    let left = read_hosts(&users)?;
    assert!(
        left.get("host").is_none(),
        "the mirror is out of the user's file: {left:?}"
    );
    assert_eq!(
        left.get("ca").and_then(|c| c.as_str()),
        Some("/etc/ssl/ghcr.pem")
    );
    assert_eq!(
        left.get("server").and_then(|c| c.as_str()),
        Some("https://ghcr.io")
    );
    Ok(())
}

#[test]
fn hold_and_remove_together_are_a_usage_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = shoal(&[
        "containerd-config",
        "--registry",
        "ghcr.io",
        "--hold",
        "--remove",
        "--dir",
        dir.path().to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remove"));
}
