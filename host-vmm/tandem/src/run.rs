//! `tandem run`: start a VM and follow it until it stops.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use tandem_engine::AccelRequest;
use tandem_image::Cache;
use tandem_vmm::config::{default_run_dir, parse_disk_flag};
use tandem_vmm::control::{supervise, ControlServer};
use tandem_vmm::{Ending, Vm, VmConfig};
use tracing::info;

use crate::host::{choose_accel, find_engine};

#[derive(Args)]
pub struct RunArgs {
    /// A TOML file with the VM's settings; flags override it.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// The VM's name (default vm0); it names the API socket.
    #[arg(long)]
    name: Option<String>,
    /// Guest kernel (default: the image built by `tandem image build`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line, replacing the default.
    #[arg(long)]
    append: Option<String>,
    /// Added to the kernel command line.
    #[arg(long)]
    append_extra: Option<String>,
    /// Guest RAM, e.g. 512M or 2G (default 512M).
    #[arg(long, short = 'm')]
    memory: Option<String>,
    /// vCPUs (default 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// A disk: path=<file>[,format=raw|qcow2][,if=virtio-blk|nvme|vhost-blk][,readonly=on][,direct=off]. Repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A disk shared with other VMs through a file server (`tandem share
    /// serve`): server=HOST:PORT,disk=NAME[,initiator=NAME]; the guest sees
    /// a virtio-scsi disk with SCSI-3 persistent reservations. Repeatable.
    #[arg(long = "shared-disk")]
    shared_disks: Vec<String>,
    /// Serial console: stdio (default), file:<path>, unix:<path> or none.
    #[arg(long)]
    serial: Option<String>,
    /// Control socket (default <run dir>/<name>.sock).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// auto (default), kvm or tcg.
    #[arg(long)]
    accel: Option<AccelRequest>,
    /// The QEMU binary (default: a system QEMU if new enough, else the built one).
    #[arg(long)]
    engine: Option<PathBuf>,
    /// Start without the Tandem control device.
    #[arg(long)]
    no_control_device: bool,
    /// ABI versions the host side of the channel speaks, MIN-MAX (for
    /// compatibility tests; default: all this build supports).
    #[arg(long, hide = true)]
    host_abi: Option<String>,
    /// Wait for a live migration from another host instead of booting:
    /// `tcp:ADDR:PORT` to listen on. The machine flags (or config file) must
    /// be the source's.
    #[arg(long, value_name = "URI", conflicts_with = "restore")]
    incoming: Option<String>,
    /// Restore a VM saved by `tandem snapshot FILE` instead of booting: the
    /// machine configuration comes from `FILE.json` (name, console, API
    /// socket, engine and accelerator may be given again).
    #[arg(long, value_name = "FILE")]
    restore: Option<PathBuf>,
    /// With --incoming or --restore: once the machine state is in, plug
    /// this host's NVMe function and make it the direct path of a guest
    /// volume again (F1 with assigned functions):
    /// `ID=NVME_DIR:VF[:VOLUME]`, e.g. `nvme-vf1=/run/nvme:1`.
    #[arg(long, value_name = "ID=DIR:VF[:VOLUME]")]
    direct: Vec<String>,
}

/// A `--direct` flag: the attach request and the volume.
fn parse_direct(s: &str) -> Result<(tandem_api::DeviceAttachRequest, u32)> {
    use tandem_nvme_device::server;
    let bad = || anyhow::anyhow!("--direct {s}: expected ID=NVME_DIR:VF[:VOLUME]");
    let (id, rest) = s.split_once('=').ok_or_else(bad)?;
    let (head, last) = rest.rsplit_once(':').ok_or_else(bad)?;
    let last: u32 = last.parse().map_err(|_| bad())?;
    let (dir, vf, volume) = match head.rsplit_once(':') {
        Some((d, v)) if v.parse::<u16>().is_ok() => (d, v.parse::<u16>().map_err(|_| bad())?, last),
        _ => (head, u16::try_from(last).map_err(|_| bad())?, 0),
    };
    if id.is_empty() || dir.is_empty() || vf == 0 {
        return Err(bad());
    }
    let dir = std::path::Path::new(dir);
    Ok((
        tandem_api::DeviceAttachRequest {
            id: id.to_owned(),
            socket: server::vf_socket(dir, vf).display().to_string(),
            server_api: Some(server::api_socket(dir).display().to_string()),
            vf,
        },
        volume,
    ))
}

impl RunArgs {
    fn to_config(&self) -> Result<VmConfig> {
        Ok(VmConfig {
            name: self.name.clone(),
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
            append_extra: self.append_extra.clone(),
            memory: self.memory.clone(),
            cpus: self.cpus,
            accel: self.accel,
            serial: self.serial.clone(),
            api_socket: self.api_socket.clone(),
            engine: self.engine.clone(),
            control_device: self.no_control_device.then_some(false),
            host_abi: self.host_abi.clone(),
            disks: self
                .disks
                .iter()
                .map(|d| parse_disk_flag(d))
                .collect::<Result<_, _>>()?,
            shared_disks: self
                .shared_disks
                .iter()
                .map(|d| tandem_vmm::config::parse_shared_disk_flag(d))
                .collect::<Result<_, _>>()?,
        })
    }
}

pub async fn run(args: RunArgs) -> Result<i32> {
    let cache = Cache::default_location();
    let file = match (&args.config, &args.restore) {
        (Some(_), Some(_)) => anyhow::bail!(
            "--restore takes the configuration saved with the snapshot; --config does not apply"
        ),
        (Some(p), None) => VmConfig::from_file(p)?,
        (None, Some(snap)) => {
            let over = args.to_config()?;
            if over.kernel.is_some()
                || over.initrd.is_some()
                || over.append.is_some()
                || over.append_extra.is_some()
                || over.memory.is_some()
                || over.cpus.is_some()
                || !over.disks.is_empty()
                || !over.shared_disks.is_empty()
                || over.control_device.is_some()
            {
                anyhow::bail!("--restore: the machine (kernel, command line, memory, vCPUs, disks, control device) is the one saved in {}", tandem_vmm::snapshot::config_path(snap).display());
            }
            if !snap.is_file() {
                anyhow::bail!("{}: no such snapshot", snap.display());
            }
            tandem_vmm::snapshot::load_config(snap).map_err(anyhow::Error::msg)?
        }
        (None, None) => VmConfig::default(),
    };
    let config = file.merge(args.to_config()?);
    let image = cache.default_image();
    let uses_default_image = config.kernel.is_none();
    let resolved = config.resolve(
        image.as_ref().map(|m| m.defaults()).as_ref(),
        &default_run_dir(),
    )?;
    let engine = find_engine(resolved.engine.as_deref(), &cache)?;
    let (choice, _facts) = choose_accel(resolved.accel, &engine, image.as_ref(), &cache).await?;

    // Claim the control socket before starting QEMU: a name clash is found
    // before anything runs.
    let (listener, _guard) = tandem_vmm::socket::claim(&resolved.api_socket)?;
    eprintln!(
        "tandem: starting {} under {} ({}); QEMU {} [{}]; {} MiB, {} vCPU{}; API {}",
        resolved.name,
        choice.accel.to_string().to_uppercase(),
        choice.reason,
        engine.version,
        engine.origin,
        resolved.memory_mib,
        resolved.cpus,
        if resolved.cpus == 1 { "" } else { "s" },
        resolved.api_socket.display()
    );
    if uses_default_image {
        if let Some(m) = &image {
            eprintln!(
                "tandem: default image: kernel {}, tandem.ko {} (ABI {})",
                m.kernel_release, m.module_version, m.abi_version
            );
        }
    }

    // The control device server starts first: QEMU connects to it while it
    // starts.
    let control = match resolved.control {
        Some(range) => {
            let dir = resolved.api_socket.with_extension("devices");
            let exe = std::env::current_exe().context("cannot find the tandem binary")?;
            let server = Arc::new(ControlServer::new(exe, dir, range));
            let child = server
                .spawn()
                .await
                .context("the control device server did not start")?;
            Some((server, child))
        }
        None => None,
    };
    let devices_dir = control.as_ref().map(|(s, _)| s.dir().to_owned());
    let incoming = match (&args.restore, &args.incoming) {
        (Some(p), _) => Some(format!("file:{}", std::path::absolute(p)?.display())),
        (None, Some(u)) if u.starts_with("tcp:") => Some(u.clone()),
        (None, Some(u)) => anyhow::bail!("--incoming {u}: expected tcp:ADDR:PORT"),
        (None, None) => None,
    };
    if let Some(uri) = &incoming {
        eprintln!("tandem: waiting for the machine state from {uri}");
    }
    let directs = args
        .direct
        .iter()
        .map(|d| parse_direct(d))
        .collect::<Result<Vec<_>>>()?;
    if !directs.is_empty() && incoming.is_none() {
        anyhow::bail!("--direct puts a direct path back after --incoming or --restore; for a new VM use tandem device attach and tandem device path");
    }
    let running = Vm::start_from(
        resolved,
        engine,
        choice,
        control.as_ref().map(|(s, _)| s.clone()),
        incoming,
    )
    .await
    .context(if args.restore.is_some() || args.incoming.is_some() {
        "the VM could not be restored (incoming machine state)"
    } else {
        "the VM did not start"
    })?;
    let vm = running.vm.clone();
    if let Some((server, child)) = control {
        tokio::spawn(supervise(server, vm.clone(), child));
    }
    for (req, volume) in directs {
        let vm = vm.clone();
        tokio::spawn(async move {
            let id = req.id.clone();
            match tandem_vmm::handoff::plug_direct(&vm, req, volume).await {
                Ok(ms) => eprintln!("tandem: {id} plugged and back as the direct path of volume {volume} in {ms} ms"),
                Err(e) => eprintln!("tandem: {id} could not be made the direct path of volume {volume}: {e}; the volume stays on its synthetic path"),
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        let mut count = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            count += 1;
            // The first signal asks the guest; the next one forces.
            if stop_tx.send(count > 1).await.is_err() {
                return;
            }
        }
    });

    let (down_tx, down_rx) = tokio::sync::oneshot::channel::<()>();
    let serve =
        axum::serve(listener, tandem_vmm::api::router(vm.clone())).with_graceful_shutdown(async {
            let _ = down_rx.await;
        });
    let server = tokio::spawn(async move { serve.await });
    info!("control API ready");

    let ending = running.wait(stop_rx).await;
    // Let in-flight API calls (a shutdown waiting for this moment) answer.
    let _ = down_tx.send(());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;

    let (msg, code) = match &ending {
        _ if vm.left_for().is_some() => {
            let to = vm.left_for().unwrap_or_default();
            match to.strip_prefix("file:") {
                Some(f) => (
                    format!("saved to {f}; restore with tandem run --restore {f}"),
                    0,
                ),
                None => (format!("migrated to {to}; it runs there now"), 0),
            }
        }
        Ending::GuestPoweroff => ("the guest powered off".to_string(), 0),
        Ending::Forced => ("stopped by the operator".to_string(), 0),
        Ending::GuestReset { reason } => (
            format!("the guest reset ({reason}); a kernel panic resets the guest, see its console"),
            2,
        ),
        Ending::Host { reason } => (format!("QEMU was stopped ({reason})"), 0),
        Ending::EngineLost => {
            let tail = vm.stderr_tail();
            (
                format!(
                    "QEMU exited unexpectedly{}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(":\n{tail}")
                    }
                ),
                3,
            )
        }
    };
    if let Some(d) = devices_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    eprintln!("tandem: {} stopped: {msg}", vm.info().name);
    Ok(code)
}

#[cfg(test)]
mod direct_tests {
    use super::parse_direct;

    #[test]
    fn direct_flags() {
        let (r, v) = parse_direct("nvme-vf1=/run/nvme:1").unwrap();
        assert_eq!((r.id.as_str(), r.vf, v), ("nvme-vf1", 1, 0));
        assert!(r.socket.starts_with("/run/nvme/"));
        let (r, v) = parse_direct("vf2=/run/nvme:2:3").unwrap();
        assert_eq!((r.vf, v), (2, 3));
        for bad in [
            "nvme-vf1",
            "x=/run/nvme",
            "x=/run/nvme:0",
            "=/d:1",
            "x=:1",
            "x=/d:one",
        ] {
            assert!(parse_direct(bad).is_err(), "{bad}");
        }
    }
}
