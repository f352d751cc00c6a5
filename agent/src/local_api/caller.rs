//! Who may do what on the local socket. The socket is mode 0660 (the agent's user, root,
//! and `local_socket_group`), and each request's caller is known from the socket's peer
//! credentials (`SO_PEERCRED`): root and the agent's own user may push any file the agent
//! can read and write any file it can write; anyone else only under
//! `local_allowed_paths`, since the agent would otherwise read and write paths on their
//! behalf that they could not touch themselves.

use std::path::{Path, PathBuf};

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

/// The caller of one request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    /// None when the transport gave no credentials (then nothing beyond status is allowed).
    uid: Option<u32>,
}

impl Caller {
    pub(crate) fn of<T>(request: &Request<T>) -> Self {
        let uid = (request.extensions().get::<UdsConnectInfo>())
            .and_then(|info| info.peer_cred)
            .map(|cred| cred.uid());
        Self { uid }
    }

    /// Whether this caller may have the agent fetch a URL: only root and the agent's own
    /// user (a URL is fetched from the agent's network position, with its configured
    /// origin headers).
    pub(crate) fn may_fetch_url(&self) -> Result<(), Status> {
        if self.privileged() {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{} may not have the agent fetch a URL: only root and the agent's own user may",
            self.who()
        )))
    }

    /// Whether this caller may drain the agent: only root and the agent's own user (a pod's
    /// preStop runs as the agent's user).
    pub(crate) fn may_drain(&self) -> Result<(), Status> {
        if self.privileged() {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{} may not drain the agent: only root and the agent's own user may",
            self.who()
        )))
    }

    /// Root, or the agent's own user.
    fn privileged(&self) -> bool {
        self.uid
            .is_some_and(|u| u == 0 || u == rustix::process::geteuid().as_raw())
    }

    fn who(&self) -> String {
        self.uid
            .map_or_else(|| "an unknown caller".into(), |u| format!("uid {u}"))
    }

    /// Whether this caller may have the agent fetch at all (push, pull).
    pub(crate) fn may_transfer(&self, allowed: &[PathBuf]) -> Result<(), Status> {
        if self.privileged() || !allowed.is_empty() {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{} may only ask for status: the agent's local_allowed_paths is empty (root and the agent's own user may do anything)",
            self.who()
        )))
    }

    /// Whether this caller may have the agent read `file` (push).
    pub(crate) fn may_read(&self, file: &Path, allowed: &[PathBuf]) -> Result<(), Status> {
        if self.privileged() {
            return Ok(());
        }
        // Resolved: a symbolic link inside an allowed directory may point anywhere.
        let real = std::fs::canonicalize(file)
            .map_err(|e| Status::not_found(format!("{}: {e}", file.display())))?;
        self.inside(&real, file, allowed)
    }

    /// Whether this caller may have the agent write `file` (pull -o): its directory,
    /// resolved, must be allowed, and the file itself must not be a symbolic link.
    pub(crate) fn may_write(&self, file: &Path, allowed: &[PathBuf]) -> Result<(), Status> {
        if self.privileged() {
            return Ok(());
        }
        let (Some(dir), Some(name)) = (file.parent(), file.file_name()) else {
            return Err(Status::invalid_argument(format!(
                "{}: not a file path",
                file.display()
            )));
        };
        let real_dir = std::fs::canonicalize(dir)
            .map_err(|e| Status::not_found(format!("{}: {e}", dir.display())))?;
        if std::fs::symlink_metadata(file).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Status::permission_denied(format!(
                "{}: a symbolic link; give the path it names",
                file.display()
            )));
        }
        self.inside(&real_dir.join(name), file, allowed)
    }

    fn inside(&self, real: &Path, given: &Path, allowed: &[PathBuf]) -> Result<(), Status> {
        let ok = allowed.iter().any(|dir| {
            std::fs::canonicalize(dir).is_ok_and(|dir| real.starts_with(&dir) && real != dir)
        });
        if ok {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{} may not have the agent use {}: not under the agent's local_allowed_paths {allowed:?}",
            self.who(),
            given.display()
        )))
    }
}
