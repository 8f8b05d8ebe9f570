//! vhost-user-blk backends for `--disk ...,if=vhost-blk`: one process
//! (`tandem device-server vhost-blk`) per disk, started before QEMU (which
//! connects to it while it starts), stopped after QEMU.
//!
//! Sockets live next to the control device's, in `<api socket>.devices/`:
//! `vhost-disk<i>.sock` (QEMU's connection) and `vhost-disk<i>.api` (the
//! backend's JSON-lines API: `{"op":"info"}`, `{"op":"checkpoint"}`), where
//! `i` is the disk's index (its id in `tandem info` is `disk<i>`), and
//! `vhost-disk<i>.volume`, where the backend lends the disk to a second
//! path: an NVMe VF whose namespace is this disk (`tandem nvme serve
//! --vf-disk <it>`; `tandem-volume`).
//!
//! Not supervised: if a backend dies, the guest's disk stops answering and
//! the VM keeps running (a vhost-user-blk device cannot be re-pointed at a
//! new process without QEMU's reconnect support, which this does not use).
//!
//! Shared disks (`--shared-disk`, F7) get the same treatment with a
//! vhost-user-scsi backend (`tandem device-server vhost-scsi`) that tunnels
//! the guest's SCSI commands to the file server: sockets
//! `vhost-shared<i>.sock` and `.api`, QEMU device `shared<i>`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_engine::cmdline::SocketChardev;
use tandem_engine::{DiskInterface, DiskSpec};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::config::SharedDisk;

/// How long a backend may take to say `ready` (it opens the whole chain).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a backend may take to flush and exit once QEMU has gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot start the vhost-user backend for {disk}")]
    Spawn {
        disk: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the vhost-user backend for {disk} did not become ready: {reason}")]
    NotReady { disk: PathBuf, reason: String },
}

/// A running backend.
pub struct VhostBackend {
    disk: PathBuf,
    socket: PathBuf,
    api_socket: PathBuf,
    child: Child,
    chardev_id: String,
    device: Value,
}

/// The backend sockets of disk `index` in `dir`: (vhost-user, API).
pub fn socket_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("vhost-disk{index}.sock")),
        dir.join(format!("vhost-disk{index}.api")),
    )
}

/// Where the backend of disk `index` in `dir` lends it to a second path
/// (`tandem-volume`: an NVMe VF's namespace, so that the VF and the
/// vhost-blk disk are two paths to one backend): the socket its spec
/// names, else `vhost-disk<index>.volume` in `dir`.
pub fn volume_socket(dir: &Path, index: usize, disk: &DiskSpec) -> PathBuf {
    disk.volume_socket
        .clone()
        .unwrap_or_else(|| dir.join(format!("vhost-disk{index}.volume")))
}

impl VhostBackend {
    /// Starts the backend for disk `index` and waits for `ready`.
    pub async fn spawn(
        exe: &Path,
        dir: &Path,
        index: usize,
        disk: &DiskSpec,
    ) -> Result<VhostBackend, VhostError> {
        let spawn_err = |source| VhostError::Spawn {
            disk: disk.path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(spawn_err)?;
        let (socket, api_socket) = socket_paths(dir, index);
        let mut cmd = Command::new(exe);
        let chardev_id = format!("vhost-disk{index}");
        let device = json!({
            "driver": "vhost-user-blk-pci",
            "id": format!("disk{index}"),
            "chardev": chardev_id,
            "num-queues": 1,
        });
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
            .arg("--volume-socket")
            .arg(volume_socket(dir, index, disk))
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
        Self::start(
            cmd,
            disk.path.clone(),
            socket,
            api_socket,
            chardev_id,
            device,
        )
        .await
    }

    /// Starts the vhost-user-scsi backend for shared disk `index`.
    pub async fn spawn_shared(
        exe: &Path,
        dir: &Path,
        index: usize,
        shared: &SharedDisk,
    ) -> Result<VhostBackend, VhostError> {
        let name = PathBuf::from(format!("{}:{}", shared.server, shared.disk));
        std::fs::create_dir_all(dir).map_err(|source| VhostError::Spawn {
            disk: name.clone(),
            source,
        })?;
        let (socket, api_socket) = shared_socket_paths(dir, index);
        let mut cmd = Command::new(exe);
        cmd.arg("device-server")
            .arg("vhost-scsi")
            .arg("--socket")
            .arg(&socket)
            .arg("--api-socket")
            .arg(&api_socket)
            .arg("--server")
            .arg(&shared.server)
            .arg("--disk")
            .arg(&shared.disk)
            .arg("--initiator")
            .arg(shared.initiator.as_deref().unwrap_or("tandem"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let chardev_id = format!("vhost-shared{index}");
        // One request queue; transfers within the tunnel's 8 MiB.
        let device = json!({
            "driver": "vhost-user-scsi-pci",
            "id": format!("shared{index}"),
            "chardev": chardev_id,
            "num_queues": 1,
            "max_sectors": 16384,
            "hotplug": false,
            "param_change": false,
        });
        Self::start(cmd, name, socket, api_socket, chardev_id, device).await
    }

    async fn start(
        mut cmd: Command,
        disk: PathBuf,
        socket: PathBuf,
        api_socket: PathBuf,
        chardev_id: String,
        device: Value,
    ) -> Result<VhostBackend, VhostError> {
        let spawn_err = |source| VhostError::Spawn {
            disk: disk.clone(),
            source,
        };
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
            disk: disk.clone(),
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
        info!(pid = child.id(), disk = %disk.display(), api = %api_socket.display(), "vhost-user backend running");
        Ok(VhostBackend {
            disk,
            socket,
            api_socket,
            child,
            chardev_id,
            device,
        })
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    pub fn chardev(&self) -> SocketChardev {
        SocketChardev {
            id: self.chardev_id.clone(),
            path: self.socket.clone(),
        }
    }

    /// The `-device` entry; its id is the disk's id in `tandem info`.
    pub fn device_json(&self) -> Value {
        self.device.clone()
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

/// The backend sockets of shared disk `index` in `dir`: (vhost-user, API).
pub fn shared_socket_paths(dir: &Path, index: usize) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("vhost-shared{index}.sock")),
        dir.join(format!("vhost-shared{index}.api")),
    )
}

/// Starts a backend for every vhost-blk disk and every shared disk, in
/// `dir`; the backend is this very binary (`tandem`, which has the
/// `device-server` command).
pub async fn start_all(
    dir: &Path,
    disks: &[DiskSpec],
    shared: &[SharedDisk],
) -> Result<Vec<VhostBackend>, VhostError> {
    let mut started = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if d.interface == DiskInterface::VhostBlk {
            let exe = std::env::current_exe().map_err(|source| VhostError::Spawn {
                disk: d.path.clone(),
                source,
            })?;
            started.push(VhostBackend::spawn(&exe, dir, i, d).await?);
        }
    }
    for (i, d) in shared.iter().enumerate() {
        let exe = std::env::current_exe().map_err(|source| VhostError::Spawn {
            disk: PathBuf::from(&d.disk),
            source,
        })?;
        started.push(VhostBackend::spawn_shared(&exe, dir, i, d).await?);
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
