//! Locating the real tools (registry, skopeo, containerd) that the end-to-end tests start.
//!
//! The tests need them and never skip without them: a missing tool fails the test with the
//! command that installs it. `scripts/test-all.sh` installs all of them on a fresh machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The path of `binary` (a bare name looked up in `PATH`, or an absolute path).
///
/// # Panics
/// If it is not there or not executable, with a message naming the Debian package that
/// provides it: a test that needs a tool fails rather than skips.
pub fn require(binary: &str, apt_package: &str) -> PathBuf {
    find(binary).unwrap_or_else(|| {
        panic!(
            "{binary} not found: install it with `apt-get install {apt_package}` \
             (scripts/test-all.sh does)"
        )
    })
}

fn find(binary: &str) -> Option<PathBuf> {
    let candidate = Path::new(binary);
    if candidate.is_absolute() {
        return is_executable(candidate).then(|| candidate.to_path_buf());
    }
    let path = std::env::var_os("PATH")?;
    // Debian installs the daemons in /usr/sbin or /usr/bin; CI's PATH may lack sbin.
    let fallback = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin"];
    std::env::split_paths(&path)
        .chain(fallback.iter().map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Spawns a daemon with stdin closed and stdout and stderr appended to `log`.
pub fn spawn_logged(
    command: &mut std::process::Command,
    log: &Path,
) -> Result<std::process::Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    command
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawning {:?}", command.get_program()))
}

/// The last `lines` lines of `text`, for error messages that quote a daemon's log.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `command` to completion and returns its stdout; fails with its exit status and
/// stderr (and stdout, which some tools use for errors) if it does not succeed.
pub fn run(command: &mut Command) -> Result<String> {
    let shown = format!("{command:?}");
    let output = command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("spawning {shown}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{shown} failed ({}):\nstderr: {}\nstdout: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end(),
            tail(stdout.trim_end(), 20)
        );
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(
        expected = "no-such-tool not found: install it with `apt-get install no-such-pkg`"
    )]
    fn require_fails_with_the_install_command() {
        require("no-such-tool", "no-such-pkg");
    }

    #[test]
    fn require_finds_tools_in_path() {
        assert!(require("sh", "dash").is_absolute());
    }
}
