//! `tandem device-server vhost-blk`: the vhost-user-blk backend process
//! `tandem run` starts for each `--disk ...,if=vhost-blk` (it can also be
//! run by hand next to any QEMU). Its API socket answers `info` and
//! `checkpoint` (JSON lines, see `tandem_vhost_blk::api`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

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
}

pub fn device_server(args: VhostBlkArgs) -> Result<i32> {
    tandem_vhost_blk::run(tandem_vhost_blk::ServerConfig {
        socket: args.socket,
        disk: args.disk,
        readonly: args.readonly,
        api_socket: args.api_socket,
        serial: args.serial,
    })
    .context("vhost-user-blk backend")?;
    Ok(0)
}
