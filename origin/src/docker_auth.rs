//! Registry credentials the way clusters keep them: a Docker `config.json` (what a
//! `kubernetes.io/dockerconfigjson` Secret holds as `.dockerconfigjson`), with its `auths`
//! entries and its credential helpers (`credHelpers`, `credsStore`: the program
//! `docker-credential-<name>`, asked with `get`).
//!
//! The file is read at each lookup (each token fetch or Basic retry, not each request), so a
//! rotated Secret is picked up without a restart.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::OriginError;
use crate::config::Credentials;

/// How long a credential helper may take.
const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The key Docker writes for Docker Hub, and what its helpers are asked for.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

/// A registry name as written in `auths` keys, reduced to the host (and port): no scheme, no
/// path; Docker Hub's aliases are one name.
fn normalize(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> OriginError {
    OriginError::Unauthorized(format!("registry auth file {}: {what}", path.display()))
}

/// The credentials `path` gives for `registry` (`docker.io`, `ghcr.io`, `host:port`), if any.
pub(crate) fn lookup(path: &Path, registry: &str) -> Result<Option<Credentials>, OriginError> {
    let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(path, format!("not JSON: {e}")))?;
    let want = normalize(registry);
    if let Some(helper) = (json.get("credHelpers").and_then(|h| h.as_object()))
        .and_then(|h| h.iter().find(|(k, _)| normalize(k) == want))
        .and_then(|(_, v)| v.as_str())
    {
        return ask_helper(path, helper, &want);
    }
    if let Some(auths) = json.get("auths").and_then(|a| a.as_object()) {
        if let Some((_, entry)) = auths.iter().find(|(k, _)| normalize(k) == want) {
            return from_entry(path, &want, entry).map(Some);
        }
    }
    match json.get("credsStore").and_then(|s| s.as_str()) {
        Some(helper) if !helper.is_empty() => ask_helper(path, helper, &want),
        _ => Ok(None),
    }
}

/// An `auths` entry: `auth` (base64 of `user:password`), or `username` and `password`.
fn from_entry(
    path: &Path,
    registry: &str,
    entry: &serde_json::Value,
) -> Result<Credentials, OriginError> {
    let field = |name: &str| entry.get(name).and_then(|v| v.as_str()).unwrap_or("");
    if !field("auth").is_empty() {
        let decoded = base64_decode(field("auth"))
            .ok_or_else(|| invalid(path, format!("{registry}: `auth` is not base64")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| invalid(path, format!("{registry}: `auth` is not UTF-8")))?;
        let (username, password) = text
            .split_once(':')
            .ok_or_else(|| invalid(path, format!("{registry}: `auth` is not `user:password`")))?;
        return Ok(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        });
    }
    if !field("username").is_empty() {
        return Ok(Credentials {
            username: field("username").to_string(),
            password: field("password").to_string(),
        });
    }
    Err(invalid(
        path,
        format!(
            "{registry}: the entry has neither `auth` nor `username` (identity tokens are not supported)"
        ),
    ))
}

/// Runs `docker-credential-<helper> get` with the registry on stdin, as Docker does.
/// "Not found" (exit status non-zero with that message) is no credentials, not an error.
fn ask_helper(
    path: &Path,
    helper: &str,
    registry: &str,
) -> Result<Option<Credentials>, OriginError> {
    if helper.is_empty()
        || !helper
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(path, format!("credential helper name {helper:?}")));
    }
    let server = if registry == "docker.io" {
        DOCKER_HUB_SERVER.to_string()
    } else {
        registry.to_string()
    };
    ask_program(path, &format!("docker-credential-{helper}"), &server)
}

/// The credential helper protocol: `<program> get`, the server on stdin, JSON out.
fn ask_program(
    path: &Path,
    program: &str,
    server: &str,
) -> Result<Option<Credentials>, OriginError> {
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| invalid(path, format!("running {program}: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    // A helper that hangs (a locked keychain prompting nobody) must not hold the caller.
    let deadline = std::time::Instant::now() + HELPER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(invalid(
                    path,
                    format!("{program} get {server} did not answer within {HELPER_TIMEOUT:?}"),
                ));
            }
            Err(e) => return Err(invalid(path, format!("running {program}: {e}"))),
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| invalid(path, format!("running {program}: {e}")))?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if said.to_ascii_lowercase().contains("not found") {
            return Ok(None);
        }
        return Err(invalid(
            path,
            format!("{program} get {server}: {} {}", out.status, said.trim()),
        ));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| invalid(path, format!("{program} answered no JSON: {e}")))?;
    let username = json.get("Username").and_then(|v| v.as_str()).unwrap_or("");
    let secret = json.get("Secret").and_then(|v| v.as_str()).unwrap_or("");
    if username.is_empty() || username == "<token>" {
        return Err(invalid(
            path,
            format!("{program} gave no username for {server} (identity tokens are not supported)"),
        ));
    }
    Ok(Some(Credentials {
        username: username.to_string(),
        password: secret.to_string(),
    }))
}

/// Standard base64, padded or not; None if malformed.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
    let text = text.trim();
    (STANDARD.decode(text).ok()).or_else(|| STANDARD_NO_PAD.decode(text).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(json: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(f.path(), json).expect("write");
        f
    }

    #[test]
    fn entries_match_by_host_whatever_the_key_looks_like() {
        // "alice:s3cr:et" and "bob:pw" in base64.
        let f = file(
            r#"{"auths": {
                "https://index.docker.io/v1/": {"auth": "YWxpY2U6czNjcjpldA=="},
                "http://127.0.0.1:5000/v2/": {"auth": "Ym9iOnB3"},
                "ghcr.io": {"username": "carol", "password": "tok"}
            }}"#,
        );
        let get = |r: &str| {
            lookup(f.path(), r)
                .expect("lookup")
                .map(|c| (c.username, c.password))
        };
        assert_eq!(get("docker.io"), Some(("alice".into(), "s3cr:et".into())));
        assert_eq!(get("127.0.0.1:5000"), Some(("bob".into(), "pw".into())));
        assert_eq!(get("GHCR.io"), Some(("carol".into(), "tok".into())));
        assert_eq!(get("quay.io"), None);
    }

    #[test]
    fn a_credential_helper_is_asked_with_the_protocol_docker_uses() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let asked = dir.path().join("asked");
        let helper = dir.path().join("docker-credential-test");
        // A real program: `get`, the server on stdin; "not found" for one registry.
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 3\nread server\necho \"$server\" >> {}\n\
                 [ \"$server\" = nobody.example ] && {{ echo 'credentials not found in native keychain'; exit 1; }}\n\
                 [ \"$server\" = broken.example ] && {{ echo 'keychain locked' >&2; exit 1; }}\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"dave\",\"Secret\":\"pw\"}}' \"$server\"\n",
                asked.display()
            ),
        )
        .expect("write helper");
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let program = helper.to_str().expect("utf-8");
        let conf = Path::new("config.json");
        let got = ask_program(conf, program, DOCKER_HUB_SERVER).expect("asked");
        assert_eq!(
            got.map(|c| (c.username, c.password)),
            Some(("dave".into(), "pw".into()))
        );
        assert!(
            ask_program(conf, program, "nobody.example")
                .expect("not found is no error")
                .is_none()
        );
        let e = ask_program(conf, program, "broken.example")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keychain locked"), "{e}");
        assert_eq!(
            std::fs::read_to_string(&asked).expect("asked"),
            format!("{DOCKER_HUB_SERVER}\nnobody.example\nbroken.example\n")
        );
        // A helper that is not installed is named in the error.
        let f = file(r#"{"credsStore": "shoal-absent-helper"}"#);
        let e = lookup(f.path(), "quay.io").unwrap_err().to_string();
        assert!(e.contains("docker-credential-shoal-absent-helper"), "{e}");
    }

    #[test]
    fn broken_files_and_entries_are_clear_errors() {
        let missing = Path::new("/nonexistent/config.json");
        let e = lookup(missing, "docker.io").unwrap_err().to_string();
        assert!(e.contains("/nonexistent/config.json"), "{e}");
        let f = file("{not json");
        assert!(
            lookup(f.path(), "docker.io")
                .unwrap_err()
                .to_string()
                .contains("not JSON")
        );
        let f = file(r#"{"auths": {"ghcr.io": {"auth": "%%%"}}}"#);
        assert!(
            lookup(f.path(), "ghcr.io")
                .unwrap_err()
                .to_string()
                .contains("base64")
        );
        let f = file(r#"{"auths": {"ghcr.io": {"identitytoken": "x"}}}"#);
        assert!(
            lookup(f.path(), "ghcr.io")
                .unwrap_err()
                .to_string()
                .contains("identity")
        );
        let f = file(r#"{"credHelpers": {"ghcr.io": "../../bin/sh"}}"#);
        assert!(
            lookup(f.path(), "ghcr.io")
                .unwrap_err()
                .to_string()
                .contains("helper name")
        );
    }
}
