//! `tandem share`: serve disks to other hosts' initiators; the SCSI engine
//! and its persistent reservations are `tandem_scsi`'s, the transports
//! `tandem_iscsi`'s (iSCSI) and `tandem_share`'s (the SCSI tunnel that
//! VMs' virtio-scsi disks use: `tandem share serve`, and the operator's
//! `create`, `list` and `clear`).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tandem_iscsi::server::{LunSpec, Server, ServerConfig};
use tandem_share::api;

#[derive(Subcommand)]
pub enum ShareCmd {
    /// Serve disks as LUNs of one iSCSI target (RFC 7143), with SCSI-3
    /// persistent reservations; stays in the foreground.
    Iscsi {
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:3260")]
        listen: SocketAddr,
        /// A disk (raw, qcow2 or VHDX chain top): PATH[,lun=N][,ro]; the
        /// LUN defaults to the disk's position (0, 1, ...). Repeatable.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The target's iSCSI qualified name.
        #[arg(long)]
        iqn: String,
        /// Directory for the reservation state of each LUN (kept across
        /// restarts when an initiator registered with APTPL).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// The file server for shared VM disks: executes the SCSI commands
    /// VMs' vhost-user-scsi backends tunnel to it on disk files under
    /// --dir, with reservations shared by every initiator and saved
    /// (APTPL) across restarts; stays in the foreground.
    Serve {
        /// Disks are files under this directory, named by relative path.
        #[arg(long)]
        dir: PathBuf,
        /// Address and port to listen on.
        #[arg(long, default_value = "127.0.0.1:3270")]
        listen: SocketAddr,
        /// Where each disk's reservation state lives (default DIR/.tandem-share).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The operator API socket (default STATE_DIR/api.sock).
        #[arg(long)]
        api_socket: Option<PathBuf>,
    },
    /// Create a shared disk (raw or qcow2) under a served directory.
    Create {
        /// The served directory.
        #[arg(long)]
        dir: PathBuf,
        /// The disk's name: a relative path under --dir.
        name: String,
        /// Virtual size (bytes, or with K/M/G/T).
        #[arg(long, short = 's', value_parser = crate::disk::parse_size)]
        size: u64,
        /// raw (default) or qcow2.
        #[arg(long, short = 'f', default_value = "raw")]
        format: String,
    },
    /// List the served disks, their initiators, registrations and reservation.
    List {
        #[command(flatten)]
        api: ApiArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove every registration and the reservation of a disk (as an
    /// operator, e.g. after a cluster lost its members).
    Clear {
        #[command(flatten)]
        api: ApiArg,
        /// The disk's name on the server.
        #[arg(long)]
        disk: String,
    },
}

#[derive(Args)]
pub struct ApiArg {
    /// The file server's API socket (`tandem share serve` prints it).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Or the served directory: its default API socket.
    #[arg(long, conflicts_with = "api_socket")]
    dir: Option<PathBuf>,
}

impl ApiArg {
    fn path(&self) -> Result<PathBuf> {
        match (&self.api_socket, &self.dir) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(d)) => Ok(d.join(".tandem-share").join("api.sock")),
            (None, None) => bail!("give --api-socket or --dir"),
        }
    }
}

/// One request to the file server's API.
fn ask(path: &Path, req: &api::Request) -> Result<api::Response> {
    let mut conn = UnixStream::connect(path)
        .with_context(|| format!("no file server answers on {}", path.display()))?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .context("no answer from the file server")?;
    serde_json::from_str(&answer).with_context(|| format!("bad answer {answer:?}"))
}

fn print_list(epoch: u64, disks: &[api::DiskInfo]) {
    println!("server epoch {epoch:#x}; {} disk(s) open", disks.len());
    for d in disks {
        println!(
            "{}: {} blocks{}, generation {}, APTPL {}",
            d.disk,
            d.blocks,
            if d.read_only { " (read-only)" } else { "" },
            d.generation,
            if d.aptpl { "on" } else { "off" }
        );
        match &d.reservation {
            Some(r) => println!(
                "  reservation: {} (type {}) held by {}",
                r.kind, r.code, r.holder
            ),
            None => println!("  reservation: none"),
        }
        if d.registrations.is_empty() {
            println!("  registrations: none");
        }
        for r in &d.registrations {
            println!("  registered: {} key {}", r.initiator, r.key);
        }
        for i in &d.initiators {
            println!(
                "  initiator: {} {} (last command {}, {} running, {} commands, {} replayed)",
                i.name,
                if i.connected {
                    "connected"
                } else {
                    "disconnected"
                },
                i.last_seq,
                i.running,
                i.commands,
                i.replayed
            );
        }
    }
}

fn parse_disk(spec: &str, index: usize) -> Result<LunSpec> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .context("--disk needs a path")?;
    let mut lun = u16::try_from(index).context("too many disks")?;
    let mut read_only = false;
    for opt in parts {
        match opt.split_once('=') {
            Some(("lun", n)) => {
                lun = n.parse().with_context(|| format!("bad LUN {n:?}"))?;
                if lun > tandem_scsi::target::MAX_LUN {
                    bail!("LUN {lun} is above {}", tandem_scsi::target::MAX_LUN);
                }
            }
            None if opt == "ro" => read_only = true,
            _ => bail!("unknown --disk option {opt:?} (lun=N, ro)"),
        }
    }
    Ok(LunSpec {
        lun,
        path: PathBuf::from(path),
        read_only,
    })
}

pub fn share(cmd: ShareCmd) -> Result<i32> {
    match cmd {
        ShareCmd::Iscsi {
            listen,
            disks,
            iqn,
            state_dir,
        } => {
            let luns = disks
                .iter()
                .enumerate()
                .map(|(i, d)| parse_disk(d, i))
                .collect::<Result<Vec<_>>>()?;
            let server = Server::open(&ServerConfig {
                listen,
                iqn: iqn.clone(),
                luns,
                state_dir,
            })?;
            eprintln!(
                "tandem share iscsi: {iqn} on {} ({} LUNs)",
                server.local_addr()?,
                disks.len()
            );
            server.run()?;
            Ok(0)
        }
        ShareCmd::Serve {
            dir,
            listen,
            state_dir,
            api_socket,
        } => {
            let server = tandem_share::Server::open(&tandem_share::ServeConfig {
                dir: dir.clone(),
                listen,
                state_dir,
                api_socket,
            })?;
            eprintln!(
                "tandem share serve: {} on {} (API {})",
                dir.display(),
                server.local_addr()?,
                server
                    .api_socket()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            server.run()?;
            Ok(0)
        }
        ShareCmd::Create {
            dir,
            name,
            size,
            format,
        } => {
            if !tandem_share::proto::valid_disk_path(&name) {
                bail!("{name:?} is not a relative path under the served directory");
            }
            let format = match format.as_str() {
                "raw" => tandem_disk::Format::Raw,
                "qcow2" => tandem_disk::Format::Qcow2,
                other => bail!("format {other:?}: raw or qcow2"),
            };
            let path = dir.join(&name);
            if path.exists() {
                bail!("{} exists", path.display());
            }
            if let Some(p) = path.parent() {
                std::fs::create_dir_all(p)?;
            }
            tandem_disk::ops::create(&path, format, Some(size), None)
                .with_context(|| format!("creating {}", path.display()))?;
            println!(
                "created shared disk {name} ({size} bytes) in {}",
                dir.display()
            );
            Ok(0)
        }
        ShareCmd::List { api, json } => match ask(&api.path()?, &api::Request::List)? {
            api::Response::List { epoch, disks } => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&disks)?);
                } else {
                    print_list(epoch, &disks);
                }
                Ok(0)
            }
            api::Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer {other:?}"),
        },
        ShareCmd::Clear { api, disk } => {
            match ask(&api.path()?, &api::Request::Clear { disk: disk.clone() })? {
                api::Response::Cleared { disk, removed } => {
                    println!(
                        "cleared {disk}: {removed} registration(s) and any reservation removed"
                    );
                    Ok(0)
                }
                api::Response::Error { message } => bail!("clear {disk}: {message}"),
                other => bail!("unexpected answer {other:?}"),
            }
        }
    }
}

/// `tandem device-server vhost-scsi`: the backend `tandem run` starts for
/// each `--shared-disk`.
#[derive(Args)]
pub struct VhostScsiArgs {
    /// The vhost-user socket QEMU connects to.
    #[arg(long)]
    socket: PathBuf,
    /// The file server, HOST:PORT.
    #[arg(long)]
    server: String,
    /// The disk's name on the file server.
    #[arg(long)]
    disk: String,
    /// This VM's initiator name (unique per VM and host).
    #[arg(long)]
    initiator: String,
    /// JSON-lines API: {"op":"info"}.
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Seconds commands wait for a file server that went away.
    #[arg(long, default_value_t = 20)]
    reconnect_secs: u64,
}

pub fn vhost_scsi(args: VhostScsiArgs) -> Result<i32> {
    tandem_vhost_scsi::run(tandem_vhost_scsi::ServerConfig {
        socket: args.socket,
        server: args.server,
        disk: args.disk,
        initiator: args.initiator,
        api_socket: args.api_socket,
        reconnect_for: Duration::from_secs(args.reconnect_secs),
    })
    .context("vhost-user-scsi backend")?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let s = parse_disk("a.raw", 2).unwrap();
        assert_eq!((s.lun, s.read_only), (2, false));
        let s = parse_disk("a.raw,lun=7,ro", 0).unwrap();
        assert_eq!(
            (s.lun, s.read_only, s.path),
            (7, true, PathBuf::from("a.raw"))
        );
        assert!(parse_disk("a.raw,lun=x", 0).is_err());
        assert!(parse_disk("a.raw,lun=20000", 0).is_err());
        assert!(parse_disk("a.raw,bogus", 0).is_err());
        assert!(parse_disk(",lun=1", 0).is_err());
    }
}
