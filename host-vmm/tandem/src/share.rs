//! `tandem share`: serve disks to other hosts' initiators; the SCSI engine
//! and its persistent reservations are `tandem_scsi`'s, the transport
//! `tandem_iscsi`'s.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tandem_iscsi::server::{LunSpec, Server, ServerConfig};

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
    }
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
