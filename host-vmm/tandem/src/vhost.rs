//! `tandem device-server vhost-blk`: the vhost-user-blk backend process
//! `tandem run` starts for each `--disk ...,if=vhost-blk` (it can also be
//! run by hand next to any QEMU). Its API socket answers `info` and
//! `checkpoint` (JSON lines, see `tandem_vhost_blk::api`); `tandem disk
//! checkpoint --disk ID` is the operator's way to the latter.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tandem_vhost_blk::api::{Request, Response};

#[derive(Args)]
pub struct VhostBlkArgs {
    /// The vhost-user socket QEMU connects to.
    #[arg(long)]
    socket: PathBuf,
    /// The disk (the top of its chain: raw, qcow2 or VHDX).
    #[arg(long)]
    disk: PathBuf,
    /// Offer the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// JSON-lines API: {"op":"info"} and {"op":"checkpoint"}.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// The serial number the guest reads (default tandem-<file stem>).
    #[arg(long)]
    serial: Option<String>,
    /// Lend the disk to a second path on this socket: an NVMe VF's
    /// namespace (`tandem nvme serve --vf-disk <socket>`).
    #[arg(long)]
    volume_socket: Option<PathBuf>,
}

pub fn device_server(args: VhostBlkArgs) -> Result<i32> {
    tandem_vhost_blk::run(tandem_vhost_blk::ServerConfig {
        socket: args.socket,
        disk: args.disk,
        readonly: args.readonly,
        api_socket: args.api_socket,
        serial: args.serial,
        volume_socket: args.volume_socket,
    })
    .context("vhost-user-blk backend")?;
    Ok(0)
}

/// `tandem disk checkpoint --disk ID [--vm NAME | --api-socket PATH]`:
/// asks the backend serving a running VM's disk to checkpoint it.
pub fn checkpoint_live(target: &crate::Target, disk: &str) -> Result<i32> {
    let index: usize = disk
        .strip_prefix("disk")
        .unwrap_or(disk)
        .parse()
        .map_err(|_| {
            anyhow::anyhow!("bad disk id {disk:?} (disk0, disk1, ... as `tandem info` shows)")
        })?;
    let api = target.api_socket.clone().unwrap_or_else(|| {
        tandem_vmm::config::default_run_dir().join(format!("{}.sock", target.vm))
    });
    let (_, backend) = tandem_vmm::vhost::socket_paths(&api.with_extension("devices"), index);
    let mut conn = UnixStream::connect(&backend).with_context(|| {
        format!(
            "disk{index} of the VM at {} has no vhost-blk backend answering on {} (only if=vhost-blk disks can be checkpointed live)",
            api.display(),
            backend.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut line = serde_json::to_string(&Request::Checkpoint)?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .context("no answer from the backend")?;
    match serde_json::from_str::<Response>(&answer)
        .with_context(|| format!("bad answer from the backend: {answer:?}"))?
    {
        Response::Checkpoint { sealed, elapsed_us } => {
            println!(
                "sealed the previous top as {sealed}; disk{index} continues on a new top layer (guest I/O held back {:.1} ms)",
                elapsed_us as f64 / 1000.0
            );
            Ok(0)
        }
        Response::Error { message } => bail!("checkpoint of disk{index} failed: {message}"),
        other => bail!("unexpected answer from the backend: {other:?}"),
    }
}
