//! `tandem device ...` (functions assigned to a VM) and `tandem nvme ...`
//! (the SR-IOV NVMe device server: the host's stand-in adapter).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::Value;
use tandem_api::channel::FunctionOp;
use tandem_api::{
    routes, AttachedDevice, DeviceAttachRequest, DeviceDetachRequest, DeviceGuestRequest,
    DeviceGuestResponse, DeviceList,
};
use tandem_nvme_device::ctrl::HostPolicy;
use tandem_nvme_device::server::{self, Request, Response};

use crate::Target;

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Hot-plug a function served over vfio-user into the VM.
    Attach {
        /// Device id in the VM (e.g. nvme-vf1).
        id: String,
        /// The function's vfio-user socket.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// An NVMe device server's socket directory: attach its VF `--vf`.
        #[arg(long, conflicts_with = "socket")]
        nvme_dir: Option<PathBuf>,
        /// VF number on that server (0: the PF).
        #[arg(long, default_value_t = 1)]
        vf: u16,
        #[command(flatten)]
        target: Target,
    },
    /// Hot-remove a function (the guest releases it first).
    Detach {
        id: String,
        /// Seconds the guest gets to release it.
        #[arg(long, default_value_t = 15)]
        timeout: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Multi-path volumes in the guest (F4, needs tandem.ko with ABI 1.2):
    /// make a disk (a virtio-blk disk's id, or an attached function's) the
    /// synthetic or the direct path of `/dev/tandem<volume>`, move the
    /// volume's I/O off a direct path and let go of it, or (release of the
    /// synthetic path) delete the volume once unused.
    Path {
        id: String,
        role: PathRole,
        #[arg(long, default_value_t = 0)]
        volume: u32,
        /// How long the guest waits for the move to finish.
        #[arg(long, default_value_t = 5000)]
        drain_ms: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Attached functions and what their guest drivers did with them.
    Show {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Ask the guest driver stack to hold new I/O to a function and wait
    /// for I/O in flight to complete (needs tandem.ko with ABI 1.1).
    Quiesce {
        id: String,
        /// How long the guest waits for I/O in flight.
        #[arg(long, default_value_t = 5000)]
        drain_ms: u32,
        /// The guest resumes by itself after this long without `resume`.
        #[arg(long, default_value_t = 60_000)]
        lease_ms: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Let the I/O held by `quiesce` go.
    Resume {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// The guest driver stack's view of a function.
    Report {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Apply the host's policy in the guest's filter as well (the device
    /// server enforces it regardless: `tandem nvme policy`).
    GuestPolicy {
        id: String,
        /// The host holds the function frozen: the guest refuses its own
        /// function resets.
        #[arg(long)]
        frozen: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
}

fn print_guest(r: &DeviceGuestResponse, indent: &str) {
    let g = &r.guest;
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "{indent}guest {}: status {} | driver {} | enabled {} bus master {} msi-x {} | {}",
        r.guest_address,
        g.status,
        if g.driver.is_empty() {
            "none"
        } else {
            &g.driver
        },
        yes(g.enabled),
        yes(g.bus_master),
        yes(g.msix),
        g.power_state
    );
    println!(
        "{indent}disks {} | in flight {} | quiesced {} drained {} (drain {} us, {} quiesces) | frozen {} | path {} active {} | round trip {} us",
        g.disks,
        g.in_flight,
        yes(g.quiesced),
        yes(g.drained),
        g.drain_us,
        g.quiesces,
        yes(g.frozen),
        yes(g.path),
        yes(g.active_path),
        g.round_trip_us
    );
}

async fn guest_op(
    target: &Target,
    id: String,
    op: FunctionOp,
    drain_ms: Option<u32>,
    lease_ms: Option<u32>,
    frozen: bool,
    volume: Option<u32>,
) -> Result<DeviceGuestResponse> {
    let req = DeviceGuestRequest {
        id,
        op,
        drain_ms,
        lease_ms,
        frozen,
        volume,
    };
    let wait = u64::from(drain_ms.unwrap_or(5000)) + 15_000;
    Ok(target
        .client()
        .with_timeout(Duration::from_millis(wait))
        .put(routes::DEVICE_GUEST, &req)
        .await?)
}

fn show_guest(r: &DeviceGuestResponse, json: bool) -> Result<i32> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print_guest(r, "");
    }
    Ok(if r.guest.status_code == Some(0) { 0 } else { 1 })
}

/// What a disk becomes for a multi-path volume.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PathRole {
    /// The always-present, migratable path (virtio-blk).
    Synthetic,
    /// The assigned function's path; the volume's I/O moves to it.
    Direct,
    /// Move I/O off this direct path and let go of it; of a synthetic
    /// path: delete `/dev/tandem<volume>` (refused as busy while it is
    /// open or has a direct path).
    Release,
}

#[derive(Subcommand)]
pub enum NvmeCmd {
    /// Run the SR-IOV NVMe device server in the foreground.
    Serve {
        /// Directory for its sockets (pf.sock, vf<N>.sock, api.sock).
        #[arg(long)]
        dir: PathBuf,
        /// The PF's namespace: a disk image (raw, qcow2, VHDX, a chain)
        /// or a running VM's volume socket (see --vf-disk).
        #[arg(long)]
        pf_disk: Option<PathBuf>,
        /// Each VF's namespace, in VF order; their number is TotalVFs.
        /// A disk image (raw: read and written in place; qcow2, VHDX,
        /// chains: through the disk layer, and then open in no other
        /// process), or the volume socket of a running VM's vhost-blk disk
        /// (`tandem info` shows it): the VF is then a second path to that
        /// disk, through its one backend.
        #[arg(long)]
        vf_disk: Vec<PathBuf>,
        /// The adapter's serial number (its functions add -PF, -VF<N>);
        /// default: TDM and a hash of the directory, so that two adapters
        /// in one guest never share an NVMe subsystem name (the guest's
        /// nvme driver rejects the second) and a restarted server keeps
        /// its identity.
        #[arg(long)]
        serial: Option<String>,
    },
    /// Enable `count` VFs (0 disables them all).
    Vfs {
        count: u16,
        #[arg(long)]
        dir: PathBuf,
    },
    /// The PF and its VFs, as the device sees them.
    Show {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Guest config-space writes the policy denied or translated (F5).
    Audit {
        #[arg(long)]
        dir: PathBuf,
        /// Only records after this sequence number.
        #[arg(long, default_value_t = 0)]
        since: u64,
        #[arg(long)]
        json: bool,
    },
    /// The host policy of one function, enforced by the device.
    Policy {
        #[arg(long)]
        dir: PathBuf,
        /// VF number (0: the PF).
        #[arg(long)]
        vf: u16,
        /// Stop fetching I/O and refuse controller resets.
        #[arg(long)]
        frozen: bool,
        /// Ceiling on the I/O queues the guest may create.
        #[arg(long)]
        max_io_queues: Option<u16>,
        /// PF only: a guest that owns the PF may enable up to this many VFs
        /// (default: none; its writes to the SR-IOV capability are denied).
        #[arg(long)]
        guest_vfs: Option<u16>,
    },
}

fn nvme_request(dir: &std::path::Path, req: &Request) -> Result<Response> {
    let path = server::api_socket(dir);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the NVMe device server at {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    let r: Response = serde_json::from_str(&answer).context("bad answer from the device server")?;
    if let Response::Error { message } = &r {
        bail!("{message}");
    }
    Ok(r)
}

fn print_function(f: &Value, indent: &str) {
    let c = &f["controller"];
    let yes = |v: &Value| {
        if v.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    println!(
        "{indent}enabled {} ready {} fatal {} | bus master {} memory {} msi-x {} | power D{}",
        yes(&c["enabled"]),
        yes(&c["ready"]),
        yes(&c["fatal"]),
        yes(&f["bus_master"]),
        yes(&f["memory_enable"]),
        yes(&f["msix_enabled"]),
        f["power_state"]
            .as_u64()
            .map_or("-".into(), |p| p.to_string())
    );
    let queues = c["queues"].as_array().map_or(0, Vec::len);
    println!(
        "{indent}I/O queues granted {} | queues {} | in flight {} (AERs {}) | frozen {} | queue ceiling {}",
        c["io_queues_granted"],
        queues,
        c["in_flight"],
        c["aers_outstanding"],
        yes(&c["policy"]["frozen"]),
        c["policy"]["max_io_queues"].as_u64().map_or("none".into(), |v| v.to_string())
    );
    let s = &c["stats"];
    println!(
        "{indent}reads {} writes {} flushes {} | dma faults {} | bad doorbells {} | resets {} (FLR {}) | policy refusals {} | errors {}",
        s["reads"], s["writes"], s["flushes"], s["dma_faults"], s["invalid_doorbells"],
        s["controller_resets"], f["function_resets"], s["policy_refusals"], s["error_completions"]
    );
    println!(
        "{indent}config writes denied {} translated {} (tandem nvme audit)",
        f["config_denied"], f["config_translated"]
    );
    if let Some(ns) = f["namespaces"].as_array() {
        for (i, n) in ns.iter().enumerate() {
            println!("{indent}namespace {}: {}", i + 1, n.as_str().unwrap_or("?"));
        }
    }
}

/// `TDM` and the FNV-1a hash of the server's directory, in hex: stable for
/// one adapter, different between adapters (a hash, not a crate: eight
/// hex digits of identity need no more).
fn default_serial(dir: &std::path::Path) -> String {
    let h = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
        });
    format!("TDM{h:08X}")
}

pub fn nvme(cmd: NvmeCmd) -> Result<i32> {
    match cmd {
        NvmeCmd::Serve {
            dir,
            pf_disk,
            vf_disk,
            serial,
        } => {
            let dir = std::path::absolute(&dir)
                .with_context(|| format!("{}: bad directory", dir.display()))?;
            let serial = serial.unwrap_or_else(|| default_serial(&dir));
            server::run(server::ServerConfig {
                dir,
                pf_disk,
                vf_disks: vf_disk,
                serial,
            })
            .context("NVMe device server")?;
            Ok(0)
        }
        NvmeCmd::Vfs { count, dir } => {
            nvme_request(&dir, &Request::SetVfs { count })?;
            for n in 1..=count {
                println!("VF {n}: {}", server::vf_socket(&dir, n).display());
            }
            Ok(0)
        }
        NvmeCmd::Show { dir, json } => {
            let Response::Info(info) = nvme_request(&dir, &Request::Info)? else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
                return Ok(0);
            }
            println!(
                "PF ({}), {} VFs possible",
                info.pf_socket.display(),
                info.total_vfs
            );
            print_function(&info.pf, "  ");
            for vf in &info.vfs {
                println!(
                    "VF {} ({}){}",
                    vf.vf,
                    vf.socket.display(),
                    if vf.connected { ", attached" } else { "" }
                );
                print_function(&vf.function, "  ");
            }
            Ok(0)
        }
        NvmeCmd::Audit { dir, since, json } => {
            let Response::Audit(rep) = nvme_request(&dir, &Request::Audit { since })? else {
                bail!("unexpected answer");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
                return Ok(0);
            }
            for r in &rep.records {
                let who = match r.function.function {
                    tandem_cfgpolicy::Function::Pf => "PF".to_string(),
                    tandem_cfgpolicy::Function::Vf(n) => format!("VF{n}"),
                    tandem_cfgpolicy::Function::Single => "fn".to_string(),
                };
                println!(
                    "#{:<5} {:>10.3}s {:<4} {:?} {}.{} @{:#05x}/{}: wrote {:#x}, applied {:#x} [{}] {}",
                    r.seq,
                    r.time_ns as f64 / 1e9,
                    who,
                    r.action,
                    r.register,
                    r.field,
                    r.offset,
                    r.width,
                    r.written,
                    r.applied,
                    r.rule,
                    r.reason
                );
            }
            println!("{} records ({} dropped)", rep.records.len(), rep.dropped);
            Ok(0)
        }
        NvmeCmd::Policy {
            dir,
            vf,
            frozen,
            max_io_queues,
            guest_vfs,
        } => {
            nvme_request(
                &dir,
                &Request::SetPolicy {
                    vf,
                    policy: HostPolicy {
                        frozen,
                        max_io_queues,
                        manage_vfs: guest_vfs.is_some(),
                        num_vfs_ceiling: guest_vfs.unwrap_or(0),
                    },
                },
            )?;
            Ok(0)
        }
    }
}

pub async fn device(cmd: DeviceCmd) -> Result<i32> {
    match cmd {
        DeviceCmd::Attach {
            id,
            socket,
            nvme_dir,
            vf,
            target,
        } => {
            let (socket, server_api) = match (socket, nvme_dir) {
                (Some(s), None) => (s, None),
                (None, Some(d)) => {
                    let s = if vf == 0 {
                        server::pf_socket(&d)
                    } else {
                        server::vf_socket(&d, vf)
                    };
                    (s, Some(server::api_socket(&d).display().to_string()))
                }
                _ => bail!("name the function with --socket or --nvme-dir"),
            };
            let req = DeviceAttachRequest {
                id,
                socket: socket.display().to_string(),
                server_api,
                vf,
            };
            let d: AttachedDevice = target.client().put(routes::DEVICE_ATTACH, &req).await?;
            println!("attached {} at {} ({})", d.id, d.port, d.socket);
            Ok(0)
        }
        DeviceCmd::Detach {
            id,
            timeout,
            target,
        } => {
            let req = DeviceDetachRequest {
                id: id.clone(),
                timeout_s: Some(timeout),
            };
            let client = target
                .client()
                .with_timeout(Duration::from_secs(timeout + 10));
            let _: Value = client.put(routes::DEVICE_DETACH, &req).await?;
            println!("detached {id}");
            Ok(0)
        }
        DeviceCmd::Show { json, target } => {
            let l: DeviceList = target.client().get(routes::DEVICE_LIST).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
                return Ok(0);
            }
            if l.devices.is_empty() {
                println!("no functions attached");
            }
            for d in &l.devices {
                println!("{} at {} ({}, VF {})", d.id, d.port, d.socket, d.vf);
                match (&d.state, &d.state_error) {
                    (Some(s), _) => print_function(&s["function"], "  "),
                    (None, Some(e)) => println!("  state unknown: {e}"),
                    (None, None) => println!("  state unknown: no device server API"),
                }
                match guest_op(
                    &target,
                    d.id.clone(),
                    FunctionOp::Report,
                    None,
                    None,
                    false,
                    None,
                )
                .await
                {
                    Ok(r) => print_guest(&r, "  "),
                    Err(e) => println!("  guest view unknown: {e:#}"),
                }
            }
            println!("free root ports: {}", l.free_ports.join(", "));
            Ok(0)
        }
        DeviceCmd::Quiesce {
            id,
            drain_ms,
            lease_ms,
            json,
            target,
        } => {
            let r = guest_op(
                &target,
                id,
                FunctionOp::Quiesce,
                Some(drain_ms),
                Some(lease_ms),
                false,
                None,
            )
            .await?;
            show_guest(&r, json)
        }
        DeviceCmd::Resume { id, json, target } => {
            let r = guest_op(&target, id, FunctionOp::Resume, None, None, false, None).await?;
            show_guest(&r, json)
        }
        DeviceCmd::Report { id, json, target } => {
            let r = guest_op(&target, id, FunctionOp::Report, None, None, false, None).await?;
            show_guest(&r, json)
        }
        DeviceCmd::Path {
            id,
            role,
            volume,
            drain_ms,
            json,
            target,
        } => {
            let op = match role {
                PathRole::Synthetic => FunctionOp::PathSynthetic,
                PathRole::Direct => FunctionOp::PathDirect,
                PathRole::Release => FunctionOp::PathRelease,
            };
            let r = guest_op(&target, id, op, Some(drain_ms), None, false, Some(volume)).await?;
            show_guest(&r, json)
        }
        DeviceCmd::GuestPolicy {
            id,
            frozen,
            json,
            target,
        } => {
            let r = guest_op(&target, id, FunctionOp::Policy, None, None, frozen, None).await?;
            show_guest(&r, json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::default_serial;
    use std::path::Path;

    #[test]
    fn two_adapters_get_two_serials_and_one_keeps_its_own() {
        let a = default_serial(Path::new("/run/tandem/nvme0"));
        let b = default_serial(Path::new("/run/tandem/nvme1"));
        assert_ne!(a, b);
        assert_eq!(a, default_serial(Path::new("/run/tandem/nvme0")));
        // NVMe's serial field holds 20 bytes; the functions add "-VF64".
        assert!(a.len() + "-VF64".len() <= 20, "{a}");
        assert!(a.starts_with("TDM"));
    }
}
