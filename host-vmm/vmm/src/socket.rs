//! Claiming a Unix socket path for listening.
//!
//! A path that a live process still serves is refused (two VMs must never
//! share a control socket); a stale socket left by a dead process is
//! replaced; anything that is not a socket is never deleted.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(
        "socket {0} is in use by another process (another VM with the same name or --api-socket?)"
    )]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot create the directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Makes `path` free for a new listener: refuses a live socket, removes a
/// stale one, creates the parent directory.
pub fn prepare(path: &Path) -> Result<(), SocketError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| SocketError::Dir {
            path: parent.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if !meta.file_type().is_socket() => Err(SocketError::NotASocket(path.to_owned())),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(SocketError::InUse(path.to_owned())),
            Err(_) => {
                tracing::info!(path = %path.display(), "removing a stale socket");
                let _ = std::fs::remove_file(path);
                Ok(())
            }
        },
    }
}

/// Binds a listener on `path` after [`prepare`]; the guard removes the path
/// when dropped.
pub fn claim(path: &Path) -> Result<(tokio::net::UnixListener, SocketGuard), SocketError> {
    prepare(path)?;
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            SocketError::InUse(path.to_owned())
        } else {
            SocketError::Bind {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_owned(),
        },
    ))
}

/// Removes the socket path on drop.
pub struct SocketGuard {
    path: PathBuf,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn live_stale_and_foreign_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/vm.sock");
        let (listener, guard) = claim(&p).unwrap();
        // Live: refused.
        assert!(matches!(claim(&p), Err(SocketError::InUse(_))));
        // Stale: the listener is gone but the file stays.
        drop(listener);
        std::mem::forget(guard);
        assert!(p.exists());
        let (_l, guard) = claim(&p).unwrap();
        drop(guard);
        assert!(!p.exists(), "the guard removes the path");
        // A regular file is never deleted.
        std::fs::write(&p, b"precious").unwrap();
        assert!(matches!(claim(&p), Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
    }
}
