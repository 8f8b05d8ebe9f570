//! vhost-user-blk backends for `--disk ...,if=vhost-blk`: one process
//! (`tandem device-server vhost-blk`) per disk, started before QEMU (which
//! connects to it while it starts), stopped after QEMU.
//!
//! Sockets live next to the control device's, in `<api socket>.devices/`:
//! `vhost-disk<i>.sock` (QEMU's connection) and `vhost-disk<i>.api` (the
//! backend's JSON-lines API: `{"op":"info"}`, `{"op":"checkpoint"}`), where
//! `i` is the disk's index (its id in `tandem info` is `disk<i>`).
//!
//! Not supervised: if a backend dies, the guest's disk stops answering and
//! the VM keeps running (a vhost-user-blk device cannot be re-pointed at a
//! new process without QEMU's reconnect support, which this does not use).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_engine::cmdline::SocketChardev;
use tandem_engine::{DiskInterface, DiskSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// How long a backend may take to say `ready` (it opens the whole chain).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a backend may take to flush and exit once QEMU has gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot start the vhost-user-blk backend for {disk}")]
    Spawn {
        disk: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vhost-user-blk backend for {disk} did not become ready: {reason}")]
    NotReady { disk: PathBuf, reason: String },
}

/// A running backend.
pub struct VhostBlkBackend {
    index: usize,
    disk: PathBuf,
    socket: PathBuf,
    api_socket: PathBuf,
    child: Child,
}

/// The backend sockets of disk `index` in `dir`: (vhost-user, API).
pub fn socket_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("vhost-disk{index}.sock")),
        dir.join(format!("vhost-disk{index}.api")),
    )
}

impl VhostBlkBackend {
    /// Starts the backend for disk `index` and waits for `ready`.
    pub async fn spawn(
        exe: &Path,
        dir: &Path,
        index: usize,
        disk: &DiskSpec,
    ) -> Result<VhostBlkBackend, VhostError> {
        let spawn_err = |source| VhostError::Spawn {
            disk: disk.path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(spawn_err)?;
        let (socket, api_socket) = socket_paths(dir, index);
        let mut cmd = Command::new(exe);
        cmd.arg("device-server")
            .arg("vhost-blk")
            .arg("--socket")
            .arg(&socket)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--disk")
            .arg(&disk.path)
            .arg("--serial")
            .arg(format!("tandem-disk{index}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group: a Ctrl-C reaches tandem, which stops QEMU
            // first; the backend then flushes and exits by itself.
            .process_group(0)
            .kill_on_drop(true);
        if disk.readonly {
            cmd.arg("--readonly");
        }
        // SAFETY: runs in the child between fork and exec; prctl(2) is
        // async-signal-safe and touches no parent memory.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let not_ready = |reason: String| VhostError::NotReady {
            disk: disk.path.clone(),
            reason,
        };
        let Some(out) = child.stdout.take() else {
            return Err(not_ready("no stdout".into()));
        };
        let mut lines = BufReader::new(out).lines();
        match tokio::time::timeout(READY_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(l))) if l.trim() == "ready" => {}
            Ok(Ok(other)) => {
                let _ = child.start_kill();
                return Err(not_ready(match other {
                    None => "it exited (see its error above)".into(),
                    Some(l) => format!("it said {l:?}"),
                }));
            }
            Ok(Err(e)) => return Err(not_ready(e.to_string())),
            Err(_) => {
                let _ = child.start_kill();
                return Err(not_ready(format!("nothing within {READY_TIMEOUT:?}")));
            }
        }
        info!(pid = child.id(), disk = %disk.path.display(), api = %api_socket.display(), "vhost-user-blk backend running");
        Ok(VhostBlkBackend {
            index,
            disk: disk.path.clone(),
            socket,
            api_socket,
            child,
        })
    }

    fn chardev_id(&self) -> String {
        format!("vhost-disk{}", self.index)
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    pub fn chardev(&self) -> SocketChardev {
        SocketChardev {
            id: self.chardev_id(),
            path: self.socket.clone(),
        }
    }

    /// The `-device` entry; its id is the disk's id in `tandem info`.
    pub fn device_json(&self) -> Value {
        json!({
            "driver": "vhost-user-blk-pci",
            "id": format!("disk{}", self.index),
            "chardev": self.chardev_id(),
            "num-queues": 1,
        })
    }

    /// Once QEMU is gone the backend sees the disconnect, flushes and
    /// exits; give it the time to, then kill it.
    pub async fn stop(mut self) {
        match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => {
                warn!(disk = %self.disk.display(), status = %s, "the vhost-user-blk backend failed")
            }
            Ok(Err(e)) => {
                warn!(disk = %self.disk.display(), error = %e, "cannot wait for the vhost-user-blk backend")
            }
            Err(_) => {
                warn!(disk = %self.disk.display(), "the vhost-user-blk backend did not exit; killing it");
                let _ = self.child.kill().await;
            }
        }
    }
}

/// Starts a backend for every vhost-blk disk, in `dir`; the backend is
/// this very binary (`tandem`, which has the `device-server` command).
pub async fn start_all(dir: &Path, disks: &[DiskSpec]) -> Result<Vec<VhostBlkBackend>, VhostError> {
    let mut started = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if d.interface == DiskInterface::VhostBlk {
            let exe = std::env::current_exe().map_err(|source| VhostError::Spawn {
                disk: d.path.clone(),
                source,
            })?;
            started.push(VhostBlkBackend::spawn(&exe, dir, i, d).await?);
        }
    }
    Ok(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_named_after_the_disk_index() {
        let (s, a) = socket_paths(Path::new("/run/t/vm0.devices"), 2);
        assert_eq!(s, Path::new("/run/t/vm0.devices/vhost-disk2.sock"));
        assert_eq!(a, Path::new("/run/t/vm0.devices/vhost-disk2.api"));
    }
}
